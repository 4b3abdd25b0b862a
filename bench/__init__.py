"""`python -m bench`: throughput and latency against the alternatives, in hardware units (`ops` built; `e2e` not yet)."""
