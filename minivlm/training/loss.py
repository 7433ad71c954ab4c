"""The training loss, as transformers computes it for a causal LM (`ForCausalLMLoss`).

The logits at position t predict the token at t + 1, so the labels are shifted one to the left
(the last position predicts nothing); positions labelled IGNORE (-100: the prompt, the image
tokens, padding) are skipped, and the cross-entropy is taken in fp32 and averaged over the rest.

One difference in the order of work, none in the numbers: transformers computes the logits of
every position and then drops the ignored ones; here only the hidden states of the labelled
positions go through `lm_head`. With a 150k-token vocabulary and a prompt of 3,000 image tokens
that is the difference between a (3000 x 150k) fp32 tensor and one of the answer's length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .labels import IGNORE


def _parts(model):
    """(a function from the inputs to the last hidden states, the output projection)."""
    head = model.language_model.lm_head if hasattr(model, "language_model") else model.lm_head
    return model.hidden, head


def loss_sum(model, input_ids, labels, attention_mask=None, **image_inputs) -> tuple[torch.Tensor, int]:
    """(the summed cross-entropy of the labelled next tokens, how many there are). A batch that is
    one part of a larger one (gradient accumulation, data-parallel ranks) divides by the whole's
    count, so that the mean is over tokens, not over parts."""
    if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels has shape {shape}; expected the shape of input_ids {tuple(input_ids.shape)}")
    if labels.is_floating_point():
        raise TypeError(f"labels are {labels.dtype}; expected integer token ids, {IGNORE} where nothing is learned")
    hidden_of, head = _parts(model)
    hidden = hidden_of(input_ids, attention_mask, **image_inputs)  # (batch, seq, hidden)
    targets = labels[:, 1:]  # (batch, seq - 1): the token each position predicts
    learned = targets != IGNORE  # as transformers: padding is learned unless labelled IGNORE (collate does)
    vocab = head.out_features
    chosen = targets[learned]
    if bool(((chosen < 0) | (chosen >= vocab)).any()):
        bad = chosen[(chosen < 0) | (chosen >= vocab)][0]
        raise ValueError(f"labels hold the id {int(bad)}; expected ids 0 to {vocab - 1}, or {IGNORE} to skip")
    logits = head(hidden[:, :-1][learned]).float()  # (learned tokens, vocab)
    return F.cross_entropy(logits, chosen, reduction="sum"), int(learned.sum())


def loss(model, input_ids, labels, attention_mask=None, **image_inputs) -> torch.Tensor:
    """The mean cross-entropy of the labelled next tokens: transformers' `model(**inputs,
    labels=labels).loss`. labels (batch, seq) are token ids, IGNORE (-100) where nothing is learned
    (`training.labels.conversation_inputs` builds them); image_inputs are the processor's pixel
    inputs (pixel_values, image_sizes, pixel_attention_mask)."""
    total, count = loss_sum(model, input_ids, labels, attention_mask, **image_inputs)
    if count == 0:
        raise ValueError(f"every label after the first is {IGNORE}: no token to learn, so no mean to take")
    return total / count
