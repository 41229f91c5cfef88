"""Triton adapter: a request's chunks -> restore level, cross-fade.

The chunks come as waveforms (waves + wave_samples) when flow_matching vocoded them itself, or as
mels (mel + mel_frames), which are vocoded here through the `vocoder` model (BLS) first.

Reports the generated audio and the real-time factor (`f5_triton.serving.metrics`); NaN/Inf audio
is an error, never a response.
"""

import os
import sys

# The python backend stub starts its interpreter in isolated mode, which ignores PYTHONPATH: restore it
# before any import, so packages installed only on PYTHONPATH (and their versions) are the ones used.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import asyncio
import time

import numpy as np

import triton_python_backend_utils as pb_utils

from f5_triton.config import SAMPLE_RATE, vocoder_samples
from f5_triton.guards import check_finite_audio
from f5_triton.pipeline import finish
from f5_triton.serving import triton_io, wire

INPUT_NAMES = tuple(f.name for f in wire.MEL_FIELDS + wire.WAVE_FIELDS) + ("ref_rms", triton_io.RECEIVED_AT)


class TritonPythonModel(triton_io.Adapter):
    def load(self, args):
        self.vocoder_model = self.settings.placement.vocoder_model

    async def execute(self, requests):
        return await asyncio.gather(*(self._finish(request) for request in requests))

    async def _finish(self, request):
        try:
            arrays = triton_io.inputs(request, INPUT_NAMES)
            kind, chunks = wire.unpack_chunks(arrays)
            waves = chunks if kind == "waves" else await asyncio.gather(*(self._vocode(mel) for mel in chunks))
            wave = check_finite_audio(finish(list(waves), float(arrays["ref_rms"][0])))
            start = triton_io.received_at(arrays[triton_io.RECEIVED_AT])
            self.metrics.generated(len(wave) / SAMPLE_RATE, None if start is None else time.time() - start)
            return triton_io.response({"waveform": wave})
        except Exception as exc:
            return self.error(exc)

    async def _vocode(self, mel):
        """One chunk [n_mels, frames] -> waveform, as a request to the vocoder model (so it batches)."""
        request = pb_utils.InferenceRequest(model_name=self.vocoder_model, requested_output_names=["waveform"],
                                            inputs=[pb_utils.Tensor("mel", mel[None]),
                                                    pb_utils.Tensor("lengths", np.array([[mel.shape[1]]], np.int64))])
        response = await request.async_exec()
        if response.has_error():
            raise RuntimeError(f"vocoder: {response.error().message()}")
        wave = pb_utils.get_output_tensor_by_name(response, "waveform").as_numpy()[0]
        return wave[: vocoder_samples(mel.shape[1])]
