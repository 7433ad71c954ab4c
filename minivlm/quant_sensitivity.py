"""Which linear layers to leave in full precision: the layers a quantization would cover, ranked by
the error their quantized weights add to their outputs on calibration text.

A layer's quantized weight W + dW adds dW x to its output for each input x. Over the calibration
inputs, its mean squared size is about sum_ij dW_ij^2 E[x_j^2] (the diagonal of the inputs'
second moments; the cross terms are dropped, as the usual activation-aware proxies drop them).
That is what the layer adds to the residual stream, so layers are ranked by it as it is, not
relative to the layer's own output: a layer whose inputs carry a massive activation (one channel
hundreds of times the mean square of the others, as the down projection of SmolLM2-135M's layer
11 does) multiplies its weight error by it, and that layer moves the next token most. (The
output projection's error is on the logits, not the residual stream: ranked beside the decoder's
layers it compares unlike things, though it does come first on SmolLM2, as measured.) On that
model the ranking's first layer is also the one whose full precision lowers the mean KL most of
the 30 layers tried one at a time (BENCHMARKS.md, "Keeping sensitive layers").

    ids = torch.tensor(load_processor(path).tokenizer.encode(calibration_text()))
    ranking = rank(load_model(path), [w[None] for w in windows(ids, 256)[:16]], QuantConfig("int8"))
    model = load_model(path, quantize="int8", quantize_keep=[name for name, _ in ranking[:1]])
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .quant import ROWS_AT_ONCE, QuantConfig, QuantError, QuantLinear, quant_targets, quantize_weight


def calibration_text(path: str | None = None) -> str:
    """Text to calibrate (or score) on: a UTF-8 file, or else the docstrings of some of Python's
    standard library modules and their classes (English prose written by others, on every
    machine that runs Python)."""
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else (e.strerror or type(e).__name__)
            raise QuantError(f"corpus {path}: {reason}; expected a UTF-8 text file") from None
    import importlib
    import inspect

    names = ["argparse", "asyncio", "collections", "contextlib", "dataclasses", "email", "functools", "json",
             "logging", "pathlib", "subprocess", "threading", "typing", "unittest", "urllib.request"]  # fmt: skip
    docs = []
    for name in names:
        module = importlib.import_module(name)
        docs += [inspect.getdoc(module) or ""]
        docs += [inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(module) if inspect.isclass(obj)]
    return "\n\n".join(d for d in dict.fromkeys(docs) if len(d) > 200)


def windows(ids: torch.Tensor, length: int) -> list[torch.Tensor]:
    """Token ids (n,) -> the whole windows of `length` tokens, in order (the remainder dropped)."""
    return [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]


@torch.inference_mode()
def rank(model: nn.Module, batches: Iterable, config: QuantConfig) -> list[tuple[str, float]]:
    """The linear layers `config.parts` cover in an unquantized `model` (its `keep` ignored), each
    with the mean squared error per token that `config`'s quantization of its weight adds to its
    output on `batches` (token ids (batch, seq), or dicts of the model's keyword arguments), the
    largest first."""
    config = QuantConfig.parse(config)  # checked as load_model checks it
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise QuantError("rank takes the model loaded without quantize=: it quantizes each weight itself")
    targets = quant_targets(model, config.parts, check=True)
    squares: dict[str, torch.Tensor] = {}  # name -> sum over inputs of x^2, per input channel
    tokens: dict[str, int] = {}

    def record(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            squares[name] = squares.get(name, 0) + x.square().sum(dim=0)
            tokens[name] = tokens.get(name, 0) + x.shape[0]

        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in targets]
    try:
        for batch in batches:
            model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in hooks:
            h.remove()
    if not squares:
        raise QuantError("rank was given no calibration batches")
    unseen = [n for n in targets if n not in squares]
    if unseen:
        raise QuantError(f"the calibration inputs never reached {unseen[0]} ({len(unseen)} layers): "
                         "give inputs that do (images for the vision tower), or leave that part out")  # fmt: skip
    scores = [(name, output_error(model.get_submodule(name), squares[name] / tokens[name], config)) for name in targets]
    return sorted(scores, key=lambda s: -s[1])


def output_error(linear: nn.Linear, mean_square: torch.Tensor, config: QuantConfig) -> float:
    """sum_ij dW_ij^2 E[x_j^2] for this layer's weight under `config` (mean_square: E[x_j^2], (in,)).
    Rows are quantized independently, so they go a chunk at a time, as quantize_weight takes them."""
    total, dtype = 0.0, linear.weight.dtype  # scales are rounded to the model's dtype, as when loading
    for rows in linear.weight.detach().split(ROWS_AT_ONCE):  # cut first: no fp32 copy of the whole weight
        rows = rows.float()
        chunk = QuantLinear(linear.in_features, rows.shape[0], False, config.scheme, config.group_size, dtype)
        for key, value in quantize_weight(rows, config, dtype).items():
            setattr(chunk, key, value)
        total += ((chunk.dequantize(torch.float32) - rows).square() @ mean_square).sum().item()
    return total
