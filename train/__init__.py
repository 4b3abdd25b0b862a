"""The IPAdapter-Instruct trainer. Not built yet: see the README."""
