"""The user commands: generate, chat, download. Answers go to stdout and nothing else does;
progress, load time and speed go to stderr; a bad input is one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DEFAULT_MODEL = "llava-hf/llava-interleave-qwen-0.5b-hf"  # the smallest seed checkpoint


def add_parsers(sub) -> None:
    gen = sub.add_parser("generate", help="answer one prompt about images, streamed to stdout")
    _model_args(gen)
    gen.add_argument("--image", action="append", default=[], metavar="FILE", help="an image (repeat for several)")
    gen.add_argument("--video-frames", metavar="DIR", help="a folder of frame images, read as one video")
    gen.add_argument("--prompt", required=True)
    gen.set_defaults(run=run_generate)

    chat = sub.add_parser("chat", help="an interactive chat; '/image FILE' attaches an image to the next message")
    _model_args(chat)
    chat.add_argument("--system", help="a system prompt")
    chat.set_defaults(run=run_chat)

    down = sub.add_parser("download", help="fetch a hub checkpoint into weights/ (resumable)")
    down.add_argument("hub_id", nargs="?", default=DEFAULT_MODEL)
    down.set_defaults(run=run_download)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="a checkpoint folder or a hub id (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's, float32 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load(args):
    """Model and processor, with the load time on stderr."""
    from .generation import Sampling, check_max_new_tokens
    from .hub import resolve_checkpoint
    from .load import load_model, load_processor

    # Check the generation settings before minutes of loading, not after.
    Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    check_max_new_tokens(args.max_new_tokens, "--max-new-tokens")
    start = time.perf_counter()
    folder = resolve_checkpoint(args.model)
    dtype = args.dtype or ("float32" if args.device == "cpu" else None)
    model = load_model(folder, dtype=dtype, device=args.device)
    processor = load_processor(folder)
    weight = next(model.parameters())
    log(f"loaded {folder} ({weight.dtype}, {args.device}) in {time.perf_counter() - start:.1f} s")
    return model, processor


def _generation(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)  # fmt: skip


def _prompt(processor, text: str, n_images: int) -> str:
    """The user's text in the checkpoint's chat template, one image part per image; without a
    template (a base model), the image tokens in front of the text."""
    if processor.chat_template is None:
        return processor.tokens.image_token * n_images + text
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def run_generate(args) -> None:
    from .generation import stream
    from .processing.image import load_image, load_video_frames

    # Read the images before loading the model: a missing file should not cost a load.
    images = [load_image(path) for path in args.image]
    if args.video_frames:
        images += load_video_frames(args.video_frames)  # LLaVA-Interleave: a video is its frames, one image each
    model, processor = _load(args)
    inputs = processor(text=_prompt(processor, args.prompt, len(images)), images=images or None)
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    start, first, count = time.perf_counter(), None, 0

    def on_token(_):
        nonlocal first, count
        first = first or time.perf_counter()
        count += 1

    for piece in stream(model, processor, on_token=on_token, **_generation(args), **inputs):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    end = time.perf_counter()
    decode = f", {(count - 1) / (end - first):.1f} tokens/s after it" if count > 1 else ""
    log(f"{inputs['input_ids'].shape[1]} prompt tokens; first token after {first - start:.2f} s{decode}; {count} tokens")


def run_chat(args) -> None:
    from .conversation import Conversation
    from .processing.image import ImageError, load_image

    model, processor = _load(args)
    chat = Conversation(model, processor, system=args.system, **_generation(args))
    log("commands: /image FILE (attach to the next message), /reset, /quit")
    pending: list = []
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            chat.reset()
            pending = []
            continue
        if line.startswith("/image"):
            try:
                pending.append(load_image(line[len("/image") :].strip()))
                log(f"image {len(pending)} attached")
            except ImageError as e:
                log(f"minivlm: {e}")  # one bad path does not end the chat
            continue
        for piece in chat.say(line, pending):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        pending = []


def run_download(args) -> None:
    from .hub import download, weights_dir

    local = weights_dir() / args.hub_id.split("/")[-1]
    log(f"downloading {args.hub_id} into {local}")
    download(args.hub_id, local)
    print(Path(local).resolve())
