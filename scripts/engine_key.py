#!/usr/bin/env python3
"""Print the engine-cache key of this machine: which plans built here can be reused, by GPU and TensorRT.

    python scripts/engine_key.py    ->  NVIDIA_H100_80GB_HBM3-sm90-trt10.8.0.43      (TensorRT)
                                    ->  portable-trtrtx1.7.1.116                     (TensorRT-RTX)

A TensorRT plan runs only on the GPU model and TensorRT version it was built with; a TensorRT-RTX plan
(built without a GPU target) runs with its TensorRT-RTX version on every GPU that TensorRT-RTX supports.
run.sh, the container entrypoint and the Kubernetes init container cache plans under this key: nodes
with different GPUs or TensorRT flavours share one volume without loading each other's engines.
`--device N` picks the GPU; $F5_TENSORRT (tensorrt | tensorrt-rtx) the flavour, as the build does.
"""

from __future__ import annotations

import argparse
import re
import sys


def engine_key(device: int = 0) -> str:
    """`<gpu name>-sm<major><minor>-trt<version>`, or `portable-trtrtx<version>` for TensorRT-RTX plans,
    with anything but [A-Za-z0-9._] turned into `_`."""
    from f5_triton.engines.base import EngineUnavailable
    from f5_triton.engines.tensorrt_engine import flavour_of, import_tensorrt

    try:
        trt = import_tensorrt()
    except EngineUnavailable:  # the key still names the GPU; the build itself will say what is missing
        trt = None
    if trt is not None and flavour_of(trt) == "tensorrt-rtx":
        return f"portable-trtrtx{trt.__version__}"
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU visible: TensorRT engines are built and cached per GPU model "
                           "(TensorRT-RTX builds portable plans without a GPU: pip install tensorrt-rtx)")
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    version = "none" if trt is None else trt.__version__
    return re.sub(r"[^A-Za-z0-9._]+", "_", f"{name}") + f"-sm{major}{minor}-trt{version}"


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
