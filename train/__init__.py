"""`python -m train`: IPAdapter-Instruct weights from a manifest, on a frozen SD1.5 (see docs/training.md)."""
