"""A finished run, loaded to answer prompts: the one core `fedrouter predict` and `fedrouter serve` share.

`load_run` loads the base model (`--model`, else $FEDROUTER_MODEL, else the run's own when it is the
embedded tiny base, built in this machine's cache: `--cache-dir`, else $FEDROUTER_CACHE -- never a folder
the run directory names), checks it against the fingerprint the run recorded of its base (another base:
refused), then every adapter the run saved and its router (FedRouter: centroids, cluster -> adapter map,
embedder, and the discriminant router's whitening map). `route_prompts` sends each prompt to an adapter by
FedRouter's one routing function (the nearest centroid, after whitening when the router has the map); a run without a router (FedIT)
answers with its single `global` adapter, and one that leaves a merged update (FLoRA, FlexLoRA, FedEx-LoRA)
with its base plus that update. `encode_prompts` builds prompt token ids as the run's evaluation
does. Every file of the run directory is read through `rundir`, which checks it first: a damaged or
tampered run directory is one clear error.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

from fedrouter import rundir
from fedrouter.config import hardware, load_saved, lora_settings, tiny_spec
from fedrouter.core.embed import resolve_embedder
from fedrouter.core.model import (TINY, add_update, attach_lora, base_fingerprint, fingerprint_mismatch, load_base,
                                   lora_base_weight)
from fedrouter.core.train import encode_examples
from fedrouter.errors import FedrouterError
from fedrouter.methods.fedrouter.router import linear_scores, route

log = logging.getLogger(__name__)

MODEL_ENV = "FEDROUTER_MODEL"  # the base model predict and serve load, when --model is not given


def base_model_name(cfg, model: str | None) -> str:
    """The base model to load for a run: the one given (`--model`, else $FEDROUTER_MODEL), else the run's
    own if it is the embedded tiny base; a run directory never names a path or hub id this machine loads."""
    given = model or os.environ.get(MODEL_ENV) or None
    if given:
        return given
    if cfg.model == TINY:
        return TINY
    raise FedrouterError(f"this run was trained on base model {cfg.model!r}: give it with --model (or ${MODEL_ENV}); "
                         "a run directory does not choose what this machine loads")


def load_run(run_dir: Path, model: str | None = None, cache_dir: Path | None = None):
    """(config, peft model with every saved adapter, tokenizer, router or None) of a finished run; every
    file is checked first. The base model is `model` (see `base_model_name`), built or found in `cache_dir`
    (None: $FEDROUTER_CACHE or the default cache), and must match the run's recorded fingerprint of its base."""
    rundir.require_finished(run_dir)
    cfg = load_saved(run_dir)
    name = base_model_name(cfg, model)
    recorded = rundir.read_base(run_dir)
    router, update = rundir.read_router(run_dir), None
    if router is not None:
        names = router["adapters"]
    elif (run_dir / rundir.ADAPTERS / "global").is_dir():
        names = ["global"]
        rundir.require_adapter(run_dir, "global")
    elif (update := rundir.read_merged_update(run_dir)) is None:
        raise FedrouterError(f"{run_dir} has no router, no global adapter and no merged update: method {cfg.method} "
                             "keeps client-private adapters only")
    base, tokenizer = load_base(name, cache_dir, tiny_spec(cfg), progress=False, hardware=hardware(cfg))
    if recorded is None:
        log.warning("%s records no fingerprint of its base model (made before they were recorded): cannot check "
                    "that %r is the base its adapters were trained on", run_dir, name)
    else:
        problem = fingerprint_mismatch(recorded["fingerprint"], base_fingerprint(base, tokenizer))
        if problem:
            raise FedrouterError(f"base model {name!r} is not the one this run's adapters were trained on "
                                 f"({recorded.get('model')!r}): {problem}")
    if update is not None:
        model = with_merged_update(base, update, lora_settings(cfg))
        model.eval()
        return cfg, model, tokenizer, router
    unique = list(dict.fromkeys(names))
    try:
        model = PeftModel.from_pretrained(base, rundir.require_adapter(run_dir, unique[0]), adapter_name=unique[0])
        for name in unique[1:]:
            model.load_adapter(rundir.require_adapter(run_dir, name), adapter_name=name)
    except Exception as exc:  # a loading boundary: a damaged or foreign adapter file
        raise FedrouterError(f"cannot load the run's adapters: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    model.eval()
    return cfg, model, tokenizer, router


def with_merged_update(base, update: dict[str, torch.Tensor], lora):
    """The base plus a run's merged update (the model FLoRA, FlexLoRA and FedEx-LoRA leave), added as their
    clients add it (`add_update`), wrapped with a `global` adapter that adds nothing (peft starts B at zero):
    such a run then answers as a run with a global adapter does."""
    model = attach_lora(base, lora, adapter_name="global")
    with torch.no_grad():
        for name, delta in update.items():
            try:
                weight = lora_base_weight(model, name)
            except AttributeError:
                raise FedrouterError(f"the run's merged update names {name!r}, which is not a LoRA module of the base") from None
            if tuple(delta.shape) != tuple(weight.shape) or not weight.is_floating_point():
                raise FedrouterError(f"the run's merged update for {name!r} has shape {tuple(delta.shape)}, the base's "
                                     f"weight {tuple(weight.shape)} ({weight.dtype})")
            add_update(weight, weight, delta)
    return model


def router_embedder(router: dict | None, model, tokenizer):
    """The embedder the run's router compares prompts with (None for a run without a router)."""
    return resolve_embedder(router["embedder"], model, tokenizer) if router is not None else None


def route_prompts(router: dict | None, embedder, prompts: list[str]) -> tuple[list[str], list[float | None]]:
    """(adapter, distance to its centroid) per prompt, routed by FedRouter's one routing function among all
    clusters with the router's embedder (distances after whitening under the discriminant router); a run
    without a router answers with its `global` adapter (distance None)."""
    if router is None:
        return ["global"] * len(prompts), [None] * len(prompts)
    x, centroids, whiten = embedder.embed(prompts), router["centroids"], router.get("whiten")
    rows = route(x, *linear_scores(centroids, whiten))
    gaps = (np.asarray(x, dtype=np.float64) - centroids[rows]) @ (np.eye(x.shape[1]) if whiten is None else whiten)
    return [router["adapters"][g] for g in rows], np.linalg.norm(gaps, axis=1).tolist()


def encode_prompts(cfg, tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt token ids as the run's evaluation builds them (its prompt template, its max_seq_len)."""
    encoded = encode_examples(tokenizer, [{"instruction": p, "output": "", "task": ""} for p in prompts],
                              cfg.prompt_template, cfg.max_seq_len)
    return [e.prompt_ids for e in encoded]


def prompt_room(cfg, tokenizer) -> int:
    """How many prompt tokens (template included) the run's evaluation keeps whole: max_seq_len less the
    room it holds for an answer; a longer prompt would lose its start."""
    answer_room = len(encode_examples(tokenizer, [{"instruction": "", "output": "", "task": ""}],
                                      cfg.prompt_template, cfg.max_seq_len)[0].answer_ids)
    return cfg.max_seq_len - answer_room
