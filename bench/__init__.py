"""`python -m bench`: throughput and latency against the alternatives. Not built yet: see the README."""
