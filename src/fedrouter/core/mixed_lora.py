"""Rows with different LoRA adapters in one forward pass, stacked: the same cost per step as one adapter.

peft's own mixed batch (`adapter_names=`) does, in every LoRA layer at every decoding step, a Python
scan of the row names per adapter, then per adapter a gather of its rows, two small matmuls and a
scatter back (`LoraLayer._mixed_batch_forward`). On a small model that bookkeeping is a fixed cost per
step comparable to the layer itself: `predict`'s mixed path measured 1.39x the time of one adapter at 64
rows (docs/benchmark.md).

Here the adapters a batch uses are stacked once per batch -- A_cat = [A_1; ...; A_n] (n*r x in),
B_cat = [B_1 ... B_n] (out x n*r) -- with a 0/1 row mask that keeps each row's own r columns, and the
layer adds ((x A_cat^T) * mask) B_cat^T * scaling_row to the frozen base's output: two matmuls, two
products and one sum per layer and step, whatever the mix. The extra work is the n-1 other adapters'
rank columns (n*r instead of r, small next to the base layer), and the masked-out terms are exact zeros,
so each row's sum holds the same terms as its adapter alone (the answers agree; the tests and
bench/serve_speed.py check it).

Only plain LoRA on `nn.Linear` layers takes this path (no DoRA or other variant, no LoRA bias, no
modules_to_save, eval mode); anything else is left to peft's `adapter_names`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

BASE = "__base__"  # peft's name for "no adapter on this row"


def _lora_layers(model) -> list:
    from peft.tuners.lora.layer import LoraLayer  # start-up cost: peft (2.7 s after torch)

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def can_stack(model, adapter_names: list[str]) -> bool:
    """Whether `stacked(model, adapter_names)` applies (else use peft's `adapter_names=`)."""
    try:
        from peft import LoraConfig, PeftModel  # start-up cost: peft (2.7 s after torch)
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    if not isinstance(model, PeftModel) or model.training:
        return False
    names = set(adapter_names) - {BASE}
    for name, config in model.peft_config.items():
        if name in names and (not isinstance(config, LoraConfig) or getattr(config, "modules_to_save", None)
                              or getattr(config, "use_dora", False) or getattr(config, "lora_bias", False)):
            return False
    if getattr(model.base_model, "merged", False):
        return False
    layers = _lora_layers(model)
    if not layers:
        return False
    for layer in layers:
        if type(layer) is not LoraLinear or layer.merged or layer.lora_embedding_A:
            return False
        if any(name in getattr(layer, "lora_variant", {}) for name in names):
            return False
    return True


@contextlib.contextmanager
def stacked(model, adapter_names: list[str]):
    """Within the block, a forward of `model` on a batch of len(adapter_names) rows uses adapter
    adapter_names[i] on row i (`BASE`: the base alone). Check `can_stack` first."""
    unknown = set(adapter_names) - set(model.peft_config) - {BASE}
    if unknown:
        raise ValueError(f"no such adapter(s): {', '.join(sorted(unknown))}")
    order = [n for n in dict.fromkeys(adapter_names) if n != BASE]
    handles = []
    layouts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in _lora_layers(model):
        present = tuple(n for n in order if n in layer.lora_A)
        if not present:
            continue
        a_cat = torch.cat([layer.lora_A[n].weight for n in present], 0)  # (n*r, in)
        b_cat = torch.cat([layer.lora_B[n].weight for n in present], 1)  # (out, n*r)
        scales = tuple(float(layer.scaling[n]) for n in present)
        ranks = tuple(layer.lora_A[n].weight.shape[0] for n in present)
        key = (present, ranks, scales, a_cat.device, a_cat.dtype)
        if key not in layouts:
            layouts[key] = _row_mask(adapter_names, present, ranks, scales, a_cat.device, a_cat.dtype)
        mask, scale = layouts[key]
        handles.append(layer.register_forward_hook(_adder(a_cat, b_cat, mask, scale)))
    try:
        with model.disable_adapter():  # the LoRA layers compute the base alone; the hooks add each row's adapter
            yield
    finally:
        for handle in handles:
            handle.remove()


def _row_mask(adapter_names, present, ranks, scales, device, dtype):
    mask = torch.zeros(len(adapter_names), sum(ranks), dtype=dtype)
    scale = torch.zeros(len(adapter_names), 1, dtype=dtype)
    start, spans = 0, {}
    for name, r, s in zip(present, ranks, scales):
        spans[name] = (start, start + r, s)
        start += r
    for row, name in enumerate(adapter_names):
        if name in spans:
            lo, hi, s = spans[name]
            mask[row, lo:hi] = 1
            scale[row, 0] = s
    return mask.to(device), scale.to(device)


def _adder(a_cat, b_cat, mask, scale):
    def hook(module, args, output):
        x = args[0]
        if x.shape[0] != mask.shape[0]:
            raise ValueError(f"a batch of {x.shape[0]} rows under adapters named for {mask.shape[0]}")
        rows = (x.shape[0],) + (1,) * (x.dim() - 2)  # (batch, 1, ..., features): one value per row
        x = x.to(a_cat.dtype)
        delta = F.linear(F.linear(x, a_cat) * mask.view(*rows, -1), b_cat) * scale.view(*rows, 1)
        return (output + delta).to(output.dtype)

    return hook
