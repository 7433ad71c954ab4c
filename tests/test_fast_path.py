"""The fast path (kernels="auto", the default) off CUDA: attention through torch's
scaled_dot_product_attention instead of ops.py's eager definition, and fp32 linear layers through
oneDNN's matmul instead of F.linear. Not bit-equal to the reference (the fused kernels sum in
another order), so measured against transformers' eager models and float64:
- each linear product at real shapes against float64, next to F.linear's own error;
- attention alone against the definition, at the real shapes (729 tokens at head_dim 72, 577 at
  64, GQA 7:1 and 8:1, decode against a long cache, left padding, a sliding window);
- every tiny family's logits of a left-padded batch with images, on the real positions, within
  the parity tests' fp32 tolerance (1e-5 relative), and every padding position finite;
- greedy generation token for token, which runs the decode path against a growing KV cache.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from test_generation import hf_generate
from test_vlm import FP32_TOL, batch, rel_err

import minivlm
from minivlm import ops
from minivlm.bench.tiny.models import TEXT_CONFIGS, VLM_CONFIGS, build_text_model, build_vlm_model, save_checkpoint
from minivlm.connector import build_connector

SHAPES = [  # (batch, heads, kv_heads, q_len, kv_len, head_dim, causal, window)
    (1, 16, 16, 729, 729, 72, False, None),  # SigLIP so400m
    (2, 16, 16, 577, 577, 64, False, None),  # CLIP-L/14 at 336
    (2, 14, 2, 61, 61, 64, True, None),  # GQA 7:1, prefill
    (1, 32, 4, 1, 4097, 128, True, None),  # GQA 8:1, one decode step against a long cache
    (2, 8, 8, 1, 65, 80, True, 16),  # a sliding-window decode step
    (2, 4, 2, 33, 33, 128, True, 8),  # a sliding-window prefill
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_attention_equals_the_definition(shape, dtype):
    b, heads, kv_heads, q_len, kv_len, head_dim, causal, window = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, heads, q_len, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(b, kv_heads, kv_len, head_dim, generator=g).to(dtype) for _ in range(2))
    valid = torch.ones(b, kv_len, dtype=torch.bool)
    valid[-1, : kv_len // 3] = False  # a left-padded row: its first queries see no key at all
    args = dict(causal=causal, q_offset=kv_len - q_len, kv_valid=valid if causal else None, window=window)
    fast = ops.sdpa_attention(q, k, v, **args)
    definition = ops.attention(q, k, v, **args, kernels="off")
    exact = ops.attention(q.double(), k.double(), v.double(), **args, kernels="off")
    assert fast.isfinite().all()  # a query that sees no key (padding) too: its value is not used
    seen = exact.isfinite().all(dim=-1)  # the rest, against float64 (where such a row is NaN)
    if dtype == torch.float32:  # the parity tests' tolerance; the definition itself is within ~1e-6
        assert rel_err(fast[seen], exact[seen]) < FP32_TOL
    else:  # no further from the exact result than the definition itself, up to one bf16 unit (2^-8)
        assert rel_err(fast[seen], exact[seen]) <= 2 * rel_err(definition[seen], exact[seen]) + 2**-8


@pytest.fixture(autouse=True)
def fast_path(monkeypatch):
    monkeypatch.setenv("MINIVLM_KERNELS", "auto")  # the suite runs the reference unless told (conftest.py)


def vlm_matches_transformers(name: str, folder, kernels: str) -> None:
    """The tiny `name` VLM on the path `kernels` against transformers' eager model: the logits of a
    left-padded batch with images on its real positions (fp32 tolerance), every position finite,
    and greedy generation token for token."""
    hf = build_vlm_model(name)
    model = minivlm.load_model(save_checkpoint(hf, folder, layout="hub"))
    assert model.kernels == kernels
    ids, mask, inputs, _ = batch(name, hf, [2, 1])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions, **inputs).logits
        ours = model(ids, attention_mask=mask, **inputs)
    real = mask.bool()
    assert rel_err(ours[real], theirs[real]) < FP32_TOL
    assert ours.isfinite().all()  # the padding positions too
    one_ids, one_mask, one_inputs, _ = batch(name, hf, [1])
    expected = hf_generate(hf, one_ids, one_mask, None, 0, **one_inputs)
    got = minivlm.generate(model, one_ids, one_mask, max_new_tokens=expected.shape[1], **one_inputs)
    assert torch.equal(got, expected)


def text_model_matches_transformers(name: str, folder, kernels: str) -> None:
    """As vlm_matches_transformers, for the tiny text model `name`."""
    hf = build_text_model(name)
    model = minivlm.load_model(save_checkpoint(hf, folder, layout="hub"))
    assert model.kernels == kernels
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (2, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row (Mistral's window of 5 and Qwen2's of 4 slide past it)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ours = model(ids, attention_mask=mask)
    real = mask.bool()
    assert rel_err(ours[real], theirs[real]) < FP32_TOL
    assert ours.isfinite().all()
    expected = hf_generate(hf, ids, mask, None, 0)
    assert torch.equal(minivlm.generate(model, ids, mask, max_new_tokens=expected.shape[1]), expected)


@pytest.mark.parametrize("name", sorted(VLM_CONFIGS))
def test_vlm_on_the_fast_path_matches_transformers(name, tmp_path):
    vlm_matches_transformers(name, tmp_path, "auto")


@pytest.mark.parametrize("name", sorted(TEXT_CONFIGS))
def test_text_model_on_the_fast_path_matches_transformers(name, tmp_path):
    text_model_matches_transformers(name, tmp_path, "auto")


def test_the_reference_path_is_the_definition(tmp_path, monkeypatch):
    """kernels="off" never reaches torch's SDPA nor oneDNN's matmul (so the parity tests measure
    the definition)."""
    monkeypatch.setattr(ops, "sdpa_attention", lambda *a, **k: pytest.fail("the reference ran SDPA"))
    monkeypatch.setattr(ops, "_onednn_fits", lambda *a, **k: pytest.fail("the reference asked for oneDNN"))
    model = minivlm.load_model(save_checkpoint(build_text_model("llama"), tmp_path, layout="hub"), kernels="off")
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))


def test_a_module_swapped_into_a_loaded_model_takes_its_path(tmp_path):
    """A connector assigned to a loaded model (the README's recipe, notebook 5) runs the path the
    model was loaded with, not the class default, as the modules built with the model do."""
    folder = save_checkpoint(build_vlm_model("llava_interleave"), tmp_path, layout="hub")
    for choice in ("off", "auto"):
        model = minivlm.load_model(folder, kernels=choice)
        model.multi_modal_projector = build_connector(model.config.connector)
        assert {m.kernels for m in model.modules() if hasattr(m, "kernels")} == {choice}


def test_an_eager_decode_step_reads_only_the_filled_slots(tmp_path, monkeypatch):
    """The eager fast path's decode step attends over the slots filled so far (KVCache.reach), not
    the whole cache made for max_new_tokens, so a long max_new_tokens does not slow every step; the
    tokens stay transformers' (a left-padded row and a sliding window cut with the cache)."""
    hf = build_text_model("qwen2")  # a sliding window of 4
    model = minivlm.load_model(save_checkpoint(hf, tmp_path, layout="hub"))
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    read, attend = [], ops.decode_attention

    def recording(q, k_cache, v_cache, slot, **kwargs):
        read.append((k_cache.shape[2], int(slot)))
        return attend(q, k_cache, v_cache, slot, **kwargs)

    monkeypatch.setattr(ops, "decode_attention", recording)
    expected = hf_generate(hf, ids, mask, None, 0)
    new = expected.shape[1]
    assert torch.equal(minivlm.generate(model, ids, mask, max_new_tokens=new), expected)
    assert len(read) == model.config.num_layers * (new - 1)  # the first token comes from the prefill
    assert all(length == slot + 1 for length, slot in read)  # up to and including the new token's slot
    assert max(length for length, _ in read) == ids.shape[1] + new - 1  # the cache holds one slot more


LINEAR_SHAPES = [  # (rows of x, in, out), the products a real model runs
    (1, 896, 4864),  # Qwen2-0.5B's gate/up_proj, one decode step
    (1, 4864, 896),  # its down_proj
    (3, 896, 151646 // 16),  # a batch of three decode steps through a slice of its lm_head
    (729, 1152, 4304),  # SigLIP so400m's fc1 over one image
    (61, 4096, 1024),  # Llama-3-8B's k_proj over a prefill (GQA 8:1)
]


@pytest.mark.skipif(not ops._ONEDNN, reason="this torch has no oneDNN matmul")
@pytest.mark.parametrize("rows,fan_in,fan_out", LINEAR_SHAPES, ids=str)
def test_the_fast_linear_is_onednn_and_fp32_exact(rows, fan_in, fan_out):
    """fp32 on the CPU: the fast path's product is oneDNN's, the reference's is F.linear (MKL).
    Against the float64 product both are fp32 rounding: a relative error (of the whole output's
    norm) of a few float32 ulps (2^-23 = 1.2e-7). Measured here: oneDNN 1.4-4.1e-7, MKL 1.8-4.5e-7;
    a product computed in bf16 would be near 4e-3."""
    g = torch.Generator().manual_seed(rows + fan_in)
    x = torch.randn(rows, fan_in, generator=g)
    weight = torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5
    bias = torch.randn(fan_out, generator=g)
    exact = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    fast, reference = ops.linear(x, weight, bias, "auto"), ops.linear(x, weight, bias, "off")
    assert torch.equal(reference, torch.nn.functional.linear(x, weight, bias))
    assert torch.equal(fast, torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""))
    fast_err, reference_err = ((out.double() - exact).norm() / exact.norm() for out in (fast, reference))
    assert fast_err < 1e-6 and reference_err < 1e-6, (fast_err, reference_err)


@pytest.mark.skipif(not ops._ONEDNN, reason="this torch has no oneDNN matmul")
def test_what_only_f_linear_honours_stays_with_f_linear():
    """Products oneDNN would get wrong or that would lose something there take F.linear, equal to
    it bit for bit (each is large enough for oneDNN otherwise): a bias with strides (oneDNN reads one
    contiguous row), mismatched shapes (F.linear's error, not oneDNN's), autocast, forward-mode AD,
    jit tracing, oneDNN switched off."""
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(8, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    f_linear = torch.nn.functional.linear
    with torch.no_grad():
        assert not torch.equal(ops.linear(x, weight), f_linear(x, weight))  # oneDNN's, as a control
        for bias in (torch.randn(2048, generator=g)[::2], torch.randn(1, generator=g).expand(1024)):
            assert torch.equal(ops.linear(x, weight, bias), f_linear(x, weight, bias))
        with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
            ops.linear(x[:, :512], weight)
        with torch.autocast("cpu", torch.bfloat16):
            assert ops.linear(x, weight).dtype == torch.bfloat16
        with torch.backends.mkldnn.flags(enabled=False):
            assert torch.equal(ops.linear(x, weight), f_linear(x, weight))
        layer = ops.Linear(1024, 1024)
        traced = torch.jit.trace(layer, (x,))
        assert torch.equal(traced(x), f_linear(x, layer.weight, layer.bias))
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(ops.linear(forward_ad.make_dual(x, torch.ones_like(x)), weight)).tangent
    assert tangent is not None and torch.allclose(tangent, f_linear(torch.ones_like(x), weight))


def test_setting_a_models_kernels_switches_every_module(tmp_path):
    """`model.kernels = "off"` hands the choice to every module (and checks it); add_module adopts
    the model's path as assignment does."""
    model = minivlm.load_model(save_checkpoint(build_text_model("llama"), tmp_path, layout="hub"), kernels="auto")
    model.kernels = "off"
    assert {m.kernels for m in model.modules() if hasattr(m, "kernels")} == {"off"}
    model.add_module("extra", ops.Linear(4, 4))
    assert model.extra.kernels == "off"
    with pytest.raises(ops.KernelsError, match="expected auto"):
        model.kernels = "fast"


def test_a_small_product_stays_with_f_linear():
    """oneDNN's call costs more than a product under ops.ONEDNN_MIN_MACS multiply-adds takes."""
    x, weight = torch.randn(1, 256), torch.randn(512, 256)  # 131,072 multiply-adds
    with torch.no_grad():
        assert torch.equal(ops.linear(x, weight, None, "auto"), torch.nn.functional.linear(x, weight))


@pytest.mark.skipif(not ops._ONEDNN, reason="this torch has no oneDNN matmul")
def test_the_fast_linear_leaves_training_bf16_and_compile_as_they_were():
    """Where autograd records (the op has no backward of its own) and in bf16 (F.linear already
    goes to oneDNN), the product is F.linear's; compiled, it stays oneDNN's, in one graph."""
    layer = ops.Linear(256, 512)  # 10 rows x 256 x 512: past ops.ONEDNN_MIN_MACS
    x = torch.randn(2, 5, 256)
    trained = layer(x.requires_grad_())
    assert torch.equal(trained, torch.nn.functional.linear(x, layer.weight, layer.bias))
    trained.sum().backward()
    assert torch.equal(layer.weight.grad, torch.ones(512, 10) @ x.detach().reshape(10, 256))
    half = ops.Linear(256, 512).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(half(x.bfloat16()), torch.nn.functional.linear(x.bfloat16(), half.weight, half.bias))
        eager = layer(x)
        assert torch.equal(eager, torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], ""))
        explained = torch._dynamo.explain(layer)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        assert torch.equal(torch.compile(layer)(x), eager)
