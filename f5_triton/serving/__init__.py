"""What runs inside tritonserver's python backend: the adapters' base and glue (`triton_io`), the pipeline objects a
model builds from its parameters (`factories`), tensors between the steps (`wire`), metrics. The repository these
models are rendered into is build time: `f5_triton.repository`."""
