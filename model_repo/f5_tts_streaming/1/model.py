"""Triton adapter (decoupled): stream a request's audio chunk by chunk (f5_triton.streaming).

Flow matching and the vocoder run in this model, loaded once: a chunk goes out as soon as it is
generated, without the queue delays of the batching `flow_matching` / `vocoder` models. A
cancelled request (client gone, or `stop_stream(cancel_requests=True)`) stops at the next ODE step.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from f5_triton.cache import OUTPUT_CACHE_DEFAULTS, REFERENCE_CACHE_DEFAULTS, cache_from_params
from f5_triton.pipeline import Preprocessor
from f5_triton.serving import stages, triton_io
from f5_triton.serving.schema import INPUTS, validate_request
from f5_triton.streaming import DEFAULT_FIRST_CHUNK_BYTES, StreamingSynthesizer
from f5_triton.text import Tokenizer


class _Cancelled(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        params = triton_io.parameters(args)
        device = triton_io.device(args)
        preprocess = Preprocessor(Tokenizer(params["vocab"]), stages.limits_from_params(params),
                                  cache=cache_from_params(params, "reference", REFERENCE_CACHE_DEFAULTS))
        self.streamer = StreamingSynthesizer(
            preprocess, stages.load_flow_matcher(params, device), stages.load_vocoder(params, device),
            first_chunk_bytes=int(params.get("first_chunk_bytes", DEFAULT_FIRST_CHUNK_BYTES)),
            output_cache=cache_from_params(params, "output", OUTPUT_CACHE_DEFAULTS))
        self.sway_sampling_coef = float(params.get("sway_sampling_coef", -1.0))
        self.default_nfe_steps = int(params.get("nfe_steps", 32))

    def execute(self, requests):
        for request in requests:
            self._stream(request, request.get_response_sender())
        return None

    def _stream(self, request, sender):
        def check_cancelled(_step=None):
            if sender.is_cancelled():
                raise _Cancelled()

        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        sent, chunks = 0, "?"
        try:
            fields = triton_io.inputs(request, [f.name for f in INPUTS])
            if fields["nfe_steps"] is None:
                fields["nfe_steps"] = self.default_nfe_steps
            synthesis = validate_request(**fields, limits=self.streamer.preprocess.limits)
            synthesis.sway_sampling_coef = self.sway_sampling_coef
            for piece in self.streamer.stream(synthesis, on_step=check_cancelled):
                chunks = piece.chunks
                check_cancelled()
                sender.send(triton_io.response({"waveform": piece.audio, "is_final": np.array([piece.is_final])}),
                            flags=final if piece.is_final else 0)
                sent += 1
        except _Cancelled:
            pb_utils.Logger.log_info(f"f5_tts_streaming: request cancelled by the client after {sent} of {chunks} "
                                     f"pieces; generation stopped")
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("request cancelled",
                                                                              pb_utils.TritonError.CANCELLED)),
                        flags=final)
        except Exception as exc:
            sender.send(triton_io.error_response(exc), flags=final)
