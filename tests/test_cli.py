"""The command line on a complete tiny checkpoint: `generate` prints exactly transformers' greedy
answer on stdout (and nothing else there), `chat` keeps its KV cache between turns, and bad input
is one line on stderr with a non-zero exit status, never a traceback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from test_end_to_end import interleave_checkpoint

import minivlm
from minivlm.__main__ import main
from minivlm.conversation import Conversation

NEW = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interleave")
    hf_model = interleave_checkpoint(folder)
    images = []
    for i, (h, w) in enumerate([(50, 70), (64, 40)]):
        path = folder / f"photo{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return folder, hf_model, images


def transformers_answer(folder, hf_model, images, prompt: str) -> str:
    processor = transformers.AutoProcessor.from_pretrained(folder)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=text, images=[Image.open(p) for p in images] or None, return_tensors="pt")
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = hf_model.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_generate_prints_transformers_greedy_answer(checkpoint, capsys, n_images):
    folder, hf_model, images = checkpoint
    argv = ["generate", "--model", str(folder), "--prompt", "What is in it?", "--max-new-tokens", str(NEW)]
    for path in images[:n_images]:
        argv += ["--image", str(path)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    expected = transformers_answer(folder, hf_model, images[:n_images], "What is in it?")
    assert out == expected + "\n"
    assert "loaded" in err and "prompt tokens" in err  # the timings go to stderr


def test_generate_video_frames_are_images(checkpoint, capsys, tmp_path):
    folder, hf_model, images = checkpoint
    for i, path in enumerate(images):
        (tmp_path / f"{i:04d}.png").write_bytes(path.read_bytes())
    argv = [
        "generate",
        "--model",
        str(folder),
        "--prompt",
        "What happens?",
        "--max-new-tokens",
        str(NEW),
        "--video-frames",
        str(tmp_path),
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out == transformers_answer(folder, hf_model, images, "What happens?") + "\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "/no/such/file.png"], r"/no/such/file.png: no such image file"),
        (["--image", "NOT_AN_IMAGE"], r"not an image file Pillow can read"),
        (["--max-new-tokens", "0"], r"--max-new-tokens 0: expected a positive number of tokens"),
        (["--max-new-tokens", "-5"], r"--max-new-tokens -5: expected a positive number of tokens"),
        (["--temperature", "-1"], r"temperature -1.0: expected 0 \(greedy\) or more"),
        (["--model", "no-such-org/no-such-model-xyz"], r"no-such-org/no-such-model-xyz: .*"),
        (["--model", "/no/such/folder"], r"/no/such/folder: no such checkpoint folder"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(checkpoint, capsys, tmp_path, monkeypatch, extra, message):
    folder, _, _ = checkpoint
    monkeypatch.setenv("MINIVLM_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unreachable hub, and no test downloads anything
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    extra = [str(not_an_image) if x == "NOT_AN_IMAGE" else x for x in extra]
    code = main(["generate", "--model", str(folder), "--prompt", "hi", *extra])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("minivlm: error: ")
    assert __import__("re").search(message, err), err


def test_prompt_longer_than_the_context(checkpoint, capsys):
    folder, hf_model, _ = checkpoint
    context = hf_model.config.text_config.max_position_embeddings
    code = main(["generate", "--model", str(folder), "--prompt", "hi " * context])
    err = capsys.readouterr().err
    assert code == 1 and f"the model's context is {context}" in err and "Traceback" not in err


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for p in m['content'] %}{% if p['type'] == 'image' %}"
    "<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_keeps_the_cache_and_answers_as_a_fresh_prefill(checkpoint):
    """With an append-only template (ChatML), turn 2 runs only its new tokens through the model,
    and its answer equals generating from the same token sequence with no cache."""
    folder, _, images = checkpoint
    model, processor = minivlm.load_model(folder), minivlm.load_processor(folder)
    processor.chat_template = CHATML
    chat = Conversation(model, processor, max_new_tokens=NEW)
    "".join(chat.say("Describe it.", [images[0]]))
    turn1_tokens = len(chat.token_ids)
    assert chat.cache.length == turn1_tokens
    second = "".join(chat.say("And this one?", [images[1]]))
    assert 0 < chat.prefilled < turn1_tokens  # turn 1 was not run again
    before_answer = chat.token_ids[: turn1_tokens + chat.prefilled]
    pixels = processor(text="<image><image>", images=images)["pixel_values"]
    fresh = minivlm.generate(model, torch.tensor([before_answer]), pixel_values=pixels, max_new_tokens=NEW)
    assert second == processor.decode(fresh[0], skip_special_tokens=True)


def test_chat_with_a_template_that_rewrites_turns_starts_over(checkpoint):
    """The test template writes "assistant:" for the prompt but "assistant: " before an answer, so
    the cached text is no prefix: the conversation is prefilled whole, all images included."""
    folder, _, images = checkpoint
    model, processor = minivlm.load_model(folder), minivlm.load_processor(folder)
    chat = Conversation(model, processor, max_new_tokens=4)
    "".join(chat.say("Describe it.", [images[0]]))
    "".join(chat.say("And this one?", [images[1]]))
    assert chat.prefilled == len(chat.token_ids) - 3  # everything but the 3 answer tokens fed back


def test_chat_command_reads_turns_from_stdin(checkpoint, capsys, monkeypatch):
    folder, _, images = checkpoint
    lines = iter([f"/image {images[0]}", "/image /no/such.png", "Describe it.", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(folder), "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "image 1 attached" in err and "/no/such.png: no such image file" in err
    assert out.count("\n") == 1  # one answer line


def test_download_unreachable_hub_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIVLM_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", "some-org/some-model"]) == 1
    err = capsys.readouterr().err
    assert "minivlm: error: some-org/some-model" in err and "Traceback" not in err


def test_sampling_through_the_cli_is_reproducible(checkpoint, capsys):
    folder, _, images = checkpoint
    argv = [
        "generate",
        "--model",
        str(folder),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.3",
        "--top-p",
        "0.9",
        "--seed",
        "5",
    ]
    outs = []
    for _ in range(2):
        assert main(argv) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    assert torch.__version__  # (the seed fixes the answer across runs of the same build)
