"""Bridges to the tools users already have: Hugging Face transformers (``hf``) and
lm-evaluation-harness (``lm_eval``). Each needs its optional extra
(``pip install memlayers[hf]`` / ``memlayers[eval]``) and is imported on demand."""
