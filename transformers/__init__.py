"""Transformers: one module per type. Import ``transformers.registry`` to get them all.

Not Hugging Face's ``transformers`` library: this project never depends on it.
"""
