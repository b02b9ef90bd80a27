"""Tokenising examples and training one LoRA adapter for N steps. Knows nothing of federation.

The loss covers answer tokens only: prompt and padding positions carry label -100, which the model's
cross-entropy ignores. Examples are tokenised once (`encode_examples`) and batches are cut from those
token lists, so a training step does no string work.
"""

from __future__ import annotations

import math
import time
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


def batch_stream(examples: list[EncodedExample], batch_size: int, pad_id: int, generator: torch.Generator) -> Iterator[dict]:
    """Endless batches: seeded reshuffle each epoch; a client smaller than a batch repeats its examples."""
    if not examples:
        raise ValueError("cannot train on an empty example set")
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if len(chunk) < batch_size and len(order) >= batch_size:
                break  # drop the ragged tail: every step sees a full batch
            yield collate([examples[i] for i in chunk], pad_id)


def round_lr(base_lr: float, round_idx: int, total_rounds: int, min_ratio: float = 0.1) -> float:
    """Cosine decay of the learning rate over rounds (constant within a round), as in FedIT/OpenFedLLM."""
    if total_rounds <= 1:
        return base_lr
    progress = round_idx / (total_rounds - 1)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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
) -> TrainStats:
    """`steps` AdamW steps on `params` (a fresh optimizer: local state is not carried across rounds).

    `regularizer`, if given, is added to the loss each step (FedProx's proximal term, for instance).
    """
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    total_loss, tokens = 0.0, 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        loss = model(**batch).loss
        if regularizer is not None:
            loss = loss + regularizer()
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total_loss += loss.item()
        tokens += int(batch["attention_mask"].sum())
    model.eval()
    return TrainStats(steps, total_loss / max(1, steps), tokens, time.perf_counter() - start)
