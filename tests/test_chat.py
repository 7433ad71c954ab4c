"""Chat templates rendered by minivlm against transformers' apply_chat_template, same template,
same conversation, same special tokens. The templates follow each family's conventions."""

from __future__ import annotations

import pytest
import transformers
from PIL import Image

from minivlm.bench.tiny.vocab import train_bpe
from minivlm.processing.chat import ChatTemplateError, find_chat_template, render

TEMPLATES = {
    "llava15": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
        "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ part['text'] + ' ' }}{% endgeneration %}"
        "{% else %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    "chatml_images": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
        "{% elif part['type'] == 'video' %}{{ '<video>\n' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
        "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "mistral_inst": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'][0]['text'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system = none %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' }}{% if loop.first and system %}{{ system + '\n\n' }}{% endif %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
        "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{{ ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'][0]['text'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "idefics3": (
        "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
        "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
        "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
        "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
    "llama3_tools": (
        "{{ bos_token }}{% set ns = namespace(turns=0, last='') %}{% for message in messages %}"
        "{% set ns.turns = ns.turns + 1 %}{% if message['role'] == 'tool' %}{% continue %}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['content'] is string %}{{ message['content'] | trim }}"
        "{% else %}{{ message['content'] | tojson }}{% endif %}{{ '<|eot_id|>' }}"
        "{% if ns.turns > 5 %}{% break %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}

CONVERSATIONS = {
    "one_image": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}],
    "turns": [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "and"},
                                     {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The first is larger."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one? 中文 😀"}]},
    ],
    "images_as_objects": [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (4, 4))},
                                                        {"type": "text", "text": "Describe."}]}],
}  # fmt: skip
STRING_CONVERSATION = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": 'Hi "there" — ünïcode'},
    {"role": "tool", "content": "ignored"},
    {"role": "assistant", "content": "Hello."},
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_bpe("llama3", folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def both(hf, template, conversation, add_generation_prompt):
    theirs = hf.apply_chat_template(
        conversation, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ours = render(template, conversation, add_generation_prompt, **hf.special_tokens_map)
    return ours, theirs


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", [n for n in TEMPLATES if n != "llama3_tools"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_templates_render_as_transformers(hf_tokenizer, name, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    if name == "mistral_inst" and conversation == "turns":
        messages = [messages[0]] + messages[1:]  # system, user, assistant, user: alternates
    ours, theirs = both(hf_tokenizer, TEMPLATES[name], messages, add_generation_prompt)
    assert ours == theirs


# Written over several indented lines as real templates are, where trim_blocks/lstrip_blocks decide the output.
MULTILINE = """{% for message in messages %}
    {% if message['role'] == 'user' %}
        {{ 'U: ' + message['content'] }}
    {% else %}
        {{ 'A: ' + message['content'] }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
A:
{% endif %}"""


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_namespace_tojson_trim_and_loop_controls(hf_tokenizer, add_generation_prompt):
    # The image object inside "images_as_objects" reaches tojson as transformers' placeholder text.
    for messages in (STRING_CONVERSATION, CONVERSATIONS["turns"], CONVERSATIONS["images_as_objects"]):
        ours, theirs = both(hf_tokenizer, TEMPLATES["llama3_tools"], messages, add_generation_prompt)
        assert ours == theirs
    ours, theirs = both(
        hf_tokenizer, MULTILINE, STRING_CONVERSATION[1:2] + STRING_CONVERSATION[3:], add_generation_prompt
    )
    assert ours == theirs


def test_template_errors_are_clear():
    bad_turns = [{"role": "user", "content": [{"type": "text", "text": "a"}]}] * 2
    with pytest.raises(ChatTemplateError, match=r"refused the conversation: Conversation roles must alternate"):
        render(TEMPLATES["mistral_inst"], bad_turns, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ChatTemplateError, match=r"does not parse"):
        render("{% for m in messages %}", [])
    with pytest.raises(ChatTemplateError, match=r"sandbox forbids"):
        render(
            "{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [{"role": "user", "content": "x"}]
        )
    with pytest.raises(ChatTemplateError, match=r"sandbox forbids"):
        render("{% set ns = namespace() %}{% set ns._x = 1 %}", [{"role": "user", "content": "x"}])


def test_template_is_found_where_checkpoints_keep_it(tmp_path):
    import json

    assert find_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "default", "template": "T"}]})
    )
    assert find_chat_template(tmp_path) == "T"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert find_chat_template(tmp_path) == "J"
    (tmp_path / "chat_template.jinja").write_text("K")
    assert find_chat_template(tmp_path) == "K"
