"""Datasets: the i-CLEVR reader and cache, and the embedded procedural renderer."""
