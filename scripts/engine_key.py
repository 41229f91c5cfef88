#!/usr/bin/env python3
"""Print the engine-cache key of this machine: GPU model, compute capability and TensorRT version.

    python scripts/engine_key.py            ->  NVIDIA_H100_80GB_HBM3-sm90-trt10.8.0.43

TensorRT plans run only on the GPU model and TensorRT version they were built with, so run.sh, the
container entrypoint and the Kubernetes init container cache them under this key: nodes with
different GPUs share one volume without loading each other's engines. `--device N` picks the GPU.
"""

from __future__ import annotations

import argparse
import re
import sys


def engine_key(device: int = 0) -> str:
    """`<gpu name>-sm<major><minor>-trt<version>`, with anything but [A-Za-z0-9._] turned into `_`."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU visible: TensorRT engines are built and cached per GPU model")
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    try:
        import tensorrt

        trt = tensorrt.__version__
    except Exception:  # no TensorRT: the key still names the GPU; the build itself will say what is missing
        trt = "none"
    return re.sub(r"[^A-Za-z0-9._]+", "_", f"{name}") + f"-sm{major}{minor}-trt{trt}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=int, default=0, help="CUDA device index")
    args = parser.parse_args()
    try:
        print(engine_key(args.device))
    except RuntimeError as exc:
        print(f"engine_key: error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
