"""Batched generation from already-tokenised prompts. Knows nothing of federation.

`generate` is the greedy path every evaluation uses (answers as strings). `generate_rows` is the same
loop with per-row requests, as a server needs them: each row its own adapter, token budget, temperature
(0: greedy), stop strings and a callback for streamed text; a row stops at EOS, at a stop string or at
its budget, and its result says which (`Completion.finish_reason`). What one row brings (its seed, its
sampling, its callbacks) fails that row alone: it ends with finish_reason "error" and the reason, while
the rest of its batch goes on.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedrouter.core import mixed_lora


@dataclass
class Row:
    """One prompt to complete, and how."""

    prompt_ids: list[int]
    max_new_tokens: int = 32
    adapter: str | None = None  # None: the model's active adapter(s) (then every row of the call is None)
    temperature: float = 0.0  # 0: greedy; else sampled from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling (with temperature > 0)
    seed: int | None = None  # sampling seed (None: a fresh random one)
    stop: tuple[str, ...] = ()  # the answer ends before the first of these
    on_text: Callable[[str], None] | None = None  # called with each new piece of the answer, as it is generated
    on_done: Callable[[Completion], None] | None = None  # called once, as soon as this row is finished
    cancel: threading.Event | None = None  # set: stop this row at the next step (its client went away)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop": EOS or a stop string; "length": the row's max_new_tokens; "error": see `error`
    completion_tokens: int  # tokens generated for this row (an EOS included)
    error: str | None = None  # why this row failed (its own seed, sampling or callback), the rest of the batch unharmed


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int = 32,
    batch_size: int = 64,
    adapter_names: list[str] | None = None,
    on_batch=None,
) -> list[str]:
    """Greedy completions of `prompts` (token id lists), in input order, stopped at EOS.

    Prompts are sorted by length so that each batch carries little padding, and left-padded so every
    row's next token sits in the last column. `adapter_names` (one per prompt) lets a peft model serve
    rows with different adapters in one call. `on_batch(rows)`, if given, is told which prompts (input
    indices, in row order) the next batch holds, before it is generated (per-row weighting hooks use it).
    """
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError("adapter_names must name one adapter per prompt")
    rows = [Row(p, max_new_tokens, adapter_names[i] if adapter_names is not None else None) for i, p in enumerate(prompts)]
    return [c.text for c in generate_rows(model, tokenizer, rows, batch_size, on_batch=on_batch)]


@torch.no_grad()
def generate_rows(model, tokenizer, rows: list[Row], batch_size: int = 64, on_batch=None,
                  stack_adapters: bool = True) -> list[Completion]:
    """One `Completion` per row, in input order; batches of up to `batch_size` rows, one generate call
    each, whatever mix of adapters, budgets and temperatures they hold.

    Rows naming adapters run as one mixed batch: stacked (fedrouter.core.mixed_lora) where the adapters
    allow it and `stack_adapters`, else with peft's `adapter_names`. Greedy rows get exactly the tokens
    `generate` gives them, whatever else shares their batch.
    """
    named = [r.adapter is not None for r in rows]
    if any(named) and not all(named):
        raise ValueError("either every row names its adapter or none does")
    if any(r.max_new_tokens < 1 for r in rows):
        raise ValueError("max_new_tokens must be positive")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt_ids))
    outputs: list[Completion | None] = [None] * len(rows)
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = [rows[i] for i in index]
        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for k, row in enumerate(batch):
            ids = row.prompt_ids
            input_ids[k, width - len(ids) :] = torch.tensor(ids)
            mask[k, width - len(ids) :] = 1
        if on_batch is not None:
            on_batch(index)
        budget = max(r.max_new_tokens for r in batch)
        extra = {}
        plain = all(r.max_new_tokens == budget and not r.stop and r.temperature == 0 and r.on_text is None
                    and r.on_done is None and r.cancel is None for r in batch)
        control = None if plain else _RowControl(tokenizer, batch, width)
        if control is not None:
            from transformers import LogitsProcessorList, StoppingCriteriaList  # start-up cost: transformers (0.5 s after torch)

            extra["stopping_criteria"] = StoppingCriteriaList([control])
            if any(r.temperature > 0 for r in batch):
                extra["logits_processor"] = LogitsProcessorList([_RowSampler(batch, control)])
        names = [r.adapter for r in batch] if batch[0].adapter is not None else None
        with _adapters(model, names, stack_adapters) as kwargs:
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=budget,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
                **kwargs,
                **extra,
            )[:, width:].cpu()
        for k, i in enumerate(index):
            if control is not None:
                outputs[i] = control.finish(k)
                continue
            tokens = generated[k].tolist()
            ended = eos in tokens
            if ended:
                tokens = tokens[: tokens.index(eos)]
            outputs[i] = Completion(tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                                    "stop" if ended else "length", len(tokens) + int(ended))
    return outputs


class _adapters:
    """The generate keyword arguments (and the context) that put adapter names[i] on row i."""

    def __init__(self, model, names: list[str] | None, stack: bool):
        self.model, self.names, self.stack, self.inner = model, names, stack, None

    def __enter__(self) -> dict:
        if self.names is None:
            return {}
        if self.stack and mixed_lora.can_stack(self.model, self.names):
            self.inner = mixed_lora.stacked(self.model, self.names)
            self.inner.__enter__()
            return {}
        return {"adapter_names": list(self.names)}

    def __exit__(self, *exc) -> None:
        if self.inner is not None:
            self.inner.__exit__(*exc)


def visible_text(text: str, stop: tuple[str, ...], final: bool) -> tuple[str, bool]:
    """(the part of decoded `text` that is the answer so far, whether a stop string ended it).

    The answer is the decoded text without leading or trailing whitespace, cut before the first stop
    string. While generating (`final` False), trailing whitespace and a tail that may be the start of a
    stop string are held back, so that the pieces streamed always add up to the final answer.
    """
    text = text.lstrip()
    cut = min((p for p in (text.find(s) for s in stop if s) if p >= 0), default=-1)
    if cut >= 0:
        return text[:cut].rstrip(), True
    if final:
        return text.rstrip(), False
    if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
        text = text.rstrip("\ufffd")
    hold = max((k for s in stop if s for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold].rstrip(), False


class _RowControl:
    """A stopping criterion that keeps per-row state: each row's tokens, its own budget and stop strings,
    streamed text and finish; called by generate after every new token, it answers which rows are done."""

    def __init__(self, tokenizer, batch: list[Row], width: int):
        self.tokenizer, self.rows, self.width = tokenizer, batch, width
        self.eos = tokenizer.eos_token_id
        self.tokens: list[list[int]] = [[] for _ in batch]
        self.sent = [""] * len(batch)
        self.done: list[Completion | None] = [None] * len(batch)

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        latest = input_ids[:, -1].tolist()
        for k in range(len(self.rows)):
            if self.done[k] is None:
                try:
                    self._step(k, latest[k])
                except Exception as exc:  # this row's stop strings or callback: it fails alone
                    self.fail(k, exc)
        return torch.tensor([d is not None for d in self.done], dtype=torch.bool, device=input_ids.device)

    def _step(self, k: int, token: int) -> None:
        row = self.rows[k]
        if token == self.eos:
            self._finish(k, "stop", eos=True)
            return
        self.tokens[k].append(token)
        if row.stop or row.on_text is not None:
            text, stopped = visible_text(self._decode(k), row.stop, final=False)
            if stopped:
                self._finish(k, "stop")
                return
            self._send(k, text)
        if len(self.tokens[k]) >= row.max_new_tokens:
            self._finish(k, "length")
        elif row.cancel is not None and row.cancel.is_set():
            self._finish(k, "cancelled")

    def fail(self, k: int, exc: BaseException) -> None:
        """Row k ends here with finish_reason "error": what it asked for could not be done."""
        if self.done[k] is not None:
            return
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        self.done[k] = Completion("", "error", len(self.tokens[k]), f"{type(exc).__name__}: {first}")
        if self.rows[k].on_done is not None:
            try:
                self.rows[k].on_done(self.done[k])
            except Exception:  # nobody left to tell: the row is over either way
                pass

    def _decode(self, k: int) -> str:
        return self.tokenizer.decode(self.tokens[k], skip_special_tokens=True)

    def _send(self, k: int, text: str) -> None:
        row = self.rows[k]
        if row.on_text is not None and text.startswith(self.sent[k]) and len(text) > len(self.sent[k]):
            row.on_text(text[len(self.sent[k]) :])
            self.sent[k] = text

    def _finish(self, k: int, reason: str, eos: bool = False) -> None:
        text, _ = visible_text(self._decode(k), self.rows[k].stop, final=True)
        self._send(k, text)
        self.done[k] = Completion(text, reason, len(self.tokens[k]) + int(eos))
        if self.rows[k].on_done is not None:
            self.rows[k].on_done(self.done[k])

    def finish(self, k: int) -> Completion:
        """Row k's result once generate has returned (a row still open ran out of the batch's budget)."""
        if self.done[k] is None:
            self._finish(k, "length")
        return self.done[k]


class _RowSampler:
    """A logits processor that samples the rows with a temperature (top-p optional) with their own
    generator and leaves the greedy rows untouched: generate then runs greedily for every row, and a
    sampled row's logits point only at its drawn token. A row whose seed or sampling fails is failed
    through `control` (it stops; the other rows go on)."""

    def __init__(self, batch: list[Row], control: _RowControl):
        self.rows, self.control = {}, control
        for k, row in enumerate(batch):
            if row.temperature > 0:
                try:
                    g = torch.Generator()
                    g.manual_seed(row.seed if row.seed is not None else secrets.randbits(62))  # torch's global RNG untouched
                except Exception as exc:  # a seed torch cannot take
                    control.fail(k, exc)
                    continue
                self.rows[k] = (row.temperature, row.top_p, g)

    def __call__(self, input_ids, scores):
        for k, (temperature, top_p, g) in self.rows.items():
            if self.control.done[k] is not None:
                continue
            try:
                token = _sample(scores[k], temperature, top_p, g)
            except Exception as exc:  # this row's sampling (its temperature or top_p): it fails alone
                self.control.fail(k, exc)
                continue
            scores[k] = -math.inf
            scores[k, token] = 0.0
        return scores


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token drawn from softmax(logits / temperature), within the smallest set of tokens whose mass
    reaches top_p -- which always holds the most likely token, however small top_p is."""
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        keep[0] = True  # (a top_p below float32's resolution would otherwise keep nothing)
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator).item())
