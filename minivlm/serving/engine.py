"""The model's one worker: requests wait in a bounded queue, and join the running batch
(batch.py) at the next decode step boundary: a request that arrives while others decode does not
wait for them to finish.

Rows of a batch share the sampling settings (requests whose temperature and top_p agree; a seeded
sampled request runs alone, so that its seed means what it says). A request whose settings differ
from the running batch's waits for it to end, and while one waits no more requests join, so the
batch drains and nobody waits for ever. Each row stops on its own: at the checkpoint's end token,
at one of its stop strings, or at its max_tokens, and leaves the batch; a row whose client has gone
leaves at the next step. The worker hands text to each request's asyncio queue and never waits on
a client, so a slow reader stalls nobody.

Greedy rows give the tokens they give alone: each prompt is prefilled alone, the other rows' slots
are masked, and positions count the row's own tokens (tests/test_serve.py checks it on 8
concurrent requests and on requests that join mid-answer).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..generation import GenerationError, Sampling, StopText, defaults_of
from ..generation_checks import check_context
from ..processing.batching import collate
from ..processing.tokenizer.base import StreamDecoder
from .batch import RunningBatch
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
    text: list = field(default_factory=list)  # a non-streamed answer's text so far

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    def send(self, *event) -> None:
        """Queue an event; `deliver` hands it to the client's event loop (once per decode step). A
        non-streamed answer's text is kept here instead (`text`) and read whole at its end: its
        client's loop is woken once, not every step."""
        if event[0] == "text" and not self.request.stream:
            self.text.append(event[1])
        else:
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
        self.max_queue = max_queue
        self.defaults = defaults_of(model)
        self.eos = set(self.defaults.eos_token_ids)
        self.pad_id = self.defaults.pad_token_id
        if self.pad_id is None:
            self.pad_id = (self.defaults.eos_token_ids or (0,))[0]
        # What the engine did, for the tests and `bench serve`: batches started, rows served, and
        # rows that joined a batch while its other rows were decoding.
        self.batches = self.rows = self.joins = 0
        self._held: list[Job] = []  # requests taken from the queue that wait for the next batch
        self._thread = threading.Thread(target=self._run, name="minivlm-engine", daemon=True)
        self._thread.start()

    def waiting(self) -> int:
        """Requests not yet in the running batch: queued, or taken by the worker and held."""
        return self.queue.qsize() + len(self._held)

    def submit(self, job: Job) -> None:
        """Queue a job, or APIError 429 when max_queue requests wait already (the held ones count:
        the worker takes every queued request at each step, so the queue alone would never fill)."""
        try:
            if self.waiting() >= self.max_queue:
                raise queue.Full
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
            first = self._held.pop(0) if self._held else self.queue.get()
            if not first.cancelled:
                self._gather()
                self._serve(self.new_batch(first), first)

    def _gather(self) -> None:
        """Before a batch starts, wait for the requests sent with its first: they arrive a few ms
        apart (each is read and tokenized on a thread of its own), and one prefill of them all,
        with both cores free, costs less than a prefill each while the others are still being
        read. Wait while they keep coming, `gather` after the last, at most 10 x gather in all.
        Requests that come later join at a step boundary."""
        limit = time.monotonic() + 10 * self.gather
        while len(self._held) < self.max_batch - 1:
            try:
                self._held.append(self.queue.get(timeout=max(0.0, min(self.gather, limit - time.monotonic()))))
            except queue.Empty:
                return

    def new_batch(self, first: Job) -> RunningBatch:
        request = first.request
        sampling = Sampling(temperature=request.temperature, top_p=request.top_p)
        return RunningBatch(self.model, first.key(), sampling, request.seed, self.defaults.max_positions)

    def _serve(self, batch: RunningBatch, first: Job) -> None:
        """Run one batch until its last row leaves, taking in the requests that may join it at
        every step boundary (the first with those that came with it)."""
        self.batches += 1
        self._held.insert(0, first)
        while True:
            self._admit(batch)
            if not batch:
                return
            try:
                with torch.inference_mode():
                    tokens = batch.step().tolist()
            except Exception as e:  # noqa: BLE001  a failed step ends the batch, never the worker
                self._fail(batch.rows, e)
                batch.leave(list(range(len(batch))))
                return
            for job, token in zip(batch.rows, tokens):
                self._take(job, token)
            self._leave(batch)

    def _admit(self, batch: RunningBatch) -> None:
        """Join the waiting requests that share the batch's key and fit beside its rows, prefilled
        together; the others wait (held, in arrival order). While a request of another key waits,
        none joins: the batch drains, and that request starts the next one."""
        waiting, self._held, joining = self._held, [], []
        while True:
            if waiting:
                job = waiting.pop(0)
            else:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
            if job.cancelled:
                continue
            blocked = any(j.key() != batch.key for j in self._held)
            if not blocked and len(batch) + len(joining) < self.max_batch and batch.room_for([*joining, job]):
                joining.append(job)
            else:
                self._held.append(job)
        if joining:
            self.joins += len(joining) if batch else 0
            self._join(batch, joining)

    def _join(self, batch: RunningBatch, jobs: list[Job]) -> None:
        """Prefill the jobs into the batch and hand each its first token. A failure reaches these
        jobs only; a group that fails for a reason other than a request's (an APIError) is tried
        again one by one, so that one request's problem reaches that request only."""
        for job in jobs:
            job.decoder = StreamDecoder(self.processor.tokenizer, skip_special_tokens=True)
            job.matcher = StopText(job.request.stop)
        try:
            with torch.inference_mode():
                inputs = collate([j.inputs for j in jobs], self.pad_id, self.processor.rows_first, side="left")
                tokens = batch.join(jobs, {k: v.to(batch.device) for k, v in inputs.items()}).tolist()
        except Exception as e:  # noqa: BLE001
            if len(jobs) > 1 and not isinstance(e, APIError):
                for job in jobs:
                    self._join(batch, [job])
            else:
                self._fail(jobs, e)
            return
        self.rows += len(jobs)
        for job, token in zip(jobs, tokens):
            self._take(job, token)
        self._leave(batch)

    def _take(self, job: Job, token: int) -> None:
        """A row's new token: its text, or the end of its answer."""
        if job.finished:
            return
        if job.cancelled:
            job.finished = True
            return
        job.count += 1
        if token in self.eos:
            self._finish(job, "stop")
            return
        shown, stopped = job.matcher.push(job.decoder.push(token))
        if shown:
            job.send("text", shown)
        if stopped:
            job.finished = True
            job.send("done", "stop", job.count)
        elif job.count >= job.max_tokens:
            self._finish(job, "length")

    def _leave(self, batch: RunningBatch) -> None:
        """Hand this step's text to the clients, and drop the rows that are done or whose client has gone."""
        deliver(batch.rows)
        batch.leave([i for i, j in enumerate(batch.rows) if j.finished or j.cancelled])

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        if not isinstance(error, APIError):
            error = APIError(500, f"generation failed: {type(error).__name__}: {error}")
        for job in jobs:
            if not job.finished:
                job.finished = True
                job.send("error", error)
        deliver(jobs)

    def _finish(self, job: Job, reason: str) -> None:
        shown, stopped = job.matcher.push(job.decoder.flush())
        shown += "" if stopped else job.matcher.flush()
        if shown:
            job.send("text", shown)
        job.finished = True
        job.send("done", "stop" if stopped else reason, job.count)
