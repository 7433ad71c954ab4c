"""The user commands: generate, chat, download. Answers go to stdout and nothing else does;
progress, load time and speed go to stderr; a bad input is one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

DEFAULT_MODEL = "llava-hf/llava-interleave-qwen-0.5b-hf"  # the smallest seed checkpoint
DTYPE_NAMES = ["float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half", "float"]  # load.DTYPES' names
CHAT_COMMANDS = "/image FILE (attach to the next message), /reset, /quit"


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

    quant = sub.add_parser(
        "quantize", help="save a checkpoint quantized (int8 or int4), to load without quantizing again"
    )
    quant.add_argument("--model", required=True, help="a checkpoint folder or a hub id")
    quant.add_argument("--quantize", required=True, choices=["int8", "int4"])
    _quant_args(quant)
    quant.add_argument("--output", help="the new checkpoint folder")
    quant.add_argument(
        "--sensitivity",
        type=int,
        metavar="N",
        help="instead of saving: rank the layers by the error their quantization adds to their outputs on "
        "calibration text, and print the N first as a --quantize-keep value",
    )
    quant.add_argument("--corpus", help="--sensitivity: a UTF-8 text file (default: Python's stdlib docstrings)")
    quant.set_defaults(run=run_quantize)

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
    p.add_argument("--seed", type=int, help="a whole number; sampling with the same seed repeats its answer")
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        metavar="DTYPE",
        help="float32, bfloat16 or float16 (default: the checkpoint's, float32 on CPU)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda, cuda:N or mps (default: cuda where there is one)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="quantize the decoder's weights as they load (weight-only; the activations keep --dtype)",
    )
    _quant_args(p)
    p.add_argument(
        "--compile",
        action="store_true",
        help="run each decode step as one torch.compile graph (CUDA graphs on CUDA); the first answer "
        "waits for the compile (tens of seconds), so it pays for long answers",
    )


def _quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], help="int4: inputs per scale (default 64)")
    p.add_argument(
        "--quantize-parts",
        help="comma-separated: decoder (the default), lm_head, vision, connector",
    )
    p.add_argument(
        "--quantize-keep",
        help="comma-separated names of linear layers left in full precision (model.layers.11.mlp.down_proj); "
        "`python -m minivlm quantize --sensitivity` ranks them",
    )


def _quant_options(args) -> dict:
    def names(text):
        if text is None:
            return None
        given = [p.strip() for p in text.split(",") if p.strip()]
        if not given:
            raise SystemExit(f"minivlm: error: {text!r} names nothing; expected comma-separated names")
        return given

    return dict(quantize=args.quantize, group_size=args.group_size, quantize_parts=names(args.quantize_parts),
                quantize_keep=names(args.quantize_keep))  # fmt: skip


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load(args):
    """Model and processor, with the load time on stderr."""
    from .hub import resolve_checkpoint
    from .load import load_model, load_processor
    from .parallel import join_group, quiet_rank

    check_args(args)
    start = time.perf_counter()
    folder = resolve_checkpoint(args.model)
    dtype = args.dtype or ("float32" if args.device == "cpu" else None)
    # Under torchrun (WORLD_SIZE > 1): tensor parallelism across the ranks, rank 0 alone printing.
    shard = join_group(torch.device(args.device))
    quiet_rank(shard)
    model = load_model(
        folder, dtype=dtype, device=args.device, tensor_parallel=shard is not None, **_quant_options(args)
    )
    processor = load_processor(folder)
    weight = next(model.parameters())
    log(f"loaded {folder} ({weight.dtype}, {args.device}) in {time.perf_counter() - start:.1f} s")
    return model, processor


def check_args(args) -> None:
    """The generation settings and the device, checked before minutes of loading, not after
    (GenerationError: one line on stderr, exit status 1). Sampling settings that greedy decoding
    (temperature 0) ignores get a notice on stderr."""
    from .generation import Sampling
    from .generation_checks import check_device, check_max_new_tokens, check_seed

    def flag(name, value):  # the messages name the command-line flag
        return f"--{name.replace('_', '-')} {value!r}"

    Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    check_max_new_tokens(args.max_new_tokens, "--max-new-tokens")
    check_seed(args.seed, "--seed")
    check_device(args.device, "--device")
    if args.temperature == 0:
        ignored = [
            f
            for f, on in (
                ("--top-p", args.top_p != 1.0),
                ("--top-k", args.top_k != 0),
                ("--seed", args.seed is not None),
            )
            if on
        ]
        if ignored:
            log(
                f"minivlm: note: {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored at "
                "--temperature 0 (greedy); give a temperature above 0 to sample"
            )


def _generation(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        compile=args.compile,
    )


def _prompt(processor, text: str, n_images: int) -> str:
    """The user's text in the checkpoint's chat template, one image part per image; without a
    template (a base model), the image tokens in front of the text."""
    if processor.chat_template is None:
        return processor.tokens.image_token * n_images + text
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _inputs(processor, text: str, images: list) -> dict:
    """The model inputs of one user message. In a chat template, the user's text stays text: a
    special token typed in it is not a control token (see conversation.py)."""
    if processor.chat_template is None:
        return processor(text=_prompt(processor, text, len(images)), images=images or None)
    from .conversation import render_segments, tokenize_segments

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    _, segments = render_segments(processor, [{"role": "user", "content": content}])
    return tokenize_segments(processor, segments, images, first=True)


def run_generate(args) -> None:
    from .generation import stream
    from .processing.image import load_image, load_video_frames

    # Read the images before loading the model: a missing file should not cost a load.
    images = [load_image(path) for path in args.image]
    if args.video_frames:
        images += load_video_frames(args.video_frames)  # LLaVA-Interleave: a video is its frames, one image each
    model, processor = _load(args)
    if args.video_frames:
        processor.check_video_support()  # elsewhere the frames would pass for separate images
    inputs = _inputs(processor, args.prompt, images)
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    note_cut(model, inputs["input_ids"].shape[1], args.max_new_tokens)
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
    log(
        f"{inputs['input_ids'].shape[1]} prompt tokens; first token after {first - start:.2f} s{decode}; {count} tokens"
    )


def note_cut(model, prompt_len: int, max_new_tokens: int) -> None:
    """A notice on stderr when the context leaves fewer new tokens than --max-new-tokens asks for."""
    from .generation import defaults_of

    context = defaults_of(model).max_positions
    if context is not None and prompt_len < context and prompt_len + max_new_tokens > context:
        log(
            f"minivlm: note: --max-new-tokens {max_new_tokens} cut to {context - prompt_len}: the prompt is "
            f"{prompt_len} tokens and the model's context {context}"
        )


def _read_line(prompt: str, interrupt_ends: bool = False) -> str | None:
    """One line of stdin; None at its end. Ctrl-C at the prompt gives an empty line, as Python's
    own prompt does (Ctrl-D or /quit ends the chat), or ends the chat (`interrupt_ends`: under
    tensor parallelism, where every rank has the interrupt at a different point)."""
    try:
        return input(prompt)
    except EOFError:
        return None
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        if interrupt_ends:
            raise
        return ""


def run_chat(args) -> None:
    """The chat loop. A turn that fails (an image that cannot be read, a turn longer than the
    context, a typed special token the tokenizer cannot take) prints one line on stderr and is
    dropped; Ctrl-C during an answer stops it and drops the turn (the model never saw it: the next
    turn follows the last answered one); the chat goes on either way.

    Under tensor parallelism (torchrun) rank 0 reads the terminal and the images and sends them to
    the others; Ctrl-C ends the chat (each rank has it at a different step, and they cannot
    resume in step), as does a rank that stops."""
    from .parallel import ParallelError

    model, processor = _load(args)
    try:
        return _chat_loop(args, model, processor)
    except KeyboardInterrupt:
        if model.tensor_parallel is None:
            raise
        sys.stdout.write("\n")
        sys.stdout.flush()
        log("minivlm: interrupted; under tensor parallelism Ctrl-C ends the chat (the ranks cannot resume in step)")
        return 130
    except ParallelError:
        sys.stdout.write("\n")
        sys.stdout.flush()
        raise


def _chat_loop(args, model, processor) -> None:
    from .conversation import Conversation
    from .parallel import ParallelError, from_rank0
    from .processing.image import ImageError, load_image

    parallel = model.tensor_parallel is not None
    chat = Conversation(model, processor, system=args.system, **_generation(args))
    log(f"commands: {CHAT_COMMANDS}")
    if hasattr(sys.stdin, "reconfigure"):
        # Bytes that are not UTF-8 arrive as lone surrogates (refused below), not as a decode error
        # that would lose the rest of the input.
        sys.stdin.reconfigure(errors="surrogateescape")
    pending: list = []
    while True:
        prompt = "> " if sys.stdin.isatty() else ""
        line = from_rank0(model, lambda: _read_line(prompt, interrupt_ends=parallel))  # torchrun: rank 0 reads
        if line is None:
            return
        line = line.strip()
        if not line:
            continue
        if any("\ud800" <= c <= "\udfff" for c in line):
            log("minivlm: error: that line is not valid UTF-8 text; it was skipped")
            continue
        command = line.split(maxsplit=1)[0]
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            chat.reset()
            pending = []
            log("the conversation starts over")
            continue
        if command == "/image":
            try:
                path = line[len("/image") :].strip()
                pending.append(from_rank0(model, lambda: load_image(path)))  # torchrun: rank 0's file
                log(f"image {len(pending)} attached")
            except ImageError as e:
                log(f"minivlm: {e}")  # one bad path does not end the chat
            continue
        if command.startswith("/") and re.fullmatch(r"/[A-Za-z_-]+", command):
            log(f"minivlm: unknown command {command}; the commands are {CHAT_COMMANDS}")
            continue
        images, pending = pending, []
        answer, wrote = chat.say(line, images), False
        try:
            for piece in answer:
                sys.stdout.write(piece)
                sys.stdout.flush()
                wrote = True
        except KeyboardInterrupt:
            answer.close()  # the turn is dropped (Conversation.say restores the state before it)
            if parallel:
                raise
            sys.stdout.write("\n" if wrote else "")
            sys.stdout.flush()
            log("minivlm: answer interrupted; the turn is dropped" + _dropped(images))
            continue
        except ParallelError:  # a rank stopped: the others cannot go on
            answer.close()
            raise
        except Exception as e:  # one turn's error never ends the chat
            answer.close()
            sys.stdout.write("\n" if wrote else "")
            sys.stdout.flush()
            # Errors about the input (ValueError: ProcessorError, GenerationError, ...) say what is
            # wrong; anything else is a bug of ours, named by its class.
            what = str(e) if isinstance(e, (ValueError, TypeError, OSError)) else f"{type(e).__name__}: {e}"
            log(f"minivlm: error: {what}" + _dropped(images))
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()


def print_sensitivity(folder: Path, args) -> None:
    """`quantize --sensitivity N`: quant_sensitivity.rank on 16 windows of 256 tokens of the corpus."""
    from .config import read_config
    from .decoder import check_inputs
    from .load import load_model, load_processor
    from .quant import QuantConfig, QuantError, saved_quantization
    from .quant_sensitivity import calibration_text, rank, windows

    if args.sensitivity < 1:
        raise SystemExit(f"minivlm quantize: error: --sensitivity {args.sensitivity}: expected at least 1")
    options = _quant_options(args)
    if options["quantize_keep"] is not None:
        raise SystemExit("minivlm quantize: error: --sensitivity ranks every layer; give --quantize-keep when saving")
    config = QuantConfig.parse(options["quantize"], options["group_size"], options["quantize_parts"])
    if set(config.parts) - {"decoder", "lm_head"}:
        raise SystemExit("minivlm quantize: error: --sensitivity calibrates on text: it ranks the decoder and lm_head "
                         "parts only (rank() in Python takes images for the vision tower and connector)")  # fmt: skip
    saved = saved_quantization(read_config(folder), f"{folder}/config.json")
    if saved is not None:
        raise SystemExit(f"minivlm quantize: error: {folder} is saved quantized ({saved.scheme}); "
                         "rank the full-precision checkpoint it came from")  # fmt: skip
    tokenizer = load_processor(folder).tokenizer
    batches = windows(torch.tensor(tokenizer.encode(calibration_text(args.corpus))), 256)[:16]
    if not batches:
        raise SystemExit("minivlm quantize: error: the corpus is shorter than one window of 256 tokens")
    model = load_model(folder, kernels="off")
    vocab = getattr(model, "language_model", model).model.embed_tokens.num_embeddings
    try:  # the tokenizer's ids must fit the model (generate's check, before minutes of work)
        check_inputs(torch.stack(batches), None, vocab)  # (windows, 256): every window at once
    except ValueError as e:
        raise QuantError(f"{folder}: the tokenizer does not fit the model: {e}") from None
    ranking = rank(model, [w[None] for w in batches], config)
    log(f"the mean square, per token, of what quantizing each layer adds to its output ({len(batches)} x 256 tokens):")
    for name, error in ranking[: args.sensitivity]:
        print(f"{error:12.4g}  {name}")
    print("--quantize-keep " + ",".join(name for name, _ in ranking[: args.sensitivity]))


def _dropped(images: list) -> str:
    return f" (with its {len(images)} image(s): attach them again with /image)" if images else ""


def run_quantize(args) -> None:
    from .hub import resolve_checkpoint
    from .load import load_model
    from .quant_save import check_output, save_quantized

    if (args.output is None) == (args.sensitivity is None):
        raise SystemExit("minivlm quantize: error: give --output (save quantized) or --sensitivity N (rank layers)")
    if args.corpus is not None and args.sensitivity is None:
        raise SystemExit(
            "minivlm quantize: error: --corpus is --sensitivity's calibration text; it needs --sensitivity"
        )
    folder = resolve_checkpoint(args.model)
    if args.sensitivity is not None:
        return print_sensitivity(folder, args)
    check_output(folder, Path(args.output))  # before minutes of loading, not after
    start = time.perf_counter()
    model = load_model(folder, kernels="off", **_quant_options(args))  # the stored layout, not the CPU kernel's
    print(save_quantized(model, folder, args.output).resolve())
    log(f"quantized {folder} ({model.quantization.scheme}) in {time.perf_counter() - start:.1f} s")


def run_download(args) -> None:
    from .hub import download, weights_dir

    local = weights_dir() / args.hub_id.split("/")[-1]
    log(f"downloading {args.hub_id} into {local}")
    download(args.hub_id, local)
    print(Path(local).resolve())
