"""`python -m minivlm parity --model PATH`: minivlm against transformers on one checkpoint, layer by layer.

Both models load the same folder and run the same inputs (made by minivlm's processor, whose
output is tested equal to transformers' processors); minivlm runs its reference path
(`kernels="off"`, ops.py's definitions of transformers' eager arithmetic). Forward hooks record the output of every
stage on both sides: the vision embeddings, each vision encoder layer, the connector, the merged
sequence that enters the decoder, each decoder layer, the final norm and the logits. The table
gives, per stage, the largest absolute difference and that difference relative to the largest
value transformers produced there, and the first stage where the two part beyond the tolerance.

transformers is needed here (`pip install "minivlm[test]"`) and nowhere else in the library.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .weights import KeyTable

# The stages compared, as patterns over our module names, in the order a forward pass runs them.
# "input" stages record what enters the module (the merged sequence enters decoder layer 0). A
# pattern that matches no module of a family (a text model's vision stages) is skipped.
STAGES = (
    (r"vision_tower\.embeddings", "output", "vision embeddings"),
    (r"vision_tower\.pre_layrnorm", "output", "vision pre-norm"),
    (r"vision_tower\.encoder\.layers\.(\d+)", "output", "vision layer {}"),
    (r"vision_tower\.post_layernorm", "output", "vision post-norm"),
    (r"multi_modal_projector", "output", "connector"),
    (r"(?:language_model\.)?model\.embed_tokens", "output", "token embeddings"),
    (r"(?:language_model\.)?model\.layers\.0", "input", "decoder input (merged)"),
    (r"(?:language_model\.)?model\.layers\.(\d+)", "output", "decoder layer {}"),
    (r"(?:language_model\.)?model\.norm", "output", "final norm"),
    (r"(?:language_model\.)?lm_head", "output", "logits"),
)


@dataclass(frozen=True)
class ParityMap:
    """How `minivlm parity` compares a family with transformers: a field of the family's row in
    load.FAMILIES. Module names map onto transformers' through the family's key table: the rows that
    load transformers 5's state dicts also name its modules, since a key is its module's name plus
    the parameter's."""

    auto_class: str | None  # transformers' Auto class that loads the checkpoint; None: it has no twin
    stages: tuple = STAGES
    text_only: bool = False  # the checkpoint takes no --image
    missing: str = ""  # auto_class None: why, and what checks the family instead


TEXT_PARITY = ParityMap("AutoModelForCausalLM", text_only=True)
VLM_PARITY = ParityMap("AutoModelForImageTextToText")
NO_PARITY_LLAMA3V = ParityMap(
    None,
    missing="transformers has no llama3v (MiniCPM-Llama3-V 2.5) model: it runs only as remote code. "
    "minivlm's tests/test_llama3v.py checks each part against references built from transformers and torch",
)
DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


class ParityError(ValueError):
    """The parity check cannot run: no transformers, or a family transformers does not have."""


@dataclass(frozen=True)
class Stage:
    label: str  # "decoder layer 3"
    ours: str  # our module's name
    theirs: str | None  # transformers' module's name; None when it has no twin
    where: str  # "output" or "input"


@dataclass(frozen=True)
class Row:
    stage: Stage
    shape: tuple | None  # None when a side did not run the stage
    max_abs: float = float("nan")
    rel: float = float("nan")  # max_abs / the largest |value| transformers produced at this stage
    at: tuple = ()  # index of the largest difference
    first: tuple = ()  # the first index, in row-major order, whose difference is beyond the tolerance
    note: str = ""
    nans: tuple = (0, 0)  # NaN values in minivlm's and transformers' output of the stage

    def beyond(self, tolerance: float) -> bool:
        if self.note:  # a stage one side did not run is no divergence; shapes that differ are
            return self.note.startswith("shapes")
        return not self.rel <= tolerance  # "not <=": a NaN difference is beyond every tolerance


def stages_of(ours: nn.Module, theirs: nn.Module, keys: KeyTable, stages: tuple = STAGES) -> list[Stage]:
    """The stages of our model, each with the name of its twin in transformers' model (or None)."""
    twin = {}  # our module name -> transformers' module name
    for name, _ in theirs.named_modules():
        mapped = keys.model_key(name + ".")  # the key table's rows match prefixes that end in "."
        if mapped is not None:
            twin.setdefault(mapped.removesuffix("."), name)
    names = [name for name, _ in ours.named_modules()]
    out = []
    for pattern, where, label in stages:
        for name in names:
            m = re.fullmatch(pattern, name)
            if m:
                out.append(Stage(label.format(*m.groups()), name, twin.get(name), where))
    return out


def record(model: nn.Module, stages: list[Stage], side: str) -> tuple[dict[str, torch.Tensor], list]:
    """Hooks that keep the first tensor each stage produces (or receives) in one forward pass."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for stage in stages:
        name = getattr(stage, side)
        if name is None or name not in modules:
            continue

        def keep(value, label=stage.label):
            if isinstance(value, (tuple, list)):
                value = value[0]
            if isinstance(value, torch.Tensor) and label not in seen:
                seen[label] = value.detach()

        if stage.where == "input":
            hook = modules[name].register_forward_pre_hook(
                lambda _m, args, kwargs, keep=keep: keep(args[0] if args else kwargs.get("hidden_states")),
                with_kwargs=True,
            )
        else:
            hook = modules[name].register_forward_hook(lambda _m, _args, out, keep=keep: keep(out))
        handles.append(hook)
    return seen, handles


def compare(
    ours: nn.Module,
    theirs: nn.Module,
    keys: KeyTable,
    inputs: dict[str, torch.Tensor],
    tolerance: float,
    stages: tuple = STAGES,
) -> list[Row]:
    """Run both models on `inputs` and compare every stage. Returns one row per stage, in order.
    `keys` is the family's key table, which names transformers' modules in ours."""
    stages = stages_of(ours, theirs, keys, stages)
    our_values, our_hooks = record(ours, stages, "ours")
    their_values, their_hooks = record(theirs, stages, "theirs")
    try:
        with torch.no_grad():
            ours(**inputs)
            theirs(**inputs)
    finally:
        for hook in our_hooks + their_hooks:
            hook.remove()
    rows = []
    for stage in stages:
        a, b = our_values.get(stage.label), their_values.get(stage.label)
        if a is None or b is None:
            who = "minivlm" if a is None else "transformers"
            rows.append(Row(stage, None, note=f"not run by {who} (its output is not used)"))
            continue
        if a.shape != b.shape:
            rows.append(Row(stage, tuple(b.shape), note=f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"))
            continue
        diff = (a.float() - b.float()).abs().flatten()
        # A NaN on either side (or on both: all-NaN weights) is a divergence, not a pass; so is an
        # inf on both sides (inf - inf is NaN).
        diff = diff.nan_to_num(nan=float("inf"))
        finite = b.float().abs().flatten()
        finite = finite[finite.isfinite()]
        scale = (float(finite.max()) if finite.numel() else 0.0) or 1.0
        worst = int(diff.argmax())
        beyond = (diff > tolerance * scale).nonzero()
        rows.append(
            Row(
                stage,
                tuple(b.shape),
                float(diff[worst]),
                float(diff[worst]) / scale,
                index(worst, b.shape),
                index(int(beyond[0]), b.shape) if len(beyond) else (),
                nans=(int(a.isnan().sum()), int(b.isnan().sum())),
            )
        )
    return rows


def index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    """A row-major flat index -> the index in `shape`."""
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape))


def first_divergence(rows: list[Row], tolerance: float) -> Row | None:
    return next((row for row in rows if row.beyond(tolerance)), None)


def format_table(rows: list[Row], tolerance: float) -> str:
    lines = [f"{'stage':<24} {'shape':<22} {'max abs':>10} {'max rel':>10}  worst at", "-" * 88]
    for row in rows:
        if row.shape is None or row.note:
            lines.append(f"{row.stage.label:<24} {'':<22} {'-':>10} {'-':>10}  {row.note}")
            continue
        flag = f"  <-- beyond {tolerance:g} from {list(row.first)} on" if row.beyond(tolerance) else ""
        shape = "x".join(map(str, row.shape))
        at = list(row.at) if row.max_abs > 0 else "-"
        lines.append(f"{row.stage.label:<24} {shape:<22} {row.max_abs:>10.2e} {row.rel:>10.2e}  {at}{flag}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command


def add_parser(sub) -> None:
    p = sub.add_parser("parity", help="minivlm against transformers, layer by layer, on one checkpoint")
    p.add_argument("--model", required=True, help="a checkpoint folder or a hub id")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="an image (repeat for several; default: one synthetic 640x480 picture for a VLM)",
    )
    p.add_argument("--prompt", default="Describe the picture in one sentence.")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
        metavar="DTYPE",
        help="float32 (default), bfloat16 or float16",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument(
        "--tolerance",
        type=positive_float,
        help="largest relative difference accepted per stage (default 1e-4 in float32, "
        "5e-2 in bfloat16, 1e-2 in float16)",
    )
    p.set_defaults(run=run_parity)


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (a NaN tolerance would pass every stage)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number above 0")
    return value


def synthetic_image():
    """A 640x480 picture with structure at every scale (gradients, stripes, a disc), so that every
    tile and patch differs; the same on every run."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    red = 255 * x / 639
    green = 127.5 * (1 + np.sin(x / 7.0) * np.cos(y / 11.0))
    blue = np.where((x - 400) ** 2 + (y - 200) ** 2 < 120**2, 230.0, 255 * y / 479)
    return Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8))


def load_transformers(folder, auto_class: str, dtype: torch.dtype, device: str) -> nn.Module:
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        raise ParityError(
            'minivlm parity compares against transformers; install it with pip install "minivlm[test]"'
        ) from None
    auto = getattr(transformers, auto_class)
    model = auto.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


def run_parity(args: argparse.Namespace) -> int:
    from .cli import _prompt, log
    from .generation_checks import check_device
    from .hub import resolve_checkpoint
    from .load import family_of, load_model, load_processor, parse_dtype
    from .processing.image import load_image

    dtype = parse_dtype(args.dtype)
    check_device(args.device, "--device")
    tolerance = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[dtype]
    folder = resolve_checkpoint(args.model)
    model_type, family = family_of(folder)
    parity = family.parity
    # What cannot be compared fails here, before minutes of loading.
    if parity.auto_class is None:
        raise ParityError(parity.missing)
    if parity.text_only and args.image:
        raise ParityError(f"{folder} holds a text-only {model_type} model; it takes no --image")
    images = [load_image(path) for path in args.image]
    if not parity.text_only and not images:
        images = [synthetic_image()]
    processor = load_processor(folder)
    ours = load_model(folder, dtype=dtype, device=args.device, kernels="off")  # the reference path
    theirs = load_transformers(folder, parity.auto_class, dtype, args.device)
    inputs = processor(text=_prompt(processor, args.prompt, len(images)), images=images or None)
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    log(f"{folder}: {model_type}, {dtype}, {inputs['input_ids'].shape[1]} tokens, {len(images)} image(s)")

    rows = compare(ours, theirs, family.keys, inputs, tolerance, parity.stages)
    version = sys.modules["transformers"].__version__  # imported by load_transformers
    print(
        f"minivlm vs transformers {version} on {folder.name} ({dtype}); "
        f"max rel = max |ours - theirs| / max |theirs| per stage; tolerance {tolerance:g}"
    )
    print(format_table(rows, tolerance))
    first = first_divergence(rows, tolerance)
    if first is None:
        compared = sum(1 for row in rows if not row.note)
        print(f"all {compared} compared stages agree within {tolerance:g}")
        return 0
    where = first.note or (
        f"max rel {first.rel:.2e} > {tolerance:g}; the first element beyond it is "
        f"{list(first.first)}, the largest difference at {list(first.at)}"
    )
    if any(first.nans):
        where += (
            f"; NaN values there: {first.nans[0]} in minivlm's output, {first.nans[1]} in transformers' "
            "(NaN weights? python -m minivlm doctor PATH lists them)"
        )
    print(f"first divergence: {first.stage.label} ({first.stage.ours} / {first.stage.theirs}): {where}")
    return 1
