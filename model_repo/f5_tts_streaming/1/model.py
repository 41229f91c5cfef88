"""Triton adapter (decoupled): stream requests' audio chunk by chunk, all streams batched together.

Preprocessing (with the streaming chunker), flow matching and the vocoder run in this model, loaded once as one
`pipeline.Stages`. `execute` validates and preprocesses each
request, hands it to a background `f5_triton.stream_scheduler.StreamScheduler` and returns: the scheduler
advances every active stream in the same batched DiT call and sends each piece through the request's
response sender as soon as its chunk is vocoded. A cancelled request (client gone, or
`stop_stream(cancel_requests=True)`) or one past its Triton timeout leaves at the next round (ODE step);
beyond `max_streams` active and `max_queued` waiting streams a request is refused with UNAVAILABLE, and so is one
that could not start within the pacing's `queue_seconds` (admission by playback deadline: stream_scheduler).
Audio seconds, RTF and rejections go to `serving.metrics`.
"""

import os
import sys

# The python backend stub starts its interpreter in isolated mode, which ignores PYTHONPATH: restore it
# before any import, so packages installed only on PYTHONPATH (and their versions) are the ones used.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import dataclasses
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from f5_triton.cache import cache_from_config
from f5_triton.config import SAMPLE_RATE
from f5_triton.guards import check_finite_audio
from f5_triton.pipeline import Preprocessor, Stages
from f5_triton.request import INPUTS
from f5_triton.serving import factories, metrics, triton_io
from f5_triton.stream_scheduler import StreamScheduler
from f5_triton.streaming import StreamingSynthesizer
from f5_triton.text import StreamingChunker, Tokenizer

DROPPED = {metrics.CANCELLED: "cancelled by the client", metrics.DEADLINE_EXCEEDED: "past its deadline"}
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonSink:
    """One request's stream as the scheduler sees it (`stream_scheduler.StreamSink`)."""

    def __init__(self, request, metrics_: metrics.Metrics):
        self.sender = request.get_response_sender()
        self.watch = triton_io.RequestWatch([request])
        self.metrics = metrics_
        self.start = time.time()
        self.audio_seconds = 0.0

    def wanted(self) -> bool:
        return self.watch.alive(0)

    def started(self, queued_seconds: float) -> None:
        self.metrics.queued(queued_seconds)

    def piece(self, piece) -> None:
        audio = check_finite_audio(piece.audio)
        self.audio_seconds += len(audio) / SAMPLE_RATE
        if piece.is_final:  # counted before the client can see the end of its stream
            self.metrics.generated(self.audio_seconds, time.time() - self.start)
        self.sender.send(triton_io.response({"waveform": audio, "is_final": np.array([piece.is_final])}),
                         flags=FINAL if piece.is_final else 0)

    def dropped(self, sent: int, chunks: int) -> None:
        response = self.watch.error_response(0, self.metrics)  # counted before the log line tests wait for
        pb_utils.Logger.log_info(f"f5_tts_streaming: request {DROPPED[self.watch.dropped[0]]} after {sent} of "
                                 f"{chunks} pieces; generation stopped")
        self.sender.send(response, flags=FINAL)

    def failed(self, error: Exception) -> None:
        self.sender.send(triton_io.error_response(error, self.metrics), flags=FINAL)


class TritonPythonModel(triton_io.Adapter):
    def load(self, args):
        settings, device, model = self.settings, triton_io.device(args), self.name
        reference_cache = cache_from_config(settings.caches, "reference", metrics.cache_observer(model, "reference"))
        output_cache = cache_from_config(settings.caches, "output", metrics.cache_observer(model, "output"))
        preprocess = Preprocessor(Tokenizer(settings.weights.vocab), settings.limits, cache=reference_cache,
                                  chunker=StreamingChunker(settings.streaming))
        # one bundle: the synthesizer's and its scheduler's; `execute` validates requests with its limits
        self.stages = Stages(preprocess, factories.load_flow_matcher(settings, device),
                             factories.load_vocoder(settings, device))
        first_steps = settings.streaming.first_chunk_nfe_steps  # opt-in: first chunks on fewer steps
        warmed_up = factories.warm_up(settings, self.stages.flow_matching, self.stages.vocoder, name=model,
                                      also_nfe_steps=(first_steps,) if first_steps else ()) is not None
        streamer = StreamingSynthesizer(self.stages, output_cache=output_cache, first_chunk_nfe_steps=first_steps,
                                        unsplit_at_load=settings.streaming.unsplit_at_load)
        self.scheduler = StreamScheduler(streamer, **dataclasses.asdict(settings.scheduler),
                                         pacing=settings.pacing).start()
        self.sampling = settings.sampling
        if warmed_up:
            seconds = self.scheduler.warm_up(self.sampling)
            pb_utils.Logger.log_info(f"{model}: a warm-up stream went through every stage in {seconds:.2f} s")

    def execute(self, requests):
        for request in requests:
            sink = TritonSink(request, self.metrics)
            try:
                synthesis = factories.request_from_inputs(triton_io.inputs(request, [f.name for f in INPUTS]),
                                                       self.sampling, self.stages.preprocess.limits)
                self.scheduler.submit(synthesis, sink)
            except Exception as exc:
                sink.failed(exc)
        return None

    def finalize(self):
        self.scheduler.close()
