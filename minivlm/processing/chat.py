"""Chat templates: the checkpoint's own jinja2 template, rendered in a sandbox as transformers does.

Templates come from the hub and are untrusted code: they run in jinja2's immutable sandbox, see
only plain JSON-like data (images in a message become a placeholder string), and get the same
helpers transformers gives them (`raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII text, loop controls, trimmed blocks), so a template renders the same text in both.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .files import read_json


class ChatTemplateError(ValueError):
    """No template, or one that fails to render; the message names the file or the template's own error."""


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class SafeNamespace(jinja2.utils.Namespace):
    """jinja2's namespace(), refusing underscore names (a way out of the sandbox through CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    env.globals["namespace"] = SafeNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None


def plain(value: Any) -> Any:
    """JSON-like data only: what a template may see. Anything else (a PIL image, an array) becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    return f"<{type(value).__name__}>"


def render(template: str | jinja2.Template, messages: list[dict], add_generation_prompt: bool = False, **variables) -> str:
    """Render one conversation. `variables` are what the tokenizer adds: bos_token, eos_token, ...."""
    if isinstance(template, str):
        template = compile_template(template)
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise ChatTemplateError(f"each message needs to be a dict with a 'role', got {message!r}")
    try:
        return template.render(
            messages=plain(messages), add_generation_prompt=add_generation_prompt, tools=None, documents=None,
            **plain(variables),
        )  # fmt: skip
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template tried something the sandbox forbids: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None


def find_chat_template(folder: Path) -> str | None:
    """The template a checkpoint ships, where transformers looks for it: chat_template.jinja,
    chat_template.json, processor_config.json, then tokenizer_config.json (a string, or a list of
    named templates of which "default" is taken)."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        template = read_json(folder / name, ChatTemplateError).get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        if template:
            return template
    return None
