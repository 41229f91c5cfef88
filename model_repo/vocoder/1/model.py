"""Triton adapter: Vocos mel -> waveform for a dynamic batch of requests (f5_triton.pipeline.Vocoder)."""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from f5_triton.serving import triton_io
from f5_triton.serving.stages import load_vocoder


class TritonPythonModel:
    def initialize(self, args):
        self.vocoder = load_vocoder(triton_io.parameters(args), triton_io.device(args))

    def execute(self, requests):
        try:
            # each request is [batch, n_mels, frames] (+ valid frames per item); frames differ across requests
            batches = []
            for request in requests:
                mel = pb_utils.get_input_tensor_by_name(request, "mel").as_numpy()
                lengths = pb_utils.get_input_tensor_by_name(request, "lengths")
                frames = lengths.as_numpy().reshape(-1) if lengths is not None else [mel.shape[-1]] * len(mel)
                batches.append([torch.from_numpy(np.ascontiguousarray(m[:, :int(n)])).transpose(0, 1)
                                for m, n in zip(mel, frames)])
            waves = iter(self.vocoder([m for batch in batches for m in batch]))
        except Exception as exc:
            return [triton_io.error_response(exc) for _ in requests]
        responses = []
        for batch in batches:
            items = [next(waves) for _ in batch]
            padded = np.zeros((len(items), max(len(w) for w in items)), dtype=np.float32)
            for row, wave in zip(padded, items):
                row[:len(wave)] = wave
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("waveform", padded)]))
        return responses
