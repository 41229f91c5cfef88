"""Imported first by the scripts that use `benchmarks/` (benchmark and soak support beside the package, not installed
with it): puts this checkout on the path. `python scripts/x.py` has only scripts/ there."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
