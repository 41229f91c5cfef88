"""Exporting the networks: ONNX files (`onnx_export`) and TensorRT plans built from them (`tensorrt_build`)."""
