"""The HTTP side: OpenAI's chat-completions API, /v1/models, /health and the chat page, as a
Starlette app (the `serve` extra) around one Engine.

Each request is checked and tokenized in a worker thread before it is queued (a bad image or a
prompt over the context answers 400 at once, never after a wait), then its text arrives from the
engine: gathered into one JSON answer, or streamed as server-sent events in OpenAI's chunk format,
ended by `data: [DONE]`. A client that goes away mid-answer has its row dropped at the next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from ..conversation import render_segments, tokenize_segments
from ..generation import GenerationError
from ..processing.chat import ChatTemplateError
from ..processing.image import ImageError
from ..processing.processor import ProcessorError
from .engine import Engine, Job
from .requests import APIError, ChatRequest, parse_request

PAGE = Path(__file__).with_name("page.html")
POLL_SECONDS = 1.0  # how often a waiting non-streamed request looks whether its client is still there


def model_inputs(processor, request: ChatRequest, max_images: int) -> dict:
    """The request's messages in the checkpoint's chat template, tokenized with the user's text as
    text (a special token typed in a message is not a control token), images expanded."""
    if len(request.images) > max_images:
        raise APIError(
            400, f"{len(request.images)} images; this server takes at most {max_images} per request", "messages"
        )
    if request.images and processor.family is None:
        raise APIError(400, "this model is text-only; it takes no images", "messages")
    try:
        if processor.chat_template is None:
            raise APIError(400, "the checkpoint ships no chat template, so it takes no chat messages", "messages")
        _, segments = render_segments(processor, request.messages)
        inputs = tokenize_segments(processor, segments, request.images, first=True)
    except (ChatTemplateError, ProcessorError, ImageError, GenerationError, ValueError) as e:
        raise APIError(400, str(e), "messages") from None  # ValueError: the tokenizer's (a lone surrogate)
    return inputs


def build_app(engine: Engine, served_name: str, allow_local_images: bool = False, max_images: int = 8) -> Starlette:
    created = int(time.time())

    async def completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(APIError(400, f"the request body is not valid JSON ({e})"))
        try:
            # images decode here: in a worker thread, so one large image never holds up the event loop
            chat = await run_in_threadpool(parse_request, body, served_name, allow_local_images)
            inputs = await run_in_threadpool(model_inputs, engine.processor, chat, max_images)
            prompt = int(inputs["input_ids"].shape[1])
            max_tokens = engine.check_context(prompt, chat.max_tokens or engine.default_max_tokens(prompt))
            job = Job(chat, inputs, asyncio.get_running_loop(), asyncio.Queue(), max_tokens)
            engine.submit(job)
        except APIError as e:
            return error(e)
        ident = f"chatcmpl-{secrets.token_hex(12)}"
        if chat.stream:
            return StreamingResponse(events(job, ident), media_type="text/event-stream")
        return await answer(request, job, ident)

    async def answer(request: Request, job: Job, ident: str):
        checked = time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), POLL_SECONDS)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - checked >= POLL_SECONDS:  # text may arrive every few ms: look anyway
                checked = time.monotonic()
                if await request.is_disconnected():
                    job.cancelled = True  # its row is dropped at the next step
                    return JSONResponse({}, status_code=499)
            if event is None:
                continue
            if event[0] == "error":
                return error(event[1])
            else:  # the end: the text is on the job (Job.send)
                _, reason, completion = event
                message = {"role": "assistant", "content": "".join(job.text)}
                return JSONResponse(
                    {
                        "id": ident,
                        "object": "chat.completion",
                        "created": int(job.created),
                        "model": served_name,
                        "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": None}],
                        "usage": usage(job, completion),
                    }
                )

    async def events(job: Job, ident: str):
        def chunk(delta: dict, reason=None, **extra) -> str:
            body = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": int(job.created),
                "model": served_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}],
                **extra,
            }
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    yield chunk({"content": event[1]})
                elif event[0] == "error":
                    yield f"data: {json.dumps(event[1].body())}\n\n"
                    break
                else:
                    _, reason, completion = event
                    yield chunk({}, reason)
                    if job.request.include_usage:
                        body = {
                            "id": ident,
                            "object": "chat.completion.chunk",
                            "created": int(job.created),
                            "model": served_name,
                            "choices": [],
                            "usage": usage(job, completion),
                        }
                        yield f"data: {json.dumps(body)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # a client gone mid-stream: its row is dropped at the next step
            job.cancelled = True

    async def models(_):
        card = {"id": served_name, "object": "model", "created": created, "owned_by": "minivlm"}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(_):
        return JSONResponse({"status": "ok", "queued": engine.waiting()})

    async def page(_):
        return HTMLResponse(PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", served_name))

    async def http_error(_, exc: HTTPException):
        return error(APIError(exc.status_code, exc.detail or "not found"))

    routes = [
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/", page, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def usage(job: Job, completion: int) -> dict:
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": job.prompt_tokens + completion,
    }


def error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)
