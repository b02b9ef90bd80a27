"""The experiment config: one pydantic model, from defaults, a TOML file and command-line overrides.

Unknown keys are errors (a typo must not silently fall back to a default), and values are taken strictly:
a number must be a finite number (`lr = inf` is refused), an integer an integer (`rounds = true` is not 1).
`load_config` turns every validation problem into one `FedrouterError` line naming the key.
"""

from __future__ import annotations

import json
import math
import re
import string
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedrouter.atomic import read_regular_text
from fedrouter.core.data import SCENARIOS
from fedrouter.core.hardware import resolve as resolve_hardware
from fedrouter.core.model import TINY, LoraSettings, TinyBaseSpec
from fedrouter.core.privacy import Accountant
from fedrouter.core.train import DEFAULT_TEMPLATE
from fedrouter.core.workbench import TrainSettings
from fedrouter.errors import FedrouterError
from fedrouter.methods import DEFAULT, METHODS, facts_of, options_for
from fedrouter.threads import choose_threads

CONFIG_FILE = "config.json"  # a run directory's resolved config (see fedrouter.rundir)
DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
# One process holds every simulated client's state and data; the data is built client by client (a
# minute per ten thousand on a laptop), so a client count far beyond any study is a typo, not a plan.
MAX_CLIENTS = 10_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class LoraSection(_Strict):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # FedIT's default. ["all-linear"] adapts every linear layer: on the tiny base that much capacity
    # lets one adapter absorb all four tasks without interference (measured; docs/benchmark.md).
    target_modules: list[str] = ["q_proj", "v_proj"]


class TinySection(_Strict):
    """The embedded tiny base's shape and pretraining recipe (see fedrouter.core.model.TinyBaseSpec)."""

    vocab_size: int = Field(768, gt=258)
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(256, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    pretrain_steps: int = Field(1500, gt=0)
    pretrain_documents: int = Field(20000, gt=10)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"tiny.hidden_size ({self.hidden_size}) must be a multiple of tiny.num_heads ({self.num_heads})")
        return self


class PrivacySection(_Strict):
    """Client-level differential privacy (fedrouter.core.privacy; README "Privacy")."""

    mode: Literal["off", "central", "local"] = "off"  # central: the server clips and noises; local: each client
    clip: float = Field(1.0, gt=0)  # L2 bound of one client's update (its upload minus what it was sent)
    noise_multiplier: float = Field(1.0, ge=0)  # noise std = noise_multiplier * clip (/ n on a mean of n)
    delta: float = Field(1e-5, gt=0, lt=1)
    target_epsilon: float | None = Field(None, gt=0)  # refuse to start when the configured rounds would exceed it
    centroid_clip: float = Field(10.0, gt=0)  # FedRouter: bound of each embedding in its released centroids
    centroid_noise_multiplier: float | None = Field(None, ge=0)  # FedRouter: noise of that release (None: exact)


class Config(_Strict):
    # what to run
    method: str = DEFAULT
    scenario: str = "dual"
    seed: int = Field(0, ge=0)
    engine: Literal["inprocess", "flower"] = "inprocess"  # flower: Flower's simulation runtime (pip install .[flower])
    # federation (paper defaults: 8 clients, 25 rounds, 10 local steps, batch 16)
    n_clients: int = Field(8, gt=0)
    rounds: int = Field(25, gt=0)
    client_fraction: float = Field(1.0, gt=0, le=1)
    local_steps: int = Field(10, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-3, gt=0)  # tuned for the tiny base; ~2e-4 suits billion-parameter models
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine over rounds ends at lr * min_lr_ratio
    weight_decay: float = Field(0.0, ge=0)
    method_options: dict[str, Any] = {}  # knobs of one method (e.g. fedprox's mu); the method checks them
    # reject an update whose norm exceeds this many times the round's median (0: off; needs 3+ updates)
    update_norm_ratio: float = Field(0.0, ge=0)
    min_updates: int = Field(1, gt=0)  # fewer acceptable updates in a round: the server state is kept
    inject_failures: float = Field(0.0, ge=0, lt=1)  # in-process: each client fails a round with this probability
    # a client's training over this many seconds is dropped (Flower: how long the server waits for replies)
    client_timeout_s: float | None = Field(None, gt=0)
    checkpoint_keep: int = Field(2, ge=0)  # checkpoints kept in the run directory (one per round); 0: none
    # model
    model: str = "tiny"  # "tiny" (embedded, built once and cached), a Hugging Face id, or a local path
    cache_dir: str | None = None  # default: $FEDROUTER_CACHE or ~/.cache/fedrouter
    tiny: TinySection = TinySection()  # used when model = "tiny"
    lora: LoraSection = LoraSection()
    max_seq_len: int = Field(128, gt=8)
    max_new_tokens: int = Field(24, gt=0)
    prompt_template: str = DEFAULT_TEMPLATE
    threads: int | None = Field(None, gt=0)  # torch CPU threads; None: chosen (cpu_threads)
    # hardware (fedrouter.core.hardware): where the base runs and in what precision
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    # bitsandbytes (CUDA; pip install 'fedrouter[gpu]'); auto: 4bit on a CUDA GPU with bitsandbytes, else none
    quantization: Literal["none", "auto", "4bit", "8bit"] = "none"
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time
    grad_accum_steps: int = Field(1, gt=0)  # batches per local optimizer step
    # data
    # "synthetic", "synthetic-hard" (templated tasks, two pairs sharing an input format), a folder holding
    # train.jsonl and test.jsonl, "hf:paper4" or "hf:<id or path>"
    data: str = "synthetic"
    data_sources: dict[str, str] = {}  # hf:paper4: task -> a local copy of its dataset (file or folder) instead of the hub
    data_fields: dict[str, str] = {}  # hf:<id>: where instruction, output (and task) sit in its rows
    task_field: str = "task"  # where the task label sits in JSONL rows ("category" in flan8; "none": no labels)
    tasks: list[str] | None = None  # a subset of the data's tasks; None = all
    train_per_client: int = Field(600, gt=0)
    test_per_client: int = Field(300, gt=0)
    general_test_per_task: int = Field(50, gt=0)
    dirichlet_alpha: float = Field(0.5, gt=0)
    # evaluation
    eval_every: int = Field(0, ge=0)  # also evaluate own test sets every N rounds (0: only at the end)
    eval_batch_size: int = Field(64, gt=0)
    privacy: PrivacySection = PrivacySection()

    @field_validator("scenario")
    @classmethod
    def _known_scenario(cls, v: str) -> str:
        if v not in SCENARIOS:
            raise ValueError(f"unknown scenario {v!r}; choose one of: {', '.join(SCENARIOS)}")
        return v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; choose one of: {', '.join(sorted(METHODS))}")
        return v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        # torch.device takes "meta", "xpu" and more, which fail later, after the model loads: name the ones that run
        if not DEVICE.fullmatch(v):
            raise ValueError(f"{v!r} is not a device this runs on: use auto, cpu, cuda, cuda:N or mps")
        return v

    @field_validator("prompt_template")
    @classmethod
    def _template_has_slot(cls, v: str) -> str:
        return check_template(v)

    @field_validator("method_options")
    @classmethod
    def _finite_options(cls, v: dict) -> dict:
        bad = _non_finite(v)
        if bad:
            raise ValueError(f"{bad} is not a finite number")
        return v

    @model_validator(mode="after")
    def _base_weights_stay_writable(self):
        """A method that adds a dense update to the base weights (its facts say so: FLoRA's merged update,
        FedDPA's partner adapter) cannot run on a quantized base (bf16 can: the sum is made in float32 and
        stored once)."""
        if self.quantization != "none" and facts_of(self.method).writes_base_weights:
            raise ValueError(f"method {self.method} adds a dense update to the base weights, which {self.quantization} "
                             "weights cannot hold: use quantization = \"none\" (bfloat16 works) or another method")
        return self

    @model_validator(mode="after")
    def _sizes_one_could_mean(self):
        """Sizes that would run silently for hours before anything fails are refused before any work."""
        if self.n_clients > MAX_CLIENTS:
            raise ValueError(f"n_clients: {self.n_clients} clients in one process is more than this simulation holds "
                             f"(at most {MAX_CLIENTS}); a federation that large runs on Flower's deployment, a node per client")
        batches = max(1, math.ceil(self.train_per_client / self.batch_size))  # in one pass over a client's examples
        if self.grad_accum_steps > batches:
            raise ValueError(f"grad_accum_steps: one optimizer step of {self.grad_accum_steps} batches of {self.batch_size} "
                             f"would go over a client's {self.train_per_client} training examples ({batches} batch(es)) "
                             "more than once; accumulate at most that many")
        return self

    @model_validator(mode="after")
    def _privacy_applies(self):
        """DP covers the methods that declare they fold their uploads by a plain mean, and only when nothing
        else the run releases escapes the accountant (the method's facts say what it releases); the budget is
        checked before any work."""
        if self.privacy.mode == "off":
            return self
        p = self.privacy
        facts = facts_of(self.method)
        if facts.private_refusal:  # the method's own reason says more than the generic line below
            raise ValueError(f"privacy: {self.method} {facts.private_refusal}")
        if not facts.folds_by_mean:
            private = [name for name in METHODS if facts_of(name).folds_by_mean]
            raise ValueError(f"privacy: method {self.method} does not fold uploads by a mean (stacking, a choice by loss, "
                             f"or nothing shared), which client-level DP here does not cover; use one of {', '.join(private)}")
        if self.method_options.get("aggregation", "mean") != "mean":
            raise ValueError("privacy: a robust aggregation (median, trimmed_mean) has no Gaussian-mechanism bound; "
                             "use aggregation = \"mean\"")
        if facts.releases_data_summaries and p.centroid_noise_multiplier is None:
            raise ValueError(f"privacy: {self.method} would release its clients' centroids, assignment counts and router "
                             "moments exactly, which the accountant does not cover; set privacy.centroid_noise_multiplier "
                             "(e.g. 4.0) to release them through the Gaussian mechanism and count them in epsilon")
        if p.mode == "central" and self.update_norm_ratio > 0:
            raise ValueError("privacy: update_norm_ratio screens the clean updates against each other before clipping and "
                             "noise, a choice by the clients' data that the accountant does not cover; set "
                             "update_norm_ratio = 0 under central DP (under local DP it sees only noised uploads)")
        if p.delta * self.n_clients >= 1:
            raise ValueError(f"privacy: delta {p.delta:g} is at least 1/n_clients (1/{self.n_clients}), which lets a "
                             "mechanism publish one client's data outright and still meet (epsilon, delta); use a delta "
                             f"well below {1 / self.n_clients:.3g} (the default is 1e-5)")
        if facts.releases_data_summaries and p.delta * self.train_per_client >= 1:
            raise ValueError(f"privacy: delta {p.delta:g} is at least 1/train_per_client (1/{self.train_per_client}), "
                             "which lets the centroid release publish one example outright; use a delta well below "
                             f"{1 / self.train_per_client:.3g}")
        try:  # the accountant is run once here, so that a value it cannot handle is refused before any work
            epsilon = privacy_epsilon(self, self.rounds)
        except (ArithmeticError, ValueError) as exc:
            raise ValueError(f"privacy: the accountant cannot compute epsilon for noise_multiplier {p.noise_multiplier:g}"
                             + (f" and centroid_noise_multiplier {p.centroid_noise_multiplier:g}"
                                if p.centroid_noise_multiplier is not None and facts.releases_data_summaries else "")
                             + f" ({type(exc).__name__}: {exc}); use a multiplier between 1e-3 and 1e4") from None
        if p.target_epsilon is not None:
            if epsilon > p.target_epsilon:
                raise ValueError(f"privacy: {self.rounds} rounds at noise multiplier {p.noise_multiplier:g} spend "
                                 f"epsilon {epsilon:.3g} (delta {p.delta:g}), over target_epsilon "
                                 f"{p.target_epsilon:g}: raise the noise or run fewer rounds")
        return self

    @model_validator(mode="after")
    def _method_options(self):
        """The method's options, checked by the method's own declaration before any work."""
        try:
            options_for(self.method, self.method_options, self.privacy.model_dump() if self.privacy.mode != "off" else None)
        except FedrouterError as exc:
            raise ValueError(str(exc)) from None
        return self


# --- the one mapping from the config to the core's settings ---------------------------------------------

def train_settings(cfg: Config) -> TrainSettings:
    return TrainSettings(
        local_steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio,
        weight_decay=cfg.weight_decay, total_rounds=cfg.rounds, max_seq_len=cfg.max_seq_len,
        max_new_tokens=cfg.max_new_tokens, eval_batch_size=cfg.eval_batch_size, prompt_template=cfg.prompt_template,
        grad_accum_steps=cfg.grad_accum_steps,
    )


def lora_settings(cfg: Config) -> LoraSettings:
    return LoraSettings(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, tuple(cfg.lora.target_modules))


def sampled_clients(cfg: Config) -> int:
    """How many clients a round samples (the loop's rule: max(1, round(fraction * n)), or all)."""
    return cfg.n_clients if cfg.client_fraction >= 1 else max(1, round(cfg.client_fraction * cfg.n_clients))


def accountant(cfg: Config) -> Accountant | None:
    """The run's privacy accountant (None when privacy is off): the rounds' mechanism, and the method's
    release of data summaries when it declares one."""
    if cfg.privacy.mode == "off":
        return None
    p = cfg.privacy
    centroids = p.centroid_noise_multiplier if facts_of(cfg.method).releases_data_summaries else None
    # Local DP: each client noises its own update; sampling does not hide that it took part.
    population, sampled = (cfg.n_clients, sampled_clients(cfg)) if p.mode == "central" else (1, 1)
    return Accountant(p.noise_multiplier, p.delta, population, sampled, centroids)


def privacy_epsilon(cfg: Config, rounds: int) -> float:
    return accountant(cfg).epsilon(rounds)


def hardware(cfg: Config):
    """The config's device, dtype and quantization, checked against this machine."""
    return resolve_hardware(cfg.device, cfg.dtype, cfg.quantization, cfg.gradient_checkpointing)


def tiny_spec(cfg: Config) -> TinyBaseSpec:
    return TinyBaseSpec(**cfg.tiny.model_dump())


def cpu_threads(cfg: Config, processes: int = 1) -> int:
    """torch's threads for one of `processes` fedrouter processes sharing this machine's CPUs in a run of
    `cfg`: its `threads` key, else `threads.choose_threads` for its model (a hub model's size is unknown
    before it loads: treated as large)."""
    return choose_threads(cfg.threads, tiny_spec(cfg).n_params() if cfg.model == TINY else None, processes)


def cache_dir(cfg: Config) -> Path | None:
    return Path(cfg.cache_dir) if cfg.cache_dir else None


def method_options(cfg: Config) -> dict:
    """The method's options completed with its defaults (already checked when the config was made)."""
    return options_for(cfg.method, cfg.method_options)


def check_template(template: str) -> str:
    """`template` if it inserts the instruction -- `{instruction}`, with no other field, conversion or
    format spec -- at least once; ValueError naming the problem otherwise."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"is not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
    fields = [(name, spec, conversion) for _, name, spec, conversion in parts if name is not None]
    for name, spec, conversion in fields:
        if name != "instruction" or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"may only hold the field {{instruction}}, not {shown}")
    if not fields:
        raise ValueError("must insert the input with {instruction} ({{instruction}} is a literal, not the field)")
    return template


def _non_finite(value, where: str = "method_options") -> str | None:
    """Where in `value` (nested dicts and lists) a float is NaN or infinite, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    if isinstance(value, dict):
        return next((w for k, v in value.items() if (w := _non_finite(v, f"{where}.{k}"))), None)
    if isinstance(value, list):
        return next((w for i, v in enumerate(value) if (w := _non_finite(v, f"{where}[{i}]"))), None)
    return None


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"config: unknown key {where!r}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"config: {where}: {msg}" if where else f"config: {msg}"


def _set_dotted(target: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = target.setdefault(k, {})
        if not isinstance(node, dict):
            raise FedrouterError(f"config: {dotted!r}: {k!r} is not a section")
        target = node
    target[keys[-1]] = value


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse_sets(items: list[str]) -> dict:
    """--set KEY=VALUE items as typed config overrides (dotted keys such as lora.r)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise FedrouterError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = (part.strip() for part in item.split("=", 1))
        if not _KEY.fullmatch(key):
            raise FedrouterError(f"--set {item!r}: {key!r} is not a config key (such as rounds or lora.r)")
        out[key] = parse_value(value)
    return out


def parse_value(text: str) -> Any:
    """A command-line value as TOML would read it (numbers, booleans, lists), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file at `path`, then `overrides` (dotted keys such as ``lora.r``)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FedrouterError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise FedrouterError(f"cannot read config file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise FedrouterError(f"config file {path}: invalid TOML ({exc})") from None
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise FedrouterError(_one_line(err)) from None


def load_saved(run_dir: str | Path) -> Config:
    """A run directory's own config (its config.json), validated as any config; one clear error when it
    is missing or damaged."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    try:
        saved = json.loads(read_regular_text(path))
    except FileNotFoundError:
        raise FedrouterError(f"{run_dir} is not a run directory (no {CONFIG_FILE})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FedrouterError(f"the run's config {path} is unreadable or corrupt ({type(exc).__name__}: {exc})") from None
    if not isinstance(saved, dict):
        raise FedrouterError(f"{path} is not a config (a JSON object)")
    return load_config(None, saved)
