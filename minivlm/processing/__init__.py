"""Pixels and text in, model inputs out. Knows nothing of the models (imports no minivlm module outside it)."""
