"""The model's one worker: requests wait in a bounded queue, and those waiting when the worker is
free run together as one left-padded batch, sharing every decode step.

Rows of a batch share the sampling settings (a batch is formed from requests whose temperature,
top_p and seed agree; a seeded sampled request runs alone, so that its seed means what it says).
Each row stops on its own: at the checkpoint's end token, at one of its stop strings, or at its
max_tokens; the batch stops when every row has. A row whose client has gone is dropped at the next
step. The worker hands text to each request's asyncio queue and never waits on a client, so a slow
reader stalls nobody.

Greedy rows give the tokens they give alone: the prompt's padding is masked, and positions count
real tokens only (tests/test_serve.py checks it on 8 concurrent requests).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..generation import GenerationError, Sampling, StopRules, StopText, defaults_of, generate_steps
from ..generation_checks import check_context
from ..processing.batching import collate
from ..processing.tokenizer.base import StreamDecoder
from .requests import APIError, ChatRequest


@dataclass
class Job:
    request: ChatRequest
    inputs: dict  # the processor's inputs for this request alone (batch of 1)
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # ("text", str), ("done", finish_reason, completion_tokens), ("error", APIError)
    max_tokens: int
    cancelled: bool = False  # the client has gone
    count: int = 0  # tokens generated
    finished: bool = False
    decoder: StreamDecoder | None = None
    matcher: StopText | None = None
    created: float = field(default_factory=time.time)
    outbox: list = field(default_factory=list)  # events not yet handed to the event loop

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    def send(self, *event) -> None:
        """Queue an event; `deliver` hands it to the client's event loop (once per decode step)."""
        self.outbox.append(event)

    def key(self) -> tuple:
        """Requests with equal keys may share a batch."""
        r = self.request
        if r.temperature == 0:
            return ("greedy",)
        if r.seed is not None:  # alone: a seed gives the answer it gives alone, batched beside nothing
            return ("seeded", id(self))
        return ("sample", r.temperature, r.top_p)


def deliver(jobs: list[Job]) -> None:
    """Hand every job's queued events to its event loop: one wake-up of each loop per call (per
    decode step), not one per token and row; waking the loop costs a system call, and the loop's
    thread competes with this one for the interpreter."""
    by_loop: dict = {}
    for job in jobs:
        if job.outbox:
            by_loop.setdefault(job.loop, []).append((job.events, job.outbox))
            job.outbox = []
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list) -> None:
    for events, outbox in items:
        for event in outbox:
            events.put_nowait(event)


class Engine:
    def __init__(self, model, processor, max_batch: int = 8, max_queue: int = 64, gather_ms: float = 5.0):
        self.model, self.processor = model, processor
        self.max_batch, self.gather = max_batch, gather_ms / 1000
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.defaults = defaults_of(model)
        self.device = next(model.parameters()).device
        self.pad_id = self.defaults.pad_token_id
        if self.pad_id is None:
            self.pad_id = (self.defaults.eos_token_ids or (0,))[0]
        self.batches = 0  # how many batches ran, and how many rows: the tests read them
        self.rows = 0
        self._held: list[Job] = []  # requests taken from the queue that did not fit the last batch
        self._thread = threading.Thread(target=self._run, name="minivlm-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or APIError 429 when the queue is full."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise APIError(429, "the server's queue is full; try again shortly", code="queue_full") from None

    def default_max_tokens(self, prompt_tokens: int) -> int:
        """OpenAI's default: up to the end of the context (here at most 1024, so a runaway answer ends)."""
        room = (self.defaults.max_positions or prompt_tokens + 1024) - prompt_tokens
        return max(1, min(1024, room))

    def check_context(self, prompt_tokens: int, max_tokens: int) -> int:
        """max_tokens cut to the context's end, or APIError 400 when the prompt leaves no room."""
        try:
            return check_context(prompt_tokens, max_tokens, self.defaults)
        except GenerationError as e:
            raise APIError(400, str(e), "messages", "context_length_exceeded") from None

    # -- the worker --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            jobs = [j for j in self._next_batch() if not j.cancelled]
            if jobs:
                self._attempt(jobs)

    def _attempt(self, jobs: list[Job]) -> None:
        """Generate for the jobs; the worker outlives any failure. A batch that fails for a reason
        other than the request's (an APIError) is tried again row by row, so one row's problem
        reaches that row only; a row that fails alone gets the error."""
        try:
            self._generate(jobs)
        except Exception as e:  # noqa: BLE001
            if len(jobs) > 1 and not isinstance(e, APIError):
                for j in jobs:
                    self._attempt([j])
                return
            err = e if isinstance(e, APIError) else APIError(500, f"generation failed: {type(e).__name__}: {e}")
            for j in jobs:
                if not j.finished:
                    j.send("error", err)
        finally:
            deliver(jobs)

    def _next_batch(self) -> list[Job]:
        first = self._held.pop(0) if self._held else self.queue.get()
        batch, others = [first], []
        # Requests sent together arrive a few ms apart (each is tokenized on its own thread): wait
        # while they keep coming, `gather` after the last one, at most 10 x gather in all.
        limit = time.monotonic() + 10 * self.gather
        while len(batch) < self.max_batch:
            if self._held:
                job = self._held.pop(0)
            else:
                try:
                    job = self.queue.get(timeout=max(0.0, min(self.gather, limit - time.monotonic())))
                except queue.Empty:
                    break
            fits = self._fits([*batch, job])
            (batch if job.key() == first.key() and fits else others).append(job)
        self._held = others + self._held
        return batch

    def _fits(self, jobs: list[Job]) -> bool:
        """Whether the rows fit the context together: the batch is as long as its longest prompt,
        and every row gets the decode steps of the longest answer asked for."""
        context = self.defaults.max_positions
        return context is None or max(j.prompt_tokens for j in jobs) + max(j.max_tokens for j in jobs) <= context

    def _generate(self, jobs: list[Job]) -> None:
        tokenizer = self.processor.tokenizer
        for j in jobs:
            j.decoder, j.matcher = StreamDecoder(tokenizer, skip_special_tokens=True), StopText(j.request.stop)
        batch = collate([j.inputs for j in jobs], self.pad_id, self.processor.rows_first, side="left")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        request = jobs[0].request
        sampling = Sampling(temperature=request.temperature, top_p=request.top_p)
        eos = set(self.defaults.eos_token_ids)
        self.batches += 1
        self.rows += len(jobs)
        steps = generate_steps(
            self.model,
            max_new_tokens=max(j.max_tokens for j in jobs),
            sampling=sampling,
            stop=StopRules(eos),
            seed=request.seed,
            **batch,
        )
        try:
            with torch.inference_mode():
                for token, _ in steps:
                    for j, t in zip(jobs, token.tolist()):
                        if j.finished:
                            continue
                        if j.cancelled:
                            j.finished = True
                            continue
                        j.count += 1
                        if t in eos:
                            self._finish(j, "stop")
                            continue
                        shown, stopped = j.matcher.push(j.decoder.push(t))
                        if shown:
                            j.send("text", shown)
                        if stopped:
                            j.finished = True
                            j.send("done", "stop", j.count)
                        elif j.count >= j.max_tokens:
                            self._finish(j, "length")
                    deliver(jobs)
                    if all(j.finished for j in jobs):
                        break
        finally:
            steps.close()
        for j in jobs:  # the context's end came first
            if not j.finished:
                self._finish(j, "length")

    def _finish(self, job: Job, reason: str) -> None:
        shown, stopped = job.matcher.push(job.decoder.flush())
        shown += "" if stopped else job.matcher.flush()
        if shown:
            job.send("text", shown)
        job.finished = True
        job.send("done", "stop" if stopped else reason, job.count)
