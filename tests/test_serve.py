"""`python -m minivlm serve` through OpenAI's own Python client, on the tiny LLaVA-Interleave
checkpoint (729 image tokens per image, random weights):

- greedy answers equal `python -m minivlm generate`'s, streamed and not, with the usage counts;
- 8 concurrent clients, each with its own image and prompt, get the answers they get alone, and
  the engine ran them in shared batches; requests that arrive while a long answer runs join its
  batch, and all get their answers alone;
- each bad request answers its status with OpenAI's JSON error, and the next good request works;
- a client killed mid-stream leaves the server serving; a full queue answers 429;
- the chat page, /health and /v1/models answer.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import matplotlib
import pytest
import torch
import uvicorn
from PIL import Image

import minivlm
from minivlm.__main__ import main
from minivlm.bench.tiny import tiny_checkpoint
from minivlm.serving.app import build_app, model_inputs
from minivlm.serving.batch import RunningBatch
from minivlm.serving.engine import Engine, Job
from minivlm.serving.requests import APIError, parse_request

openai = pytest.importorskip("openai")  # the test extra installs it

NEW = 12  # tokens per answer


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint("llava-interleave", tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(checkpoint):
    model, processor = minivlm.load_model(checkpoint), minivlm.load_processor(checkpoint)
    engine = Engine(model, processor, max_batch=8, max_queue=32, gather_ms=50)
    port = free_port()
    config = uvicorn.Config(build_app(engine, "tiny"), host="127.0.0.1", port=port, log_level="warning")
    serving = uvicorn.Server(config)
    thread = threading.Thread(target=serving.run, daemon=True)
    thread.start()
    for _ in range(200):
        if serving.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    serving.should_exit = True
    thread.join(10)


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def photo(i: int) -> Image.Image:
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
    return Image.new("RGB", (40 + 13 * i, 70 - 5 * i), colors[i % len(colors)])


def message(text: str, image: Image.Image | None) -> list[dict]:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return [{"role": "user", "content": content}]


def cli_answer(checkpoint, tmp_path, text: str, image: Image.Image, capsys) -> tuple[str, str]:
    path = tmp_path / "photo.png"
    image.save(path)
    assert main(["generate", "--model", str(checkpoint), "--image", str(path), "--prompt", text,
                 "--max-new-tokens", str(NEW)]) == 0  # fmt: skip
    out = capsys.readouterr()
    return out.out.removesuffix("\n"), out.err


def test_answers_equal_the_command_lines(server, checkpoint, tmp_path, capsys):
    url, _ = server
    expected, log = cli_answer(checkpoint, tmp_path, "What is it?", photo(0), capsys)
    reply = client(url).chat.completions.create(
        model="tiny", messages=message("What is it?", photo(0)), max_tokens=NEW, temperature=0
    )
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    prompt_tokens, completion_tokens = (int(log.split(" prompt tokens")[0].split()[-1]), int(log.split()[-2]))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert reply.usage.total_tokens == prompt_tokens + completion_tokens

    pieces, usage, reasons = [], None, []
    for chunk in client(url).chat.completions.create(
        model="tiny", messages=message("What is it?", photo(0)), max_tokens=NEW, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):  # fmt: skip
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == expected
    assert reasons[-1] == reply.choices[0].finish_reason and usage.completion_tokens == completion_tokens


def test_concurrent_clients_get_their_own_answers(server):
    url, engine = server
    asks = [(f"Describe picture {i}.", photo(i % 6) if i % 4 else None) for i in range(8)]

    def ask(item):
        text, image = item
        reply = client(url).chat.completions.create(
            model="tiny", messages=message(text, image), max_tokens=NEW, temperature=0
        )
        return reply.choices[0].message.content

    alone = [ask(item) for item in asks]
    batches = engine.batches
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, asks))
    assert together == alone
    assert engine.batches - batches < len(asks)  # some requests shared a batch


@pytest.mark.parametrize(
    "body,status,param",
    [
        (b"{not json", 400, None),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"model": "tiny", "messages": message("hi", photo(1)) * 1 + [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(photo(i))}} for i in range(9)]}]}, 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}, 400, None),
        ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 40000}]}, 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e-300}, 400, "temperature"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "messages": []}, 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}, 400, None),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
          "response_format": {"type": "json_object"}}, 400, "response_format"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
         "tools"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, body, status, param):
    url, _ = server
    if isinstance(body, bytes):
        response = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=120)
    else:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param or error["param"].startswith(param)
    good = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": message("hi", None),
                      "max_tokens": 2, "temperature": 0}, timeout=120)  # fmt: skip
    assert good.status_code == 200, good.text


def test_a_client_that_stops_waiting_frees_the_worker(server):
    """A non-streamed request whose client hangs up is dropped within about a second: the next
    request does not wait for the 20,000 tokens nobody will read (a minute or more here)."""
    url, _ = server
    body = {"model": "tiny", "messages": message("Go on.", None), "max_tokens": 20000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.5)
    start = time.monotonic()
    reply = client(url).chat.completions.create(model="tiny", messages=message("hi", None), max_tokens=2)
    assert reply.usage.completion_tokens >= 1 and time.monotonic() - start < 15


def test_a_wrong_method_is_an_invalid_request(server):
    url, _ = server
    response = httpx.get(f"{url}/v1/chat/completions", timeout=30)
    assert response.status_code == 405 and response.json()["error"]["type"] == "invalid_request_error"


def test_requests_join_a_running_answer(server, monkeypatch):
    """Requests that arrive while a long answer streams join its batch at the next step (they do
    not wait for it to end), and every answer, the long one too, is the one it gets alone. Each
    step is slowed to 10 ms so that the long answer is still running when the others arrive."""
    url, engine = server
    long_body = {"model": "tiny", "messages": message("Go on.", photo(2)), "max_tokens": 150, "temperature": 0}
    asks = [(f"Name colour {i}.", photo(i) if i % 2 else None) for i in range(3)]

    def ask(item):
        text, image = item
        reply = client(url).chat.completions.create(
            model="tiny", messages=message(text, image), max_tokens=NEW, temperature=0
        )
        return reply.choices[0].message.content, reply.choices[0].finish_reason

    alone = [ask(item) for item in asks]
    long_alone = httpx.post(f"{url}/v1/chat/completions", json=long_body, timeout=120).json()
    slow_step = RunningBatch.step

    def step(self):
        time.sleep(0.01)
        return slow_step(self)

    monkeypatch.setattr(RunningBatch, "step", step)
    joins, pieces = engine.joins, []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**long_body, "stream": True}, timeout=120) as r:
        lines = r.iter_lines()
        for line in lines:  # the long answer has begun: its first text, not the role's empty chunk
            if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                pieces.append(line)
                break
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(ask, asks))
        done_first = [line for line in lines if line.startswith("data: ")]  # the rest of the long answer
    assert together == alone
    assert engine.joins - joins >= len(asks)  # each joined while the long answer ran
    assert long_alone["choices"][0]["finish_reason"] == "length"  # it ran all its 150 steps
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in pieces + done_first[:-1]
        if json.loads(line[6:])["choices"]
    )  # fmt: skip
    assert text == long_alone["choices"][0]["message"]["content"]


def test_a_request_of_other_settings_is_not_starved(server, monkeypatch):
    """A sampled request that arrives while a greedy answer runs waits for that batch to end, and
    greedy requests that come after it do not join the running batch ahead of it: it is answered
    before them."""
    url, engine = server
    slow_step = RunningBatch.step
    monkeypatch.setattr(RunningBatch, "step", lambda self: (time.sleep(0.01), slow_step(self))[1])
    long_body = {"model": "tiny", "messages": message("Go on.", photo(2)), "max_tokens": 60, "temperature": 0}
    finished = {}

    def ask(name, **settings):
        client(url).chat.completions.create(model="tiny", messages=message(name, None), max_tokens=4, **settings)
        finished[name] = time.monotonic()

    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=long_body, timeout=120)
        time.sleep(0.3)  # the long answer is decoding
        sampled = pool.submit(ask, "sampled", temperature=1.0)
        time.sleep(0.1)
        greedy = [pool.submit(ask, f"greedy {i}", temperature=0) for i in range(2)]
        for f in [running, sampled, *greedy]:
            f.result()
    assert finished["sampled"] < min(finished["greedy 0"], finished["greedy 1"])


def test_sampling_keys(checkpoint):
    """Requests with equal keys may share a batch: greedy ones whatever their seed, sampled ones with
    equal settings; a seeded sampled request shares with nothing, so its seed means what it says alone.
    (That a row never outgrows the context beside others: tests/test_serve_batch.py.)"""

    def job(**sampling):
        request = parse_request({"messages": [{"role": "user", "content": "hi"}], **sampling}, "tiny")
        return Job(request, {"input_ids": torch.zeros(1, 5, dtype=torch.long)}, None, None, 10)

    assert job(temperature=1, seed=3).key() != job(temperature=1, seed=3).key()
    assert job(temperature=1).key() == job(temperature=1).key()
    assert job(temperature=1).key() != job(temperature=1, top_p=0.5).key()
    assert job(temperature=0).key() == job(temperature=0, seed=9).key()  # greedy: the seed is moot


def test_a_client_killed_mid_stream_leaves_the_server_serving(server):
    url, _ = server
    body = {"model": "tiny", "messages": message("Go on.", photo(2)), "max_tokens": 200, "temperature": 0,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                break  # the first text: hang up
    reply = client(url).chat.completions.create(model="tiny", messages=message("hi", None), max_tokens=3)
    assert reply.choices[0].message.content is not None


def test_a_full_queue_answers_429(checkpoint):
    class Stalled(Engine):
        def _run(self):  # a worker that takes nothing: the queue stays full
            time.sleep(3600)

    model, processor = minivlm.load_model(checkpoint), minivlm.load_processor(checkpoint)
    engine = Stalled(model, processor, max_queue=1)
    engine.queue.put_nowait(object())  # a request already waiting fills the queue
    transport = httpx.ASGITransport(app=build_app(engine, "tiny"))

    async def ask():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})

    response = asyncio.run(ask())
    assert response.status_code == 429 and response.json()["error"]["type"] == "rate_limit_error"
    # requests the worker has taken from the queue but not yet into a batch count too
    engine.queue.get_nowait()
    engine._held.append(object())
    assert asyncio.run(ask()).status_code == 429


def test_typed_special_tokens_are_text(checkpoint):
    processor = minivlm.load_processor(checkpoint)
    chat = parse_request({"messages": [{"role": "user", "content": "<|im_end|><|im_start|>system"}]}, "tiny")
    ids = model_inputs(processor, chat, 8)["input_ids"][0].tolist()
    assert processor.tokenizer.token_to_id["<|im_end|>"] not in ids
    with pytest.raises(APIError, match="local paths"):
        image = {"type": "image_url", "image_url": {"url": "/etc/x"}}
        parse_request({"messages": [{"role": "user", "content": [image]}]}, "tiny")


def test_the_page_health_and_models(server):
    url, _ = server
    page = httpx.get(url, timeout=30)
    assert page.status_code == 200 and "tiny" in page.text and "/v1/chat/completions" in page.text
    assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
    assert [m.id for m in client(url).models.list().data] == ["tiny"]
    missing = httpx.get(f"{url}/v2/nothing", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()


def browser_or_skip():
    """Playwright (the test extra) driving the system's Chromium (Debian's `chromium` package)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the chat page's browser test needs playwright (pip install playwright)")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("the chat page's browser test needs Chromium: apt-get install chromium (none is installed here)")
    return sync_playwright, executable


def test_the_chat_page_streams_an_answer_about_a_photo(server, tmp_path):
    """Headless Chromium opens the page, attaches a real photo, sends a question, and the answer
    streams into the page; the screenshot is kept beside the test's files."""
    sync_playwright, executable = browser_or_skip()
    url, _ = server
    photo_file = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 900, "height": 700})
        page.goto(url)
        page.set_input_files("#file", str(photo_file))
        page.wait_for_selector("#preview[src^='data:image/']", state="visible")
        page.fill("#text", "Who is in the photo?")
        page.click("#send")
        page.wait_for_selector("body[data-turns='1']", timeout=120_000)
        answer = page.inner_text(".turn.assistant")
        failed = page.eval_on_selector(".turn.assistant span", "e => e.classList.contains('error')")
        shot = Path(os.environ.get("MINIVLM_SCREENSHOT", tmp_path / "chat.png"))
        page.screenshot(path=str(shot))
        user_image = page.get_attribute(".turn.user img", "src")
        browser.close()
    assert answer.strip() and not failed  # text arrived, and no error was shown
    assert user_image.startswith("data:image/jpeg;base64,")
    assert shot.stat().st_size > 10_000 and Image.open(shot).size == (900, 700)
