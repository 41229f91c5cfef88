#!/usr/bin/env python3
"""Print the engine-cache key of this machine: which plans built here can be reused, by GPU and TensorRT.

    python scripts/engine_key.py    ->  NVIDIA_H100_80GB_HBM3-sm90-trt10.8.0.43      (TensorRT)
                                    ->  portable-trtrtx1.7.1.116                     (TensorRT-RTX)

A TensorRT plan runs only on the GPU model and TensorRT version it was built with; a TensorRT-RTX plan
(built without a GPU target) runs with its TensorRT-RTX version on every GPU that TensorRT-RTX supports.
run.sh (`f5-triton build engine-dir`), the container entrypoint and the Kubernetes init container cache
plans under this key (f5_triton.build.engine_key): nodes with different GPUs or TensorRT flavours share one
volume without loading each other's engines.
`--device N` picks the GPU; $F5_TENSORRT (tensorrt | tensorrt-rtx) the flavour, as the build does.
"""

from __future__ import annotations

import argparse
import sys

from f5_triton.build import BuildError, engine_key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=int, default=0, help="CUDA device index")
    args = parser.parse_args()
    try:
        print(engine_key(args.device))
    except BuildError as exc:
        print(f"engine_key: error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
