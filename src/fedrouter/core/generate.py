"""Batched greedy generation from already-tokenised prompts. Knows nothing of federation."""

from __future__ import annotations

import torch


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
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids = prompts[i]
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            mask[r, width - len(ids) :] = 1
        if on_batch is not None:
            on_batch(rows)
        extra = {"adapter_names": [adapter_names[i] for i in rows]} if adapter_names is not None else {}
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
            **extra,
        )[:, width:].cpu()
        for r, i in enumerate(rows):
            tokens = generated[r].tolist()
            if eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            outputs[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return outputs
