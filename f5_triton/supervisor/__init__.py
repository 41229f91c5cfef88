"""The tritonserver supervisor: where the binary is (``install``), the process and its admin API
(``server``), replacement of dead python-backend stubs (``watchdog``), and ``f5-triton serve`` / ``stop``
as a service (``service``). Nothing here imports the pipeline or the model."""
