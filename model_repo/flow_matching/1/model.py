"""Triton adapter: flow matching for a dynamic batch of requests (f5_triton.pipeline.FlowMatcher).

Sends each request's chunk mels to postprocess (wire.MEL_FIELDS) or, when the repository puts the
vocoder here (serving_config's `placement.vocode`), their waveforms (wire.WAVE_FIELDS): the whole batch's mels are
decoded in one vocoder call on this model's device, right after sampling.

Requests whose client cancelled them, or whose Triton `timeout` passed, are dropped between ODE
steps (the rest of the batch goes on); jobs are validated first, as this model can be called directly.

The output cache (`caches.output_cache_entries` / `output_cache_mb`, as f5_tts_streaming's): a request that comes with an
`output_key` (preprocess sends one for every request with an explicit seed) gets its outputs kept under that key bound
to its inputs (f5_triton.cache.bound_key); the same request again is answered from there, without the DiT.
"""

import os
import sys

# The python backend stub starts its interpreter in isolated mode, which ignores PYTHONPATH: restore it
# before any import, so packages installed only on PYTHONPATH (and their versions) are the ones used.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import triton_python_backend_utils as pb_utils  # noqa: F401  (provided by the python backend)

from f5_triton.cache import bound_key, cache_from_config
from f5_triton.errors import InvalidInputError
from f5_triton.serving import triton_io, wire
from f5_triton.serving.metrics import cache_observer

INPUT_NAMES = tuple(f.name for f in wire.JOB_FIELDS) + (triton_io.RECEIVED_AT, wire.OUTPUT_KEY)


class TritonPythonModel(triton_io.Adapter):
    standby_loads = False  # the standby holds the model up while a dead instance is replaced

    def load(self, args):
        from f5_triton.guards import check_finite  # torch: not imported by the standby (41 MiB RSS, not 670)
        from f5_triton.serving import factories

        self.factories, self.check_finite = factories, check_finite
        settings, device = self.settings, triton_io.device(args)
        self.flow_matching = self.factories.load_flow_matcher(settings, device)
        self.vocoder = self.factories.load_flow_vocoder(settings, device)  # None: postprocess calls the `vocoder` model
        self.factories.warm_up(settings, self.flow_matching, self.vocoder, name=self.name)
        self.limits = settings.limits
        # read from the loaded model (the DiT, or an engine runner: `sampler.StepModel.config`), not the vocab file
        self.vocab_size = self.flow_matching.model.config.text_num_embeds
        self.output_cache = cache_from_config(settings.caches, "output", cache_observer(self.name, "output"))

    def execute(self, requests):
        jobs, owners, starts, keys = [], [], [], {}
        responses = [None] * len(requests)
        for index, request in enumerate(requests):
            starts.append(None)
            try:
                arrays = triton_io.inputs(request, INPUT_NAMES)
                starts[index] = triton_io.received_at(arrays.pop(triton_io.RECEIVED_AT))
                key = wire.unpack_output_key(arrays.pop(wire.OUTPUT_KEY))
                if key is not None and self.output_cache.enabled:
                    keys[index] = bound_key(key, arrays)
                    kept = self.output_cache.get(keys[index])
                    if kept is not None:
                        responses[index] = triton_io.response(kept)
                        continue
                try:
                    request_jobs = wire.unpack_jobs(arrays, index)
                except (TypeError, ValueError, IndexError) as exc:
                    raise InvalidInputError("flow_matching inputs", f"do not form jobs: {exc}", "bad_shape") from None
                self.factories.validate_jobs(request_jobs, self.limits, self.vocab_size)
            except Exception as exc:
                responses[index] = self.error(exc)
                continue
            jobs.extend(request_jobs)
            owners.extend([index] * len(request_jobs))
        if not jobs:
            return responses
        watch = triton_io.RequestWatch(requests, starts)
        try:
            mels = self.flow_matching(jobs, keep=lambda job: watch.alive(job.request_index))
        except Exception as exc:
            return [r or self.error(exc) for r in responses]
        finished = {}  # request index -> its chunk mels
        for index in sorted(set(owners)):
            own = [m for m, o in zip(mels, owners) if o == index]
            try:
                if any(m is None for m in own) or not watch.alive(index):
                    responses[index] = watch.error_response(index, self.metrics)
                else:
                    finished[index] = self.check_finite(own)
            except Exception as exc:
                responses[index] = self.error(exc)
        if self.vocoder is not None and finished:
            try:
                finished = self.factories.vocode_together(self.vocoder, finished)  # one call for the whole batch
            except Exception as exc:
                return [r or self.error(exc) for r in responses]
        pack = wire.pack_mels if self.vocoder is None else wire.pack_waves
        for index, own in finished.items():
            try:
                outputs = pack(own)
                responses[index] = triton_io.response(outputs)
                if index in keys:
                    self.output_cache.put(keys[index], outputs, sum(a.nbytes for a in outputs.values()))
            except Exception as exc:
                responses[index] = self.error(exc)
        return responses
