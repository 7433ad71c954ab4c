"""The command line: `python -m minivlm COMMAND` (also installed as `minivlm`).

generate   answer a prompt about images, streamed to stdout
chat       an interactive chat that keeps its KV cache between turns
quantize   save a checkpoint quantized (int8 or int4)
serve      an OpenAI-compatible chat-completions server (batching, a chat page at /)
train      train the connector, LoRA or everything on LLaVA-format data (torchrun for several processes)
download   fetch a hub checkpoint into weights/
bench      benchmarks against transformers, in the same process
parity     minivlm against transformers, layer by layer, on one checkpoint
doctor     check a checkpoint folder and list every problem found
"""

from __future__ import annotations

import argparse
import sys

from . import bench, cli, doctor, parity
from .checkpoint import CheckpointError
from .config import ConfigError
from .generation import GenerationError
from .ops import KernelsError
from .parallel import ParallelError, error_stream, rank_label
from .parity import ParityError
from .processing.chat import ChatTemplateError
from .processing.image import ImageError
from .processing.processor import ProcessorError
from .processing.tokenizer import TokenizerError
from .quant import QuantError
from .serving import cli as serve_cli
from .serving.requests import APIError
from .training import DataError, LabelError, LoraError, SaveError, TrainError
from .training import cli as train_cli

# Errors about the user's input or files: one line on stderr, no traceback. Anything else is a bug
# of ours and keeps its traceback.
USER_ERRORS = (
    CheckpointError,
    ConfigError,
    GenerationError,
    ChatTemplateError,
    ImageError,
    KernelsError,
    ParityError,
    ParallelError,
    ProcessorError,
    QuantError,
    TokenizerError,
    DataError,
    LabelError,
    LoraError,
    SaveError,
    TrainError,
    APIError,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="minivlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_parsers(sub)
    train_cli.add_parser(sub)
    serve_cli.add_parser(sub)
    bench.add_parser(sub)
    parity.add_parser(sub)
    doctor.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        status = args.run(args)  # None, or an exit status (parity: 1 when the models part)
    except USER_ERRORS as e:
        stream = error_stream()  # one write: lines of several ranks sharing a terminal stay whole
        stream.write(f"minivlm: error: {rank_label()}{e}\n")
        stream.flush()
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
