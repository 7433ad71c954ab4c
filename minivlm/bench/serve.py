"""`bench serve`: the server's throughput with concurrent clients against the same requests sent
one after another, in the same process, over HTTP.

The checkpoint is a family's tiny one (minivlm.bench.tiny: real image geometry, random weights),
or --model. Each client sends its own image and prompt and asks for --new-tokens greedy tokens
(the answers may end sooner at the end token; tokens/s counts the tokens answered). Figures are
the median [min-max] of --repeats runs of each way.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import io
import json
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _image_url(i: int) -> str:
    image = Image.new("RGB", (40 + 17 * i, 90 - 6 * i), ((50 * i) % 256, (90 + 40 * i) % 256, (200 - 25 * i) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def bench_serve(args: argparse.Namespace) -> None:
    import uvicorn

    import minivlm

    from ..serving.app import build_app
    from ..serving.engine import Engine

    if args.model:
        folder = Path(args.model)
    else:
        from .tiny import tiny_checkpoint

        scratch = tempfile.mkdtemp(prefix="minivlm-bench-serve-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        folder = tiny_checkpoint(args.family, Path(scratch) / args.family)
    model, processor = minivlm.load_model(folder, dtype=args.dtype), minivlm.load_processor(folder)
    engine = Engine(model, processor, max_batch=args.clients, max_queue=4 * args.clients, gather_ms=20)
    config = uvicorn.Config(build_app(engine, "bench"), host="127.0.0.1", port=args.port, log_level="warning")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{args.port}/v1/chat/completions"
    bodies = [
        {
            "model": "bench",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _image_url(i)}},
                        {"type": "text", "text": f"Describe picture {i}."},
                    ],
                }
            ],
            "max_tokens": args.new_tokens,
            "temperature": 0,
        }
        for i in range(args.clients)
    ]

    def run(concurrent: bool) -> tuple[float, int]:
        start = time.perf_counter()
        if concurrent:
            with ThreadPoolExecutor(args.clients) as pool:
                replies = list(pool.map(lambda b: _post(url, b), bodies))
        else:
            replies = [_post(url, b) for b in bodies]
        tokens = sum(r["usage"]["completion_tokens"] for r in replies)
        return tokens / (time.perf_counter() - start), tokens

    _post(url, bodies[0])  # warm-up: the first call pays one-time costs
    sequential, concurrent = [], []
    for _ in range(args.repeats):
        sequential.append(run(False)[0])
        concurrent.append(run(True)[0])
    server.should_exit = True
    ratios = sorted(c / s for c, s in zip(concurrent, sequential))

    def fig(xs):
        return f"{statistics.median(xs):.1f} [{min(xs):.1f}-{max(xs):.1f}]"

    print(
        f"serve: {folder.name}, {args.clients} clients x {args.new_tokens} new tokens, {args.dtype or 'checkpoint'} "
        f"dtype, {args.repeats} runs each, {engine.rows} rows in {engine.batches} batches "
        f"({engine.joins} joined a running batch)"
    )
    print(f"  one after another  {fig(sequential)} tokens/s")
    print(f"  {args.clients} at once          {fig(concurrent)} tokens/s")
    print(f"  batched / sequential  {statistics.median(ratios):.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}]")
