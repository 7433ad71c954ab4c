"""`python -m minivlm serve`: the OpenAI-compatible server (needs the `serve` extra)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..hub import resolve_checkpoint
from ..load import load_model, load_processor
from .requests import APIError


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible chat-completions server, with a chat page at /")
    p.add_argument("--model", required=True, help="the checkpoint folder or hub id")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-name", help="the model's name in the API (default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests that share decode steps")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429 answers")
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--allow-local-images", action="store_true", help="take image_url paths on this machine")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=run_serve)


def run_serve(args) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would load a whole model and bind the port
        raise APIError(
            400,
            "serve runs in one process: tensor-parallel serving is not built; under torchrun each rank "
            "would load the whole model. Run `python -m minivlm serve` without torchrun (tensor "
            "parallelism serves generate and chat)",
        )
    try:
        import uvicorn

        from .app import build_app
        from .engine import Engine
    except ImportError as e:
        raise APIError(500, f'serving needs the serve extra: pip install "minivlm[serve]" ({e})') from None
    for name in ("port", "max_batch", "max_queue", "max_images"):
        if getattr(args, name) < 1:
            raise APIError(400, f"--{name.replace('_', '-')} must be at least 1")
    folder = resolve_checkpoint(args.model)
    model = load_model(folder, dtype=args.dtype, device=args.device)
    processor = load_processor(folder)
    name = args.served_name or Path(folder).name
    engine = Engine(model, processor, max_batch=args.max_batch, max_queue=args.max_queue)
    app = build_app(engine, name, args.allow_local_images, args.max_images)
    print(f"minivlm: serving {name} at http://{args.host}:{args.port}/ (OpenAI API under /v1)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
