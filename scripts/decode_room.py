"""Decode speed against the room made for the answer: 64 greedy tokens with room for 80 and for
16384, attention over the filled slots (KVCache.reach, the eager fast path) against the whole
cache (a compiled step's static shape), in one process.

    python scripts/decode_room.py

A random Qwen2 decoder (hidden 512, 8 layers, GQA 8:2, vocabulary 8000), fp32, on the CPU; the
median [min-max] of 5 runs each.
"""

import statistics
import tempfile
import time

import torch
import transformers

import minivlm
from minivlm.decoder import KVCache
from minivlm.generation import generate_steps


def rate(model, ids, room: int) -> tuple[float, float, float]:
    runs = []
    for _ in range(5):
        steps = generate_steps(model, ids, torch.ones_like(ids), max_new_tokens=room)
        next(steps)  # the prefill and the first token, untimed
        start = time.perf_counter()
        for _ in range(64):
            next(steps)
        runs.append(64 / (time.perf_counter() - start))
        steps.close()
    return statistics.median(runs), min(runs), max(runs)


def main() -> None:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=8000, max_position_embeddings=32768,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
        model = minivlm.load_model(folder, kernels="auto")
    ids = torch.randint(0, config.vocab_size, (1, 16))
    for attention in ("filled slots", "whole cache"):
        if attention == "whole cache":  # what a compiled step reads: reach stays None
            KVCache.reach = property(lambda self: None, lambda self, value: None)
        for room in (80, 16384):
            median, low, high = rate(model, ids, room)
            print(f"{attention:12s}  room {room:5d}: {median:6.1f} tokens/s [{low:.1f}-{high:.1f}]")


if __name__ == "__main__":
    main()
