"""The serving engine's running batch (minivlm/serving/batch.py): requests join and leave at decode
step boundaries, and each row's greedy tokens are the tokens `generate_steps` gives it alone.

The schedule below makes every case of the layout happen: a row joins with a prompt longer than
the columns the running rows use (the batch's slot moves right), a short one joins (it is left-
padded), the first row leaves (the columns only it used are cut), a row joins after that, and rows
run past a sliding window (qwen2_window: 4, mistral: 5) that now starts at a different slot per
row. Both of the model's paths run it: the fast path's decode_step and the reference forward.
The slots no row has written hold large values, not zeros, so a read of one that the mask should
hide changes the tokens.
"""

from __future__ import annotations

import pytest
import torch

import minivlm
from minivlm.bench.tiny.models import build_text_model, save_checkpoint
from minivlm.generation import Sampling, StopRules, generate_steps
from minivlm.generation_checks import new_cache
from minivlm.serving import batch as running
from minivlm.serving.batch import RunningBatch


class Row:
    """What the batch reads of a request (the engine's Job has the same fields)."""

    def __init__(self, prompt: torch.Tensor, max_tokens: int):
        self.prompt, self.max_tokens, self.count, self.tokens = prompt, max_tokens, 0, []

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.shape[1]

    def key(self) -> tuple:
        return ("greedy",)


def alone(model, row: Row) -> list[int]:
    """The row's tokens from generate_steps alone, through the end token (the batch does not stop)."""
    with torch.inference_mode():
        steps = generate_steps(model, row.prompt, max_new_tokens=row.max_tokens, stop=StopRules(set()))
        return [int(t) for t, _ in steps]


# (step at which the row joins, prompt length, tokens to generate); rows joining at the same step
# are prefilled together, left-padded
SCHEDULE = [(0, 6, 9), (2, 17, 12), (3, 3, 7), (3, 11, 5), (10, 9, 8), (11, 4, 1)]


def prompts(rows: list[Row]) -> dict:
    """The rows' prompts left-padded into one batch, as the engine collates them."""
    width = max(r.prompt_tokens for r in rows)
    ids = torch.cat([torch.nn.functional.pad(r.prompt, (width - r.prompt_tokens, 0)) for r in rows])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(r.prompt), (width - r.prompt_tokens, 0)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def loud_cache(*args, **kwargs):
    cache = new_cache(*args, **kwargs)
    for tensor in (*cache.keys, *cache.values):
        tensor.fill_(30.0)
    return cache


@pytest.mark.parametrize("kernels", ["auto", "off"], ids=["fast", "reference"])
@pytest.mark.parametrize("name", ["llama3", "qwen2_window", "mistral"])
def test_rows_that_join_and_leave_get_their_tokens_alone(name, kernels, tmp_path, monkeypatch):
    monkeypatch.setattr(running, "new_cache", loud_cache)
    model = minivlm.load_model(save_checkpoint(build_text_model(name), tmp_path, layout="hub"), kernels=kernels)
    g = torch.Generator().manual_seed(1)
    rows = [Row(torch.randint(0, 200, (1, n), generator=g), new) for _, n, new in SCHEDULE]
    batch = RunningBatch(model, ("greedy",), Sampling(), None, context=64)
    shapes = []  # (rows, cache slots) after each step: the layout did grow and shrink
    with torch.inference_mode():
        for step in range(40):
            joining = [row for (at, _, _), row in zip(SCHEDULE, rows) if at == step]
            if joining:
                assert batch.room_for(joining)
                for row, token in zip(joining, batch.join(joining, prompts(joining)).tolist()):
                    row.tokens.append(token)
                    row.count = 1
            batch.leave([i for i, r in enumerate(batch.rows) if r.count >= r.max_tokens])
            if not batch:
                break
            for r, token in zip(batch.rows, batch.step().tolist()):
                r.tokens.append(token)
                r.count += 1
            shapes.append((len(batch), batch.cache.max_len))
    assert not batch and step > 11
    for row in rows:
        assert row.tokens == alone(model, row)
    assert max(n for n, _ in shapes) == 4  # four rows decoded together at most: rows left between joins
    assert any(a[1] > b[1] for a, b in zip(shapes, shapes[1:]))  # a leaving row cut the cache


def test_room_for_keeps_to_the_context(tmp_path):
    model = minivlm.load_model(save_checkpoint(build_text_model("llama3"), tmp_path, layout="hub"))
    batch = RunningBatch(model, ("greedy",), Sampling(), None, context=40)
    first = Row(torch.zeros(1, 30, dtype=torch.long), 10)
    with torch.inference_mode():
        batch.join([first], prompts([first]))
    first.count = 1
    # 30 slots in use, and the cache stays within the context's 40: a joining row's first token
    # comes from its prefill, so one that asks for 11 needs 10 more slots and fits; 12 would not.
    assert batch.room_for([Row(torch.zeros(1, 5, dtype=torch.long), 11)])
    assert not batch.room_for([Row(torch.zeros(1, 5, dtype=torch.long), 12)])
    assert not batch.room_for(
        [Row(torch.zeros(1, 5, dtype=torch.long), 11), Row(torch.zeros(1, 31, dtype=torch.long), 2)]
    )
    assert not batch.room_for([type("Sampled", (Row,), {"key": lambda self: ("sample", 1.0, 1.0)})(first.prompt, 2)])
