"""Triton adapter: validate a request and prepare its flow-matching jobs (f5_triton.pipeline.Preprocessor), with
the key flow_matching's output cache keeps them under (f5_triton.cache.request_output_key; empty without a seed)."""

import os
import sys

# The python backend stub starts its interpreter in isolated mode, which ignores PYTHONPATH: restore it
# before any import, so packages installed only on PYTHONPATH (and their versions) are the ones used.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import time

import numpy as np

from f5_triton.cache import cache_from_config, request_output_key
from f5_triton.pipeline import Preprocessor
from f5_triton.request import INPUTS
from f5_triton.serving import factories, triton_io, wire
from f5_triton.serving.metrics import cache_observer
from f5_triton.text import Tokenizer


class TritonPythonModel(triton_io.Adapter):
    def load(self, args):
        settings = self.settings
        self.preprocess = Preprocessor(Tokenizer(settings.weights.vocab), settings.limits,
                                       cache=cache_from_config(settings.caches, "reference",
                                                               cache_observer(self.name, "reference")))
        self.sampling = settings.sampling

    def execute(self, requests):
        received_at = np.array([time.time()], dtype=np.float64)  # deadlines and the RTF count from here
        return self.answer_each(requests, lambda request: self.prepare(request, received_at))

    def prepare(self, request, received_at):
        synthesis = factories.request_from_inputs(triton_io.inputs(request, [f.name for f in INPUTS]), self.sampling,
                                                  self.preprocess.limits)
        arrays = wire.pack_prepared(self.preprocess(synthesis))
        key = wire.pack_output_key(request_output_key(synthesis, chunking="offline"))
        return triton_io.response({**arrays, wire.OUTPUT_KEY: key, triton_io.RECEIVED_AT: received_at})
