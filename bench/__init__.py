"""`python -m bench`: end-to-end latency and throughput against diffusers, and the kernels (`ops`)."""
