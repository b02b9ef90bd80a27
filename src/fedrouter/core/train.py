"""Tokenising examples and training one LoRA adapter for N steps. Knows nothing of federation.

The loss covers answer tokens only: prompt and padding positions carry label -100, which the model's
cross-entropy ignores. Examples are tokenised once (`encode_examples`) and batches are cut from those
token lists, so a training step does no string work.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

DEFAULT_TEMPLATE = "{instruction}\nanswer :"
IGNORE = -100


@dataclass
class EncodedExample:
    prompt_ids: list[int]
    answer_ids: list[int]  # output tokens followed by EOS
    task: str


def encode_examples(tokenizer, examples: list[dict], template: str = DEFAULT_TEMPLATE, max_len: int = 128) -> list[EncodedExample]:
    """Tokenise prompts and answers; over-long prompts lose their start, keeping the template's end."""
    prompts = [template.format(instruction=ex["instruction"]) for ex in examples]
    answers = [" " + ex["output"] for ex in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for ex, p, a in zip(examples, prompt_ids, answer_ids):
        a = (a + [tokenizer.eos_token_id])[: max_len // 2]
        p = bos + p[-(max_len - len(a) - len(bos)) :]
        out.append(EncodedExample(p, a, ex["task"]))
    return out


def collate(batch: list[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 outside the answer)."""
    width = max(len(e.prompt_ids) + len(e.answer_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        seq = e.prompt_ids + e.answer_ids
        input_ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(e.prompt_ids) : len(seq)] = torch.tensor(e.answer_ids)
        mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class BatchStream:
    """Endless batches: a seeded reshuffle each epoch, full batches only (the ragged tail is dropped); a
    client smaller than a batch gets all its examples as one batch each epoch.

    Its position (the generator's state, this epoch's order, the next index) is plain data:
    `state_dict()` / `load_state_dict()` let a client that lives in another process next round (Flower
    deployment) or a resumed run continue the exact same sequence.
    """

    def __init__(self, examples: list[EncodedExample], batch_size: int, pad_id: int, generator: torch.Generator):
        if not examples:
            raise ValueError("cannot train on an empty example set")
        self.examples, self.batch_size, self.pad_id, self.generator = examples, batch_size, pad_id, generator
        self.order: list[int] = []
        self.pos = 0

    def __iter__(self):
        return self

    def _epoch_has_room(self) -> bool:
        n = len(self.order)
        return self.pos + self.batch_size <= n if n >= self.batch_size else self.pos < n

    def __next__(self) -> dict:
        if not self._epoch_has_room():
            self.order = torch.randperm(len(self.examples), generator=self.generator).tolist()
            self.pos = 0
        chunk = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return collate([self.examples[i] for i in chunk], self.pad_id)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": list(self.order), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.pos = list(state["order"]), int(state["pos"])


def batch_stream(examples: list[EncodedExample], batch_size: int, pad_id: int, generator: torch.Generator) -> BatchStream:
    return BatchStream(examples, batch_size, pad_id, generator)


def round_lr(base_lr: float, round_idx: int, total_rounds: int, min_ratio: float = 0.1) -> float:
    """Cosine decay of the learning rate over rounds (constant within a round), as in FedIT/OpenFedLLM."""
    if total_rounds <= 1:
        return base_lr
    progress = round_idx / (total_rounds - 1)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class ClientTimeout(RuntimeError):
    """A client's training ran past its round's time budget."""


_DEADLINE: ContextVar[float | None] = ContextVar("training_deadline", default=None)


@contextmanager
def time_budget(seconds: float | None):
    """Training steps run inside this block stop with ClientTimeout once `seconds` have passed (None: no
    limit): an engine cuts a slow client off mid-round instead of waiting for it to finish."""
    token = _DEADLINE.set(time.monotonic() + seconds if seconds else None)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


@dataclass
class TrainStats:
    steps: int
    loss: float  # mean training loss over the steps
    tokens: int  # non-padding tokens processed
    seconds: float


def train_steps(
    model,
    params: list[torch.nn.Parameter],
    batches: Iterator[dict],
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    regularizer: Callable[[], torch.Tensor] | None = None,
    grad_accum_steps: int = 1,
) -> TrainStats:
    """`steps` AdamW steps on `params` (a fresh optimizer: local state is not carried across rounds), each
    over `grad_accum_steps` batches whose gradients are accumulated (the loss of each scaled by 1/k).

    `regularizer`, if given, is added to the loss of each step (FedProx's proximal term, for instance).
    Batches move to the model's device; the loss reported is the mean over the steps.
    """
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    device = next(iter(params)).device if params else torch.device("cpu")
    model.train()
    total_loss, tokens = 0.0, 0
    start = time.perf_counter()
    deadline = _DEADLINE.get()
    for step in range(steps):
        if deadline is not None and step and time.monotonic() > deadline:
            raise ClientTimeout(f"cut off after {step} of {steps} steps: over the round's time budget")
        step_loss = 0.0
        for _ in range(grad_accum_steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            loss = model(**batch).loss
            if regularizer is not None:
                loss = loss + regularizer()
            (loss if grad_accum_steps == 1 else loss / grad_accum_steps).backward()
            step_loss += loss.item()
            tokens += int(batch["attention_mask"].sum())
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total_loss += step_loss / grad_accum_steps
    model.eval()
    return TrainStats(steps, total_loss / max(1, steps), tokens, time.perf_counter() - start)
