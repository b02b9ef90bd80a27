"""Base models and LoRA adapters.

`load_base` is the one path for every model: the embedded tiny base ("tiny") is built once -- a local
byte-level BPE tokenizer, a small Llama from a config, a short full-parameter pretraining on generic text --
saved as an ordinary Hugging Face model directory in the cache, and from then on loaded exactly like any
hub id or local checkpoint (`AutoModelForCausalLM` + `AutoTokenizer`).

LoRA comes from peft. Adapter state travels as a plain dict of float32 tensors keyed by peft's own
state-dict names, which is also what `PeftModel.save_pretrained` writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedrouter.core.hardware import Hardware, quantization_config
from fedrouter.core.synthetic import copy_drills, pretraining_corpus
from fedrouter.errors import FedrouterError
from fedrouter.progress import phase, steps

log = logging.getLogger(__name__)

TINY = "tiny"
# Bump when the pretraining corpus or procedure changes, so stale caches are not reused.
_TINY_RECIPE_VERSION = 4


@dataclass(frozen=True)
class TinyBaseSpec:
    """Shape and pretraining recipe of the embedded tiny base; its hash names the cache entry."""

    vocab_size: int = 768
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 256
    pretrain_steps: int = 1500
    pretrain_documents: int = 20000  # generic documents, and as many copy drills
    pretrain_batch: int = 16
    pretrain_seq_len: int = 48
    pretrain_lr: float = 3e-3
    seed: int = 0

    def n_params(self) -> int:
        """The parameters of the Llama this spec builds (tied embeddings, no biases): a run sizes its torch
        threads by it before the model is built (`threads.choose_threads`)."""
        h = self.hidden_size
        per_layer = 4 * h * h + 3 * h * self.intermediate_size + 2 * h  # attention, MLP, two norms
        return self.vocab_size * h + self.num_layers * per_layer + h

    def cache_key(self) -> str:
        payload = json.dumps({**asdict(self), "recipe": _TINY_RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDROUTER_CACHE", Path.home() / ".cache" / "fedrouter"))


def _train_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast  # start-up cost: transformers (0.5 s after torch)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte encodes: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    return torch.tensor(stream, dtype=torch.long)


def _pretrain_batches(streams: list[torch.Tensor], spec: TinyBaseSpec, generator: torch.Generator):
    """Random windows of `pretrain_seq_len` tokens, an equal share of each batch from each stream."""
    rows_per_stream = [spec.pretrain_batch // len(streams)] * len(streams)
    rows_per_stream[0] += spec.pretrain_batch - sum(rows_per_stream)
    while True:
        windows = []
        for data, rows in zip(streams, rows_per_stream):
            starts = torch.randint(0, len(data) - spec.pretrain_seq_len - 1, (rows,), generator=generator)
            windows += [data[s : s + spec.pretrain_seq_len] for s in starts.tolist()]
        yield torch.stack(windows)


def build_tiny_base(spec: TinyBaseSpec, out_dir: Path, progress: bool = True) -> None:
    """Tokenizer + Llama from config + deterministic full-parameter pretraining, saved to `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM  # start-up cost: transformers (0.5 s after torch)

    corpus = pretraining_corpus(n_documents=spec.pretrain_documents, seed=spec.seed)
    drills = copy_drills(spec.pretrain_documents, seed=spec.seed)
    tokenizer = _train_tokenizer(corpus + drills, spec.vocab_size)
    streams = [_token_stream(tokenizer, corpus), _token_stream(tokenizer, drills)]

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.01)
    warmup = max(1, spec.pretrain_steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.pretrain_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    batches = _pretrain_batches(streams, spec, torch.Generator().manual_seed(spec.seed))
    bar = steps(range(spec.pretrain_steps), "pretraining tiny base", unit="step", enabled=progress, leave=False)
    for _ in bar:
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "fedrouter_tiny_spec.json").write_text(
        json.dumps({**asdict(spec), "recipe": _TINY_RECIPE_VERSION, "final_loss": loss.item()}, indent=2)
    )


def tiny_base_dir(spec: TinyBaseSpec | None = None, cache_dir: Path | None = None) -> Path:
    """Where the tiny base for `spec` lives in the model cache, built or not."""
    return Path(cache_dir or default_cache_dir()) / f"tiny-{(spec or TinyBaseSpec()).cache_key()}"


def tiny_base_built(spec: TinyBaseSpec | None = None, cache_dir: Path | None = None) -> bool:
    return (tiny_base_dir(spec, cache_dir) / "config.json").exists()


def ensure_tiny_base(spec: TinyBaseSpec | None = None, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Path of the cached tiny base for `spec`, building it first if absent (atomically: temp dir + rename)."""
    spec = spec or TinyBaseSpec()
    cache_dir = Path(cache_dir or default_cache_dir())
    target = tiny_base_dir(spec, cache_dir)
    if tiny_base_built(spec, cache_dir):
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedrouterError(f"cannot create the model cache {cache_dir}: {exc.strerror or exc} (set cache_dir or $FEDROUTER_CACHE)") from None
    log.info("building the tiny base model in %s (once)", target)
    phase(f"building the tiny base model (once, cached in {cache_dir})", progress)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
    try:
        # Same seed, same result, whatever the surrounding process did with the global RNGs.
        state = torch.random.get_rng_state(), random.getstate()
        build_tiny_base(spec, tmp, progress=progress)
        torch.random.set_rng_state(state[0])
        random.setstate(state[1])
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_base(name: str, cache_dir: Path | None = None, tiny_spec: TinyBaseSpec | None = None, progress: bool = True,
              hardware: Hardware | None = None):
    """(model, tokenizer) for "tiny", a Hugging Face hub id, or a local model directory: frozen, in eval
    mode, on `hardware`'s device in its dtype (quantized with bitsandbytes and prepared for k-bit
    training when it says so; gradient checkpointing on when it says so). Default: float32 on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # start-up cost: transformers (0.5 s after torch)

    hardware = hardware or Hardware(torch.device("cpu"), torch.float32)
    quantized = quantization_config(hardware)
    path = str(ensure_tiny_base(tiny_spec, cache_dir, progress)) if name == TINY else name
    options = {"dtype": hardware.dtype}
    if quantized is not None:  # bitsandbytes places the quantized weights itself
        options.update(quantization_config=quantized, device_map={"": hardware.device})
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # Weights come as safetensors, or through torch.load(weights_only=True): a pickle payload is refused.
        model = AutoModelForCausalLM.from_pretrained(path, **options)
    except Exception as exc:  # a loading boundary: whatever fails here is the user's model reference or files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FedrouterError(f"cannot load model {name!r}: {type(exc).__name__}: {first[:300]}") from None
    if tokenizer.pad_token is None:  # most causal LMs ship without one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    if quantized is None:
        model.to(hardware.device)
    model.requires_grad_(False)
    model.eval()
    if quantized is not None:
        from peft import prepare_model_for_kbit_training  # start-up cost: peft (2.7 s after torch)

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=hardware.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hardware.gradient_checkpointing:
        # Recompute each layer's activations in the backward pass: memory of one layer instead of all.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


def lora_base_weight(model, module: str) -> torch.Tensor:
    """The frozen base weight under LoRA-wrapped `module`: what a dense update (FLoRA's merge) is added to."""
    return model.get_submodule(module).base_layer.weight


def add_update(weight: torch.Tensor, original: torch.Tensor, update: torch.Tensor) -> None:
    """`weight` = `original` + `update`, summed in float32 and stored in the weight's dtype (bf16: rounded once):
    one rule for the clients that train on a merged base and for serving what they leave."""
    weight.copy_(original.float() + update.to(original.device, torch.float32))


def attach_lora(model, lora: LoraSettings, adapter_name: str = "default"):
    """Wrap `model` in a peft LoRA model with one adapter; the base weights stay frozen."""
    from peft import LoraConfig, get_peft_model  # start-up cost: peft (2.7 s after torch)

    targets = lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ("all-linear",) else list(targets),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config, adapter_name=adapter_name)
    except ValueError as exc:
        raise FedrouterError(f"cannot attach LoRA: {str(exc).splitlines()[0]}") from None


def get_adapter_state(peft_model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """A detached CPU float32 copy of one adapter's LoRA weights, keyed by peft's state-dict names (what
    travels and is saved, whatever device and dtype the model has)."""
    params = adapter_parameters(peft_model, adapter_name)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in params.items()}


def set_adapter_state(peft_model, state: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Load LoRA weights into the named adapter in place; every key must exist and match in shape."""
    expected = adapter_parameters(peft_model, adapter_name)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"adapter keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for key, tensor in state.items():
            param = expected[key]
            if param.shape != tensor.shape:
                raise ValueError(f"adapter tensor {key}: shape {tuple(tensor.shape)} != {tuple(param.shape)}")
            param.copy_(tensor)


def adapter_parameters(peft_model, adapter_name: str = "default") -> dict[str, torch.nn.Parameter]:
    """The live LoRA parameters of one adapter, keyed as peft's `get_peft_model_state_dict` keys them."""
    marker = f".{adapter_name}."
    out = {}
    for name, param in peft_model.named_parameters():
        if "lora_" in name and marker in name:
            out[name.replace(marker, ".")] = param
    return out


# --- which base model an adapter belongs to ------------------------------------------------------------

FINGERPRINT_SAMPLES = 8  # values sampled per weight tensor: a handful is enough to tell two models apart
# Loading one checkpoint in float32, bfloat16 or float16 moves a weight by at most a rounding of that dtype
# (bf16: 2^-8 relative), while another model's weights differ at every sample.
FINGERPRINT_RTOL, FINGERPRINT_ATOL = 1e-2, 1e-4


def _plain_name(name: str) -> str:
    """A base weight's name as the bare model names it, whether or not peft wraps the model."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def base_fingerprint(model, tokenizer) -> dict:
    """What identifies a base model, wherever and in whatever dtype it is loaded: its architecture and
    sizes, a digest of its tokenizer's vocabulary, and a few evenly spaced values of every floating-point
    weight (quantized weights are skipped; LoRA weights are not the base's). Plain JSON data."""
    config = model.config
    shape = {key: getattr(config, key, None) for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")}
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    samples = {}
    for name, weight in model.named_parameters():
        if "lora_" in name or not weight.is_floating_point() or weight.numel() == 0:
            continue
        flat = weight.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, min(FINGERPRINT_SAMPLES, flat.numel())).round().long().to(flat.device)
        samples[_plain_name(name)] = [float(v) for v in flat[index].float().cpu()]
    return {"shape": shape, "tokenizer": hashlib.sha256(vocab.encode("utf-8")).hexdigest(), "samples": samples}


def fingerprint_mismatch(recorded: dict, current: dict) -> str | None:
    """Why `current` is not the base model `recorded` was taken of, or None when it is (weights compared
    where both have them: a base trained quantized has fewer floating-point weights than the same base
    loaded in float32)."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("samples"), dict):
        return "the run's recorded fingerprint is damaged"
    if recorded.get("shape") != current["shape"]:
        return f"its architecture is {current['shape']}, the run's base had {recorded.get('shape')}"
    if recorded.get("tokenizer") != current["tokenizer"]:
        return "its tokenizer's vocabulary differs from the run's base's"
    shared = sorted(set(recorded["samples"]) & set(current["samples"]))
    if not shared:
        return "it has none of the run's base weights"
    for name in shared:
        a, b = recorded["samples"][name], current["samples"][name]
        if not isinstance(a, list) or len(a) != len(b) or not all(
                isinstance(x, (int, float)) and abs(x - y) <= FINGERPRINT_ATOL + FINGERPRINT_RTOL * max(abs(x), abs(y))
                for x, y in zip(a, b)):
            return f"its weights differ from the run's base's ({name})"
    return None
