"""Where the model runs and in what precision: device, dtype and quantization, resolved once per process.

- device "auto": the first of cuda, mps, cpu that this machine has; or an explicit "cpu", "cuda",
  "cuda:N", "mps".
- dtype "auto": bfloat16 on a GPU that supports it, float32 elsewhere (a CPU, an older GPU); or explicit.
- quantization "4bit" (NF4 with double quantization, bfloat16 compute: QLoRA) or "8bit", through
  bitsandbytes, on CUDA only; "auto": 4bit where that is possible, else none; "none" otherwise.

LoRA weights are trained in float32 whatever the base's dtype (peft keeps adapters in float32 over a
bf16/fp16 base), and adapters travel and are saved as CPU float32. Nothing here knows about federation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedrouter.errors import FedrouterError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("none", "auto", "4bit", "8bit")


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    dtype: torch.dtype
    quantization: str = "none"
    gradient_checkpointing: bool = False

    @property
    def bytes_per_weight(self) -> float:
        return {"4bit": 0.5, "8bit": 1.0}.get(self.quantization, torch.finfo(self.dtype).bits / 8)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise FedrouterError(f"device {spec!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FedrouterError(f"device {spec!r}: this machine has no CUDA GPU torch can use (device = \"auto\" picks what there is)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise FedrouterError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FedrouterError(f"device {spec!r}: this machine has no Apple GPU (MPS) torch can use")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec != "auto":
        return DTYPES[spec]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve(device: str = "auto", dtype: str = "auto", quantization: str = "none",
            gradient_checkpointing: bool = False) -> Hardware:
    """The hardware settings of a config, checked against this machine (one clear error when they cannot
    be met: quantization without CUDA or without bitsandbytes, a device that is not there)."""
    resolved = resolve_device(device)
    if quantization == "auto":
        quantization = "4bit" if resolved.type == "cuda" and _has_bitsandbytes() else "none"
    if quantization != "none":
        if resolved.type != "cuda":
            raise FedrouterError(f"quantization = \"{quantization}\" needs a CUDA GPU (bitsandbytes); this run's device is "
                                 f"{resolved.type}: use quantization = \"none\" here")
        if not _has_bitsandbytes():
            raise FedrouterError(f"quantization = \"{quantization}\" needs bitsandbytes: pip install 'fedrouter[gpu]'")
    return Hardware(resolved, resolve_dtype(dtype, resolved), quantization, gradient_checkpointing)


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401 -- optional extra: gpu
    except ImportError:
        return False
    return True


def quantization_config(hardware: Hardware):
    """The transformers BitsAndBytesConfig of a quantized base (QLoRA's NF4 + double quantization, bf16
    compute), or None."""
    if hardware.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig  # start-up cost: transformers (0.5 s after torch)

    if hardware.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if hardware.dtype == torch.float32 else hardware.dtype
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def estimate_memory_gb(n_params: int, hardware_bytes_per_weight: float, lora_params: int, batch_tokens: int,
                       hidden: int, layers: int, gradient_checkpointing: bool) -> dict[str, float]:
    """A rough plan of device memory for training: the frozen base, the adapter with its gradients and
    AdamW moments (float32: 16 bytes per weight), and activations (about 34 * hidden bytes per token per
    layer in 16-bit, one layer's worth with gradient checkpointing)."""
    base = n_params * hardware_bytes_per_weight
    adapter = lora_params * 16
    per_layer = 34 * hidden * batch_tokens
    activations = per_layer * (1 if gradient_checkpointing else layers)
    gib = 1024**3
    return {"base_gb": base / gib, "adapter_gb": adapter / gib, "activations_gb": activations / gib,
            "total_gb": (base + adapter + activations) / gib}
