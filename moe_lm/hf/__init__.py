"""Hugging Face interop: convert to/from transformers Mixtral, export and import folders, model cards,
Hub push.

Modules import transformers and huggingface_hub lazily (inside functions) where they can, so
`moe-lm` commands that never touch them stay fast to start.
"""
