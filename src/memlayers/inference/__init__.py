"""Serving memory models: quantized value tables (``memlayers quantize``)."""
