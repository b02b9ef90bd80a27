"""The run's model behind a queue: requests in as `Job`s, batches out through one worker thread.

One frozen base holds every adapter. A single worker thread owns the model: requests that arrive while it
is busy, or within `max_wait_ms` of the first one of an idle spell, become ONE batch (up to `max_batch`
rows) -- routed together (one embedding call, `finished_run.route_prompts`) and generated together, a row
per request with its own adapter, budget, temperature and stop strings (`core.generate.generate_rows`,
adapters stacked per `core.mixed_lora`). A streamed row's text leaves as it is generated; a row that
finishes early is answered at once, before the rest of its batch. A row that fails while it is generated
fails its own request (500); a batch that fails as a whole is generated again row by row.

The event loop and the worker meet in `Job`: the loop awaits its futures, the worker resolves them through
`loop.call_soon_threadsafe`. Prompts are measured in characters first (a prompt too long for any
tokenization is refused untokenized) and tokenized once, off the event loop, in a thread of their own.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedrouter.core import generate
from fedrouter.errors import FedrouterError
from fedrouter.serving.finished_run import load_run, prompt_room, route_prompts, router_embedder
from fedrouter.serving.metrics import Metrics
from fedrouter.serving.schemas import ApiError, ChatRequest, CompletionRequest, internal

log = logging.getLogger("fedrouter.serve")

MAX_WAIT_MS = 10_000.0  # a batching wait longer than this is no batching policy anyone means
FIELD = "fedrouter"  # the response field (and model card field) that says which adapter served


@dataclass
class Job:
    """One request on its way through the batcher; the futures belong to the server's event loop."""

    kind: str  # the endpoint's name in `endpoints.ENDPOINTS` ("completions", "chat"): how its answer is written
    model: str  # the model the request named
    instruction: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    loop: asyncio.AbstractEventLoop
    via_router: bool = False  # the request named the routed model (else an adapter)
    adapter: str | None = None  # the request's adapter, or the router's choice (set by the batcher)
    distance: float | None = None
    routed: asyncio.Future = None
    done: asyncio.Future = None
    pieces: asyncio.Queue | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    arrived: float = field(default_factory=time.monotonic)
    # the worker's own record (its thread only): has text left for the client, has the answer been given
    streamed: bool = False
    answered: bool = False

    def __post_init__(self):
        self.routed, self.done = self.loop.create_future(), self.loop.create_future()
        self.pieces = asyncio.Queue() if self.stream else None

    # called from the worker thread
    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def set_routed(self) -> None:
        self._call(_resolve, self.routed, (self.adapter, self.distance))

    def text(self, piece: str) -> None:
        self.streamed = True
        self._call(self.pieces.put_nowait, ("text", piece))

    def finished(self, completion) -> None:
        if completion.finish_reason == "error":  # this row alone could not be generated
            log.warning("request %s failed while it was generated: %s", self.id, completion.error)
            self.failed(ApiError(500, f"this request could not be generated: {completion.error}", kind="server_error",
                                 code="generation_failed"))
            return
        self.answered = True
        if self.pieces is not None:
            self._call(self.pieces.put_nowait, ("done", completion))
        self._call(_resolve, self.done, completion)

    def failed(self, error: ApiError) -> None:
        self.answered = True
        self._call(_reject, self.routed, error)
        self._call(_reject, self.done, error)
        if self.pieces is not None:
            self._call(self.pieces.put_nowait, ("error", error))


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # retrieved: no "exception never retrieved" warning when nobody awaits it


_STOP = object()


class Service:
    """The run's model, router and batcher; everything that touches the model runs in one worker thread."""

    def __init__(self, run_dir: Path, max_batch: int = 64, max_wait_ms: float = 20.0, model: str | None = None,
                 cache_dir: Path | None = None):
        if max_batch < 1:
            raise FedrouterError(f"--max-batch must be at least 1, got {max_batch}")
        if not 0 <= max_wait_ms <= MAX_WAIT_MS:  # (NaN fails this too: it would wait forever)
            raise FedrouterError(f"--max-wait-ms must be from 0 to {MAX_WAIT_MS:g}, got {max_wait_ms}")
        run_dir = Path(run_dir)
        self.cfg, self.model, self.tokenizer, self.router = load_run(run_dir, model, cache_dir)
        self.embedder = router_embedder(self.router, self.model, self.tokenizer)
        self.adapters = list(dict.fromkeys(self.router["adapters"])) if self.router else ["global"]
        name = run_dir.resolve().name
        self.routed_name = name if name not in self.adapters else f"{name}-routed"
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        # Requests are tokenized off the event loop, one at a time, in a thread of their own with their own copy
        # of the tokenizer (a fast tokenizer is not to be used by two threads at once).
        self.request_tokenizer = copy.deepcopy(self.tokenizer)
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedrouter-tokenize")
        # No token stands for more characters than its vocabulary entry holds (a byte-level entry holds one
        # character per byte): a prompt over `prompt_limit * longest_token` characters is refused untokenized.
        self.longest_token = max((len(t) for t in self.tokenizer.get_vocab()), default=1) or 1
        self.prompt_limit = prompt_room(self.cfg, self.tokenizer)  # longer prompts would lose their start in `predict`
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self.created = int((run_dir / "results.json").stat().st_mtime) if (run_dir / "results.json").exists() else int(time.time())
        self.metrics = Metrics()
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None

    # -- models
    def model_ids(self) -> list[str]:
        return [self.routed_name, *self.adapters]

    def model_card(self, model_id: str) -> dict:
        routed = model_id == self.routed_name
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "fedrouter",
                FIELD: {"kind": "routed" if routed else "adapter",
                        "adapters": self.adapters if routed else [model_id],
                        "max_prompt_tokens": self.prompt_limit, "context_length": self.context_length}}

    # -- requests (server thread)
    def _encode(self, text: str) -> list[int]:
        """The prompt's token ids as `predict` builds them (BOS + the templated prompt; within the limit,
        nothing is cut). Runs in the tokenizing thread."""
        tok = self.request_tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return bos + tok(text, add_special_tokens=False)["input_ids"]

    async def new_job(self, req: CompletionRequest | ChatRequest, kind: str, instruction: str, loop) -> Job:
        """The request as a job for the `kind` endpoint, checked against the run's limits (a 4xx if not)."""
        if req.model not in self.model_ids():
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves: {', '.join(self.model_ids())}",
                           param="model", code="model_not_found")
        param = req.PROMPT_PARAM
        text = self.cfg.prompt_template.format(instruction=instruction)
        if len(text) > self.prompt_limit * self.longest_token:
            raise ApiError(400, f"{param}: the prompt is {len(text)} characters with the run's prompt template, more than "
                                f"this run's limit of {self.prompt_limit} tokens (max_seq_len {self.cfg.max_seq_len}) can "
                                f"hold at {self.longest_token} characters per token at most",
                           param=param, code="context_length_exceeded")
        prompt_ids = await loop.run_in_executor(self.tokenizing, self._encode, text)
        full = len(prompt_ids)
        if full > self.prompt_limit:
            raise ApiError(400, f"{param}: the prompt is {full} tokens with the run's prompt template, over this run's "
                                f"limit of {self.prompt_limit} (max_seq_len {self.cfg.max_seq_len})",
                           param=param, code="context_length_exceeded")
        asked = req.asked_tokens()
        room = self.context_length - len(prompt_ids) if self.context_length else None
        if room is not None and (asked or 1) > room:
            raise ApiError(400, f"max_tokens: the prompt's {len(prompt_ids)} tokens + max_tokens {asked or 1} exceed the "
                                f"model's context length of {self.context_length} tokens",
                           param="max_tokens", code="context_length_exceeded")
        max_tokens = asked if asked is not None else min(self.cfg.max_new_tokens, room or self.cfg.max_new_tokens)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        routed = req.model == self.routed_name
        return Job(kind, req.model, instruction, prompt_ids, max_tokens,
                   1.0 if req.temperature is None else req.temperature, 1.0 if req.top_p is None else req.top_p,
                   req.seed, tuple(s for s in stop if s), bool(req.stream),
                   bool(req.stream_options and req.stream_options.get("include_usage")), loop,
                   via_router=routed, adapter=None if routed else req.model)

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    # -- the worker
    def start(self) -> None:
        self.thread = threading.Thread(target=self._work, name="fedrouter-batcher", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.queue.put(_STOP)
            self.thread.join()
            self.thread = None
        self.tokenizing.shutdown(wait=False, cancel_futures=True)

    def _work(self) -> None:
        with torch.inference_mode():
            while True:
                first = self.queue.get()
                if first is _STOP:
                    return
                batch, stopping = [first], False
                deadline = first.arrived + self.max_wait
                while len(batch) < self.max_batch:
                    try:
                        item = self.queue.get_nowait()
                    except queue.Empty:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        try:
                            item = self.queue.get(timeout=remaining)
                        except queue.Empty:
                            break
                    if item is _STOP:
                        stopping = True
                        break
                    batch.append(item)
                self._run_batch(batch)
                if stopping:
                    return

    def _run_batch(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.cancel.is_set()]  # their clients left before the batch began
        if not jobs:
            return
        try:
            self._generate(jobs)
        except Exception as exc:  # a serving boundary: one request's trouble must not answer the others
            if len(jobs) == 1:
                log.exception("request %s failed", jobs[0].id)
                jobs[0].failed(internal(exc))
                return
            log.warning("a batch of %d request(s) failed (%s: %s); its unanswered requests are generated one by one",
                        len(jobs), type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            for j in jobs:
                if j.answered:
                    continue
                if j.streamed:  # part of its answer has left: it cannot start again
                    j.failed(internal(exc))
                else:
                    self._run_batch([j])

    def _generate(self, jobs: list[Job]) -> None:
        """Route the batch's routed requests (one embedding call) and generate every row together; a row
        that fails while generated fails its own request (`Job.finished`)."""
        routed = [j for j in jobs if j.via_router]
        if routed:
            adapters, distances = route_prompts(self.router, self.embedder, [j.instruction for j in routed])
            for j, a, d in zip(routed, adapters, distances):
                j.adapter, j.distance = a, (None if d is None else float(d))
        for j in jobs:
            j.set_routed()
        rows = [generate.Row(j.prompt_ids, j.max_tokens, j.adapter, j.temperature, j.top_p, j.seed, j.stop,
                             on_text=j.text if j.stream else None, on_done=j.finished, cancel=j.cancel) for j in jobs]
        start = time.perf_counter()
        # (looked up on the module at call time: a test stands in for generate_rows there)
        done = generate.generate_rows(self.model, self.tokenizer, rows, batch_size=len(rows))
        self.metrics.batch(jobs, time.perf_counter() - start, sum(c.completion_tokens for c in done))
