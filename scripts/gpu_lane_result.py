#!/usr/bin/env python3
"""One GPU-lane part's result (scripts/gpu_lane.sh): OUT/gpu-lane-PART.json and a row for docs/benchmarks.md.

    python scripts/gpu_lane_result.py PART JUNIT_XML ALLOWED_SKIPS_REGEX OUT

Reads pytest's JUnit XML: every test passed, failed or skipped (with its reason). A skip whose reason does not match
ALLOWED_SKIPS (hardware the machine lacks) counts as a failure. Adds the date, the card (torch and nvidia-smi), the
commit (GPU_LANE_COMMIT, else git) and OUT/figures.json (the tests' figures). Exit 1 on any failure or no test.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def outcomes(xml_path: Path) -> list[dict]:
    rows = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if problem is not None:
            rows.append({"test": name, "outcome": "failed", "message": (problem.get("message") or "")[:500]})
        elif skipped is not None:
            rows.append({"test": name, "outcome": "skipped", "message": skipped.get("message") or ""})
        else:
            rows.append({"test": name, "outcome": "passed", "seconds": float(case.get("time") or 0)})
    return rows


def command(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def card() -> str:
    try:
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    except ImportError:
        name = "no torch"
    smi = command("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader")
    return f"{name} ({smi})" if smi else name


def main() -> int:
    part, xml_path, allowed, out = sys.argv[1], Path(sys.argv[2]), re.compile(sys.argv[3]), Path(sys.argv[4])
    tests = outcomes(xml_path) if xml_path.exists() else []
    for row in tests:
        if row["outcome"] == "skipped" and not allowed.search(row["message"]):
            row["outcome"] = "failed"
            row["message"] = f"skipped, and not for hardware this machine lacks: {row['message']}"
    figures = out / "figures.json"
    result = {"part": part, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "card": card(), "commit": os.environ.get("GPU_LANE_COMMIT") or command("git", "rev-parse", "HEAD")
              or "unknown (no git here: set GPU_LANE_COMMIT)",
              "passed": sum(t["outcome"] == "passed" for t in tests),
              "failed": sum(t["outcome"] == "failed" for t in tests),
              "skipped": sum(t["outcome"] == "skipped" for t in tests), "tests": tests,
              "figures": json.loads(figures.read_text()) if figures.exists() else {}}
    ok = bool(tests) and result["failed"] == 0
    result["result"] = "pass" if ok else "FAIL"
    (out / f"gpu-lane-{part}.json").write_text(json.dumps(result, indent=1))
    for row in tests:
        if row["outcome"] != "passed":
            print(f"  {row['outcome']}: {row['test']}: {row['message']}")
    print(f"GPU lane | {result['date'][:10]} | {result['card']} | {result['commit'][:12]} | {part}: "
          f"{result['result']} ({result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped "
          f"for hardware) | {json.dumps(result['figures'])}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
