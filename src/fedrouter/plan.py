"""`fedrouter run --dry-run`: what a config would run, without loading a model or training.

The plan resolves the config, the hardware (device, dtype, quantization on this machine), the data
(the federated split for the embedded benchmark and local folders; the sources and requested sizes for
Hugging Face datasets, which are not downloaded for a plan), the model's shape (from its config only:
the tiny base's spec, a local or cached config.json, or the published shapes of the paper's models),
the adapters the method keeps, and an estimate of device memory per process.
"""

from __future__ import annotations

import torch

from fedrouter import config
from fedrouter.config import Config
from fedrouter.core.data import HF
from fedrouter.core.hardware import Hardware, estimate_memory_gb
from fedrouter.errors import FedrouterError
from fedrouter.methods import facts_of
from fedrouter.world import build_data

# The published shapes (config.json) of the paper's models, for planning without the hub.
KNOWN_SHAPES = {
    "meta-llama/Llama-3.2-1B": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                                "tie_word_embeddings": True},
    "meta-llama/Llama-3.2-3B": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                                "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256,
                                "tie_word_embeddings": True},
    "meta-llama/Llama-3.1-8B": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                                "tie_word_embeddings": False},
}


def model_config(cfg: Config):
    """The model's transformers config, from its own config.json (local path or hub cache) or the
    published shape of a known model; None when neither is at hand."""
    from transformers import AutoConfig, LlamaConfig  # start-up cost: transformers (0.5 s after torch)

    if cfg.model == "tiny":
        spec = config.tiny_spec(cfg)
        return LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                           num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                           num_key_value_heads=spec.num_heads, tie_word_embeddings=True)
    try:  # a local directory or the hub's cache first: a plan should not wait for the network
        return AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    except Exception:
        pass
    if cfg.model in KNOWN_SHAPES:
        return LlamaConfig(**KNOWN_SHAPES[cfg.model])
    try:
        return AutoConfig.from_pretrained(cfg.model)
    except Exception:  # no hub either
        return None


def count_parameters(model_cfg, targets: tuple[str, ...], rank: int) -> tuple[int, int]:
    """(base parameters, LoRA parameters) of the model built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM  # start-up cost: transformers (0.5 s after torch)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_cfg)
    base = sum(p.numel() for p in model.parameters())
    lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head" and (
                targets == ("all-linear",) or name.rsplit(".", 1)[-1] in targets):
            lora += rank * (module.in_features + module.out_features)
    return base, lora


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def adapters_kept(cfg: Config) -> str:
    """What the run keeps at the end, as its method declares it."""
    return facts_of(cfg.method).adapters_kept(config.method_options(cfg), cfg.n_clients)


def _data_lines(cfg: Config) -> list[str]:
    if cfg.data.startswith(HF):
        name = cfg.data[len(HF):]
        where = ", ".join(f"{t}={p}" for t, p in sorted(cfg.data_sources.items())) or "the Hugging Face hub (or its cache)"
        return [f"data: {cfg.data} ({'the paper four: QQP, WebNLG, SAMSum, Gigaword' if name == 'paper4' else name}) "
                f"from {where}; not loaded in a dry run",
                f"per client: {cfg.train_per_client} train / {cfg.test_per_client} test examples, scenario {cfg.scenario}"]
    data = build_data(cfg)
    lines = [f"data: {cfg.data}, {len(data.tasks)} tasks ({', '.join(data.tasks)}), scenario {cfg.scenario}"]
    for client in data.clients[:16]:
        lines.append(f"  client {client.client_id}: {'+'.join(client.tasks)}, {len(client.train)} train / {len(client.test)} test")
    if len(data.clients) > 16:
        lines.append(f"  ... {len(data.clients) - 16} more clients")
    lines.append(f"  all-task test set: {len(data.general_test)} examples")
    return lines


def plan(cfg: Config, hardware: Hardware) -> str:
    """The plan as printable lines (see the module docstring)."""
    lines = [f"{cfg.method} | {cfg.n_clients} clients | {cfg.rounds} rounds x {cfg.local_steps} local steps "
             f"(batch {cfg.batch_size} x {cfg.grad_accum_steps} accumulated) | lr {cfg.lr:g} | LoRA r {cfg.lora.r} / "
             f"alpha {cfg.lora.alpha} on {', '.join(cfg.lora.target_modules)}"]
    lines += _data_lines(cfg)
    lines.append(f"adapters kept: {adapters_kept(cfg)}")
    lines.append(f"hardware here: {hardware.device}, {str(hardware.dtype).removeprefix('torch.')}, quantization "
                 f"{hardware.quantization}, gradient checkpointing {'on' if hardware.gradient_checkpointing else 'off'}")
    model_cfg = model_config(cfg)
    if model_cfg is None:
        lines.append(f"model: {cfg.model} (its config is neither local nor cached: no memory estimate)")
        return "\n".join(lines)
    base, lora = count_parameters(model_cfg, tuple(cfg.lora.target_modules), cfg.lora.r)
    lines.append(f"model: {cfg.model}, {_count(base)} parameters; one adapter {_count(lora)} parameters "
                 f"({lora * 4 / 1e6:.2f} MB on the wire, float32)")
    tokens = cfg.batch_size * cfg.max_seq_len
    for label, bytes_per_weight, checkpointing in (
            ("here", hardware.bytes_per_weight, hardware.gradient_checkpointing),
            ("on a GPU, bf16", 2.0, cfg.gradient_checkpointing), ("on a GPU, 4-bit", 0.5, cfg.gradient_checkpointing)):
        mem = estimate_memory_gb(base, bytes_per_weight, lora, tokens, model_cfg.hidden_size, model_cfg.num_hidden_layers,
                                 checkpointing)
        lines.append(f"memory per process ({label}): about {mem['total_gb']:.2f} GiB = base {mem['base_gb']:.2f} + adapter "
                     f"and optimizer {mem['adapter_gb']:.3f} + activations {mem['activations_gb']:.2f} "
                     f"({tokens} tokens per batch); every simulated client shares the one base")
    return "\n".join(lines)


def dry_run(cfg: Config) -> str:
    """The plan of `cfg` on this machine; one clear error for a config this machine cannot run."""
    try:
        hardware = config.hardware(cfg)
    except FedrouterError as exc:
        raise FedrouterError(f"{exc} (dry run: nothing was loaded)") from None
    return plan(cfg, hardware)
