"""Models: loading, LoRA, processors and collation, export, and the tiny test model.

- ``tiny``: a randomly initialised Qwen2.5-VL-shaped model with a locally trained
  tokenizer, saved as an ordinary Hugging Face directory (``build_tiny_model``).

Submodules import torch and transformers; import them directly (``from
mmrad.model.tiny import build_tiny_model``) so that ``import mmrad.model`` stays cheap.
"""
