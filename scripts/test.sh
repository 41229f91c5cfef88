#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite (real tritonserver included).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bash scripts/setup_env.sh dev || exit 1
# -rs: say why tests skipped; two xdist workers (one per core: much of a test's time is waiting on servers and
# subprocesses), a file's tests in one worker, so that its module's and the session's servers start once per worker;
# PYTEST_WORKERS=0 runs them in this process
.venv/bin/python -m pytest -q -rs -p no:cacheprovider --timeout=900 -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
status=$?
if [ "$status" -eq 5 ]; then  # pytest: no tests collected
  echo "pytest collected no tests (exit 5): nothing ran"; exit 0
fi
exit "$status"
