"""An OpenAI chat-completions request -> what minivlm runs: the messages in transformers' chat
format, their images decoded, and the sampling settings, each checked with an OpenAI-style error.

The shapes are OpenAI's (https://platform.openai.com/docs/api-reference/chat/create):
    {"model": "...", "messages": [{"role": "user", "content": "text" | [
        {"type": "text", "text": "..."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,...."}}]}],
     "max_tokens" | "max_completion_tokens": N, "temperature": T, "top_p": P, "stop": "s" | ["s", ...],
     "seed": S, "n": 1, "stream": bool, "stream_options": {"include_usage": bool}}
Fields minivlm does not act on are ignored when they would change nothing (user, metadata,
logprobs false, ...) and refused by name when they would (tools, response_format json, logit_bias).
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..processing.image import ImageError, load_image

ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # OpenAI's bound on stop strings
# field -> the values that change nothing (anything else is refused: the answer would not be what was asked)
UNSUPPORTED = {
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "top_logprobs": (None, 0),
    "logprobs": (None, False),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
}


class APIError(Exception):
    """An error answered as OpenAI answers one: an HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if 400 <= self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: list[dict]  # transformers' chat format: {"role", "content": [{"type": "image"} | {"type": "text"}]}
    images: list = field(default_factory=list)  # PIL images, in the order of the image parts
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def parse_request(body, served_name: str, allow_local_images: bool = False) -> ChatRequest:
    """A request's JSON body -> a ChatRequest, or an APIError that names the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if body.get("model") not in (served_name, None):
        raise APIError(
            404,
            f"the model {body.get('model')!r} does not exist; this server has {served_name!r}",
            "model",
            "model_not_found",
        )
    if body.get("n", 1) != 1:
        raise APIError(400, f"n={body.get('n')!r}: this server answers n=1 only", "n")
    for name, harmless in UNSUPPORTED.items():
        if body.get(name) not in harmless:
            raise APIError(400, f"{name}={body.get(name)!r} is not supported by this server (leave it out)", name)
    request = ChatRequest(messages=[])
    request.max_tokens = _max_tokens(body)
    request.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    if 0 < request.temperature < 1e-4:  # logits / 1e-300 overflow to inf: no distribution to draw from
        raise APIError(
            400, f"temperature {request.temperature} is too small to sample with; use 0 for greedy", "temperature"
        )
    request.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    request.stop = _stop(body.get("stop"))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise APIError(400, f"seed={seed!r}: expected a whole number from 0 to 2**63 - 1", "seed")
    request.seed = seed
    for name in ("stream",):
        if body.get(name) not in (None, True, False):
            raise APIError(400, f"{name}={body.get(name)!r}: expected true or false", name)
    request.stream = body.get("stream") is True
    options = body.get("stream_options")
    if options is not None and (
        not isinstance(options, dict) or options.get("include_usage") not in (None, True, False)
    ):
        raise APIError(400, "stream_options: expected {'include_usage': true or false}", "stream_options")
    request.include_usage = bool(options and options.get("include_usage"))
    request.messages, request.images = _messages(body.get("messages"), allow_local_images)
    return request


def _max_tokens(body: dict) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise APIError(400, f"{name}={value!r}: expected a whole number of at least 1", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{name}={value!r}: expected a number", name)
    if value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise APIError(400, f"{name}={value!r}: expected a number in {bound}", name)
    return float(value)


def _stop(stop) -> list[str]:
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, f"stop: expected a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    for s in stops:
        if not _utf8(s):
            raise APIError(400, "stop: a string holds a lone surrogate, which is no character", "stop")
    return stops


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _messages(messages, allow_local_images: bool) -> tuple[list[dict], list]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages: expected a non-empty list of {role, content}", "messages")
    out, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"{where}: expected {{'role': one of {list(ROLES)}, 'content': ...}}", where)
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list) and content:
            parts = []
            for k, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    images.append(_image(part.get("image_url"), f"{where}.content[{k}]", allow_local_images))
                    parts.append({"type": "image"})
                else:
                    raise APIError(400, f"{where}.content[{k}]: expected a 'text' or 'image_url' part", where)
        else:
            raise APIError(400, f"{where}.content: expected a string or a non-empty list of parts", where)
        out.append({"role": message["role"], "content": parts})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's: the answer continues from it", "messages")
    return out, images


def _image(spec, where: str, allow_local: bool):
    url = spec.get("url") if isinstance(spec, dict) else spec if isinstance(spec, str) else None
    if not isinstance(url, str):
        raise APIError(400, f"{where}: expected image_url {{'url': 'data:image/...;base64,...'}}", where)
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise APIError(400, f"{where}: a data: URL must be base64 ('data:image/png;base64,...')", where)
        try:
            source = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the data: URL's base64 does not decode", where) from None
        name = f"{where} (data: URL)"
    elif url.startswith(("http://", "https://")):
        raise APIError(400, f"{where}: this server fetches no URLs; send the image as a data: URL", where)
    elif allow_local:
        source = Path(url.removeprefix("file://"))
        name = str(source)
    else:
        raise APIError(400, f"{where}: local paths are read only with --allow-local-images; send a data: URL", where)
    try:
        return load_image(source, name)
    except (ImageError, OSError, ValueError) as e:
        raise APIError(400, f"{where}: the image cannot be read: {e}", where) from None
