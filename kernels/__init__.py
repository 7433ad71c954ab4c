"""minivlm's Triton kernels, installed as `minivlm.kernels` (a top-level `kernels` would clobber
Hugging Face's `kernels` package, which transformers imports). This file imports without triton:
`minivlm.ops` checks for triton itself before it dispatches here."""
