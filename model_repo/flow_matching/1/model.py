"""Triton adapter: flow matching for a dynamic batch of requests (f5_triton.pipeline.FlowMatcher)."""

import triton_python_backend_utils as pb_utils  # noqa: F401  (provided by the python backend)

from f5_triton.serving import triton_io, wire
from f5_triton.serving.stages import check_finite, load_flow_matcher

INPUT_NAMES = ("ref_mel", "ref_frames", "tokens", "durations", "seeds", "sampling")


class TritonPythonModel:
    def initialize(self, args):
        self.flow_matching = load_flow_matcher(triton_io.parameters(args), triton_io.device(args))

    def execute(self, requests):
        jobs, owners = [], []
        responses = [None] * len(requests)
        for index, request in enumerate(requests):
            try:
                request_jobs = wire.unpack_jobs(triton_io.inputs(request, INPUT_NAMES), index)
            except Exception as exc:
                responses[index] = triton_io.error_response(exc)
                continue
            jobs.extend(request_jobs)
            owners.extend([index] * len(request_jobs))
        if jobs:
            try:
                mels = self.flow_matching(jobs)
            except Exception as exc:
                return [r or triton_io.error_response(exc) for r in responses]
            for index in sorted(set(owners)):
                own = [m for m, o in zip(mels, owners) if o == index]
                try:
                    responses[index] = triton_io.response(wire.pack_mels(check_finite(own)))
                except Exception as exc:
                    responses[index] = triton_io.error_response(exc)
        return responses
