"""Chat templates: the checkpoint's own jinja2 template, rendered in a sandbox as transformers does.

Templates come from the hub and are untrusted code: they run in jinja2's immutable sandbox, see
only plain JSON-like data (images in a message become a placeholder string), and get the same
helpers transformers gives them (`raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII text, loop controls, trimmed blocks), so a template renders the same text in both.

A template may also loop, recurse or grow without end, so a render is bounded: it runs in a worker
thread under a deadline ($MINIVLM_TEMPLATE_SECONDS, default 5 s) and its output may not exceed
$MINIVLM_MAX_PROMPT_CHARS characters (default 4,000,000, about a million tokens, several times any
supported context). String and list repetition, concatenation and powers are checked before they
are computed, and the output is streamed and counted as it is produced.
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
import json
import math
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .files import env_number, read_json


class ChatTemplateError(ValueError):
    """No template, or one that fails to render; the message names the file or the template's own error."""


TEMPLATE_SECONDS, SECONDS_ENV = 5.0, "MINIVLM_TEMPLATE_SECONDS"
MAX_PROMPT_CHARS, CHARS_ENV = 4_000_000, "MINIVLM_MAX_PROMPT_CHARS"
MAX_POWER_BITS = 100_000  # 10 ** 30103: Python will not print an int of more than 4300 digits anyway


def template_seconds() -> float:
    """How long one chat template render may take: $MINIVLM_TEMPLATE_SECONDS, else 5 seconds."""
    return env_number(SECONDS_ENV, TEMPLATE_SECONDS, float, ChatTemplateError)


def max_prompt_chars(error: type[Exception] = ChatTemplateError) -> int:
    """The longest prompt minivlm renders or tokenizes: $MINIVLM_MAX_PROMPT_CHARS, else 4,000,000 characters."""
    return env_number(CHARS_ENV, MAX_PROMPT_CHARS, int, error)


def check_prompt_length(text: str, what: str = "the prompt", error: type[Exception] = ChatTemplateError) -> None:
    limit = max_prompt_chars(error)
    if len(text) > limit:
        raise error(f"{what} is {len(text):,} characters, over the limit of {limit:,} ({CHARS_ENV} raises it)")


class _Deadline(BaseException):
    """Raised inside a render that ran out of time (a BaseException: no template code can catch it)."""


class _TooLong(Exception):
    pass


# (deadline as time.monotonic(), character limit) of the render running in this thread
_bounds: contextvars.ContextVar[tuple[float, int]] = contextvars.ContextVar(
    "template_bounds", default=(math.inf, MAX_PROMPT_CHARS)
)


def _check_deadline() -> None:
    if time.monotonic() > _bounds.get()[0]:
        raise _Deadline()


def _too_long(what: str, n: int) -> _TooLong:
    limit = _bounds.get()[1]
    return _TooLong(f"{what} of {n:,} characters or items, over the limit of {limit:,} ({CHARS_ENV} raises it)")


def _check_size(value, what: str) -> None:
    if isinstance(value, (str, list, tuple)) and len(value) > _bounds.get()[1]:
        raise _too_long(what, len(value))


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with `*`, `+` and `**` checked before they run (no 'x' * 10**9), every
    call and filter checked for the deadline and for a size argument beyond the character limit."""

    intercepted_binops = frozenset(["*", "+", "**", "%"])  # (also keeps them from being folded at compile time)

    def call_binop(self, context, operator, left, right):
        _check_deadline()
        limit = _bounds.get()[1]
        if operator == "*":
            seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(seq, (str, list, tuple)) and _int(n) and len(seq) * n > limit:
                raise _too_long("a repetition", len(seq) * n)
        elif operator == "+":
            if (
                isinstance(left, (str, list, tuple))
                and isinstance(right, (str, list, tuple))
                and len(left) + len(right) > limit
            ):
                raise _too_long("a concatenation", len(left) + len(right))
        elif (
            operator == "**"
            and _int(left)
            and _int(right)
            and abs(left) > 1
            and right * math.log2(abs(left)) > MAX_POWER_BITS
        ):
            raise jinja2.exceptions.SecurityError(f"{left} ** {right} is a number of more than {MAX_POWER_BITS:,} bits")
        elif operator == "%" and isinstance(left, str):  # printf-style: '%1000000000s' % x
            _check_format(left)
            _check_arguments(right if isinstance(right, tuple) else (right,), {})
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value):
        formatter = super().wrap_str_format(value)
        if formatter is not None:  # '{:>1000000000}'.format(x)
            _check_format(value.__self__)
        return formatter

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        _check_deadline()
        _check_arguments(args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        _check_size(result, "a call's result")
        return result


def _check_arguments(args, kwargs) -> None:
    """No width or count beyond the limit, and no argument already that long (a string doubled by recursion)."""
    limit = _bounds.get()[1]
    for value in (*args, *kwargs.values()):
        if _int(value) and value > limit:
            raise _too_long("a size argument", value)
        _check_size(value, "an argument")


def _check_format(text: str) -> None:
    """A format string's widths and precisions are numbers in it: none may exceed the limit."""
    limit = _bounds.get()[1]
    for digits in re.findall(r"\d{%d,}" % len(str(limit)), text):
        if int(digits) > limit:
            raise _too_long("a format width", int(digits))


def _bounded_filter(f):
    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment markers
    def bounded(*args, **kwargs):
        _check_deadline()
        _check_arguments(args[1:], kwargs)
        result = f(*args, **kwargs)
        _check_size(result, "a filter's result")
        return result

    return bounded


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
        _check_deadline()
        _check_size(value, f"namespace attribute {name!r}")  # a string doubled in a loop: 'ns.s = ns.s ~ ns.s'
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
    if not isinstance(source, str):
        raise ChatTemplateError(f"the chat template is a {type(source).__name__}; expected a jinja template string")
    return _compile(source)


@functools.lru_cache(maxsize=16)  # a conversation renders its template at every turn
def _compile(source: str) -> jinja2.Template:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    env.globals["namespace"] = SafeNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None
    except (RecursionError, MemoryError) as e:
        raise ChatTemplateError(
            f"the chat template does not compile: nested too deeply or too large ({type(e).__name__})"
        ) from None


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


def render(
    template: str | jinja2.Template, messages: list[dict], add_generation_prompt: bool = False, **variables
) -> str:
    """Render one conversation. `variables` are what the tokenizer adds: bos_token, eos_token, ....

    Bounded in time ($MINIVLM_TEMPLATE_SECONDS) and output length ($MINIVLM_MAX_PROMPT_CHARS); any
    failure of the template is a ChatTemplateError."""
    if not isinstance(template, jinja2.Template):
        template = compile_template(template)
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages: expected a list of dicts with a 'role', got {type(messages).__name__}")
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise ChatTemplateError(f"each message needs to be a dict with a 'role', got {message!r}"[:300])
    seconds, limit = template_seconds(), max_prompt_chars()
    context = dict(
        messages=plain(messages),
        add_generation_prompt=add_generation_prompt,
        tools=None,
        documents=None,
        **plain(variables),
    )
    result: dict[str, Any] = {}

    def work():
        _bounds.set((time.monotonic() + seconds, limit))
        try:
            pieces, total = [], 0
            for piece in template.generate(**context):  # streamed: the length is checked as it grows
                total += len(piece)
                if total > limit:
                    raise _TooLong(f"an output of more than {limit:,} characters ({CHARS_ENV} raises the limit)")
                _check_deadline()
                pieces.append(piece)
            result["text"] = "".join(pieces)
        except BaseException as e:  # noqa: BLE001 (handed to the caller's thread)
            result["error"] = e

    worker = threading.Thread(target=work, name="minivlm-chat-template", daemon=True)
    worker.start()
    worker.join(seconds + 0.1)
    if worker.is_alive():  # a loop that calls nothing: interrupt it between two bytecodes
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(_Deadline))
        worker.join(1.0)
    if "text" in result:
        return result["text"]
    error = result.get("error")
    if error is None or isinstance(error, _Deadline):
        raise ChatTemplateError(
            f"the chat template did not finish within {seconds:g} s (a loop without end?; "
            f"{SECONDS_ENV} raises the limit)"
        )
    if isinstance(error, _TooLong):
        raise ChatTemplateError(f"the chat template asked for {error}")
    if isinstance(error, jinja2.exceptions.SecurityError):
        raise ChatTemplateError(f"the chat template tried something the sandbox forbids: {error}")
    if isinstance(error, jinja2.exceptions.TemplateError):
        raise ChatTemplateError(f"the chat template refused the conversation: {error}")
    if isinstance(error, RecursionError):
        raise ChatTemplateError("the chat template recursed too deeply (a macro that calls itself without end?)")
    if isinstance(error, MemoryError):
        raise ChatTemplateError("the chat template ran out of memory building its output")
    if isinstance(error, Exception):
        raise ChatTemplateError(f"the chat template failed: {type(error).__name__}: {error}")
    raise error  # KeyboardInterrupt, SystemExit: not the template's


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
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template and not isinstance(template, str):
            raise ChatTemplateError(
                f"{folder / name}: chat_template is a {type(template).__name__}; expected a jinja "
                "string or a list of {'name': ..., 'template': ...}"
            )
        if template:
            return template
    return None
