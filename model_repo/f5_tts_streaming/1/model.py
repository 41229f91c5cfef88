"""Triton adapter (decoupled): stream a request's audio chunk by chunk (f5_triton.streaming).

Flow matching and the vocoder run in this model, loaded once: a chunk goes out as soon as it is
generated, without the queue delays of the batching `flow_matching` / `vocoder` models. A
cancelled request (client gone, or `stop_stream(cancel_requests=True)`) or one past its Triton
timeout stops at the next ODE step. Audio seconds, RTF and rejections go to `serving.metrics`.
"""

import os
import sys

# The python backend stub starts its interpreter in isolated mode, which ignores PYTHONPATH: restore it
# before any import, so packages installed only on PYTHONPATH (and their versions) are the ones used.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from f5_triton.cache import OUTPUT_CACHE_DEFAULTS, REFERENCE_CACHE_DEFAULTS, cache_from_params
from f5_triton.config import DEFAULT_SAMPLING, SAMPLE_RATE
from f5_triton.guards import check_finite_audio
from f5_triton.pipeline import Preprocessor
from f5_triton.request import INPUTS, validate_request
from f5_triton.serving import metrics, stages, triton_io
from f5_triton.streaming import DEFAULT_FIRST_CHUNK_BYTES, StreamingSynthesizer
from f5_triton.text import Tokenizer

DROPPED = {metrics.CANCELLED: "cancelled by the client", metrics.DEADLINE_EXCEEDED: "past its deadline"}


class _Dropped(Exception):
    """The request was cancelled or its Triton timeout passed: stop generating."""


class TritonPythonModel:
    def initialize(self, args):
        params = triton_io.parameters(args)
        triton_io.set_torch_threads(params)
        device = triton_io.device(args)
        model = args["model_name"]
        reference_cache = cache_from_params(params, "reference", REFERENCE_CACHE_DEFAULTS,
                                            metrics.cache_observer(model, "reference"))
        output_cache = cache_from_params(params, "output", OUTPUT_CACHE_DEFAULTS,
                                         metrics.cache_observer(model, "output"))
        preprocess = Preprocessor(Tokenizer(params["vocab"]), stages.limits_from_params(params), cache=reference_cache)
        flow_matcher, vocoder = stages.load_flow_matcher(params, device), stages.load_vocoder(params, device)
        stages.warm_up(params, flow_matcher, vocoder, name=model)
        self.streamer = StreamingSynthesizer(
            preprocess, flow_matcher, vocoder,
            first_chunk_bytes=int(params.get("first_chunk_bytes", DEFAULT_FIRST_CHUNK_BYTES)),
            output_cache=output_cache)
        self.metrics = metrics.Metrics(model)
        self.sway_sampling_coef = float(params.get("sway_sampling_coef", DEFAULT_SAMPLING.sway_sampling_coef))
        self.default_nfe_steps = int(params.get("nfe_steps", DEFAULT_SAMPLING.nfe_steps))

    def execute(self, requests):
        for request in requests:
            self._stream(request, request.get_response_sender())
        return None

    def _stream(self, request, sender):
        watch = triton_io.RequestWatch([request])
        start = time.time()

        def check_wanted(_step=None):
            if not watch.alive(0):
                raise _Dropped()

        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        sent, chunks, audio_seconds = 0, "?", 0.0
        try:
            fields = triton_io.inputs(request, [f.name for f in INPUTS])
            if fields["nfe_steps"] is None:
                fields["nfe_steps"] = self.default_nfe_steps
            synthesis = validate_request(**fields, limits=self.streamer.preprocess.limits)
            synthesis.sway_sampling_coef = self.sway_sampling_coef
            for piece in self.streamer.stream(synthesis, on_step=check_wanted):
                chunks = piece.chunks
                check_wanted()
                audio = check_finite_audio(piece.audio)
                sender.send(triton_io.response({"waveform": audio, "is_final": np.array([piece.is_final])}),
                            flags=final if piece.is_final else 0)
                sent += 1
                audio_seconds += len(audio) / SAMPLE_RATE
            self.metrics.generated(audio_seconds, time.time() - start)
        except _Dropped:
            response = watch.error_response(0, self.metrics)  # counted before the log line tests wait for
            pb_utils.Logger.log_info(f"f5_tts_streaming: request {DROPPED[watch.dropped[0]]} after {sent} of "
                                     f"{chunks} pieces; generation stopped")
            sender.send(response, flags=final)
        except Exception as exc:
            sender.send(triton_io.error_response(exc, self.metrics), flags=final)
