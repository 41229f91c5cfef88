"""Triton adapter: validate a request and prepare its flow-matching jobs (f5_triton.pipeline.Preprocessor), with
the key flow_matching's output cache keeps them under (f5_triton.cache.request_output_key; empty without a seed)."""

import os
import sys

# The python backend stub starts its interpreter in isolated mode, which ignores PYTHONPATH: restore it
# before any import, so packages installed only on PYTHONPATH (and their versions) are the ones used.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import time

import numpy as np

from f5_triton.cache import REFERENCE_CACHE_DEFAULTS, cache_from_params, request_output_key
from f5_triton.pipeline import Preprocessor
from f5_triton.request import INPUTS
from f5_triton.serving import factories, triton_io, wire
from f5_triton.serving.metrics import Metrics, cache_observer
from f5_triton.text import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        params = triton_io.parameters(args)
        triton_io.set_torch_threads(params)
        self.preprocess = Preprocessor(Tokenizer(params["vocab"]), factories.limits_from_params(params),
                                       cache=cache_from_params(params, "reference", REFERENCE_CACHE_DEFAULTS,
                                                               cache_observer(args["model_name"], "reference")))
        self.sampling = factories.sampling_from_params(params)
        self.metrics = Metrics(args["model_name"])

    def execute(self, requests):
        received_at = np.array([time.time()], dtype=np.float64)  # deadlines and the RTF count from here
        responses = []
        for request in requests:
            try:
                synthesis = factories.request_from_inputs(triton_io.inputs(request, [f.name for f in INPUTS]),
                                                       self.sampling, self.preprocess.limits)
                arrays = wire.pack_prepared(self.preprocess(synthesis))
                key = wire.pack_output_key(request_output_key(synthesis, chunking="offline"))
                responses.append(triton_io.response({**arrays, wire.OUTPUT_KEY: key, triton_io.RECEIVED_AT: received_at}))
            except Exception as exc:
                responses.append(triton_io.error_response(exc, self.metrics))
        return responses
