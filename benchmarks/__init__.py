"""Benchmark and soak support for benchmark.py, scripts/ and the tests: tools that use the package, not part of it
(run from the checkout: benchmark.py and `python -m pytest` have it on their path; scripts/ put the checkout there)."""
