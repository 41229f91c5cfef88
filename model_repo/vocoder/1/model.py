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
            # each request is [batch, n_mels, frames]; its frames may differ from its neighbours'
            batches = [pb_utils.get_input_tensor_by_name(r, "mel").as_numpy() for r in requests]
            mels = [torch.from_numpy(np.ascontiguousarray(m)).transpose(0, 1) for b in batches for m in b]
            waves = iter(self.vocoder(mels))
        except Exception as exc:
            return [triton_io.error_response(exc) for _ in requests]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
                    "waveform", np.stack([next(waves) for _ in b]).astype(np.float32))]) for b in batches]
