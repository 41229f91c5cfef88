#!/usr/bin/env python3
"""Export the F5-TTS DiT step and the Vocos vocoder to ONNX, verified against torch with onnxruntime.

    python scripts/export_onnx.py --ckpt-dir ckpts/F5TTS_v1_Base --output-dir onnx [--fp16] [--opset 17]
    python scripts/export_onnx.py --ckpt model.safetensors --vocab vocab.txt --vocoder vocos/ --output-dir onnx

Writes OUTPUT/dit_step.onnx and OUTPUT/vocoder.onnx (fp32; with --fp16 also *.fp16.onnx, fp16 weights
with fp32 inputs/outputs) and OUTPUT/export_info.json with input/output names, shapes and the max abs
error of each file vs torch fp32, measured on padded batches of several sizes and lengths.
The text embedding is not exported: it runs once per request, in torch.
Build strongly typed TensorRT engines from them with scripts/build_engines.py: fp16 plans from the
*.fp16.onnx files (--onnx-suffix .fp16), fp32 plans from the fp32 files.
"""

import argparse
import sys

from f5_triton.errors import CheckpointError, InvalidInputError
from f5_triton.model_paths import add_model_args, resolve_model_paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--output-dir", required=True, help="folder for the .onnx files and export_info.json")
    parser.add_argument("--fp16", action="store_true", help="also write fp16-weight files (*.fp16.onnx)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default 17)")
    parser.add_argument("--exporter", default="auto", choices=["auto", "legacy", "dynamo"],
                        help="torch exporter; auto tries the legacy (TorchScript) one first, then dynamo")
    parser.add_argument("--networks", nargs="+", default=["dit_step", "vocoder"], choices=["dit_step", "vocoder"])
    args = parser.parse_args()

    from f5_triton.export.onnx_export import ExportError, export_checkpoint

    try:
        ckpt, vocab, vocoder = resolve_model_paths(args)
        export_checkpoint(ckpt, vocab, vocoder, args.output_dir, networks=args.networks, arch=args.arch,
                          fp16=args.fp16, opset=args.opset, exporter=args.exporter)
    except (InvalidInputError, CheckpointError, ExportError, ValueError) as exc:
        print(f"export_onnx: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
