"""Triton adapter: Vocos mel -> waveform for a dynamic batch of requests (f5_triton.pipeline.Vocoder)."""

import os
import sys

# The python backend stub starts its interpreter in isolated mode, which ignores PYTHONPATH: restore it
# before any import, so packages installed only on PYTHONPATH (and their versions) are the ones used.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import numpy as np
import triton_python_backend_utils as pb_utils

from f5_triton.serving import factories, triton_io


class TritonPythonModel(triton_io.Adapter):
    def load(self, args):
        self.vocoder = factories.load_vocoder(self.settings, triton_io.device(args))
        self.limits = self.settings.limits

    def execute(self, requests):
        # each request is [batch, n_mels, frames] (+ valid frames per item); frames differ across requests
        responses = [None] * len(requests)
        batches = {}
        for index, request in enumerate(requests):
            try:
                mel = pb_utils.get_input_tensor_by_name(request, "mel").as_numpy()
                lengths = pb_utils.get_input_tensor_by_name(request, "lengths")
                batches[index] = factories.vocoder_items(mel, None if lengths is None else lengths.as_numpy(),
                                                      self.limits)
            except Exception as exc:
                responses[index] = self.error(exc)
        if not batches:
            return responses
        try:
            waves = iter(self.vocoder([m for batch in batches.values() for m in batch]))
        except Exception as exc:
            return [r or self.error(exc) for r in responses]
        for index, batch in batches.items():
            items = [next(waves) for _ in batch]
            padded = np.zeros((len(items), max(len(w) for w in items)), dtype=np.float32)
            for row, wave in zip(padded, items):
                row[:len(wave)] = wave
            responses[index] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("waveform", padded)])
        return responses
