"""`fedrouter predict RUN_DIR`: answer new prompts with a finished run's adapters and router, all in one
mixed batch (the run as `finished_run.load_run` loads it; each prompt to the adapter `route_prompts` picks)."""

from __future__ import annotations

import json
from pathlib import Path

from fedrouter.atomic import write_text
from fedrouter.core.data import read_jsonl_rows
from fedrouter.core.generate import generate
from fedrouter.errors import FedrouterError
from fedrouter.serving.finished_run import encode_prompts, load_run, route_prompts, router_embedder


def read_prompts(prompts: list[str], file: Path | None) -> list[str]:
    """The prompts given, then the `instruction` of every line of `file` (JSONL)."""
    prompts = list(prompts)
    if file:
        prompts += [row["instruction"] for row in read_jsonl_rows(file, ("instruction",))]
    if not prompts:
        raise FedrouterError("nothing to answer: give --prompt TEXT or --file FILE.jsonl")
    return prompts


def predict(run_dir: Path, prompts: list[str], model_name: str | None = None, cache_dir: Path | None = None) -> list[dict]:
    """One {prompt, adapter, distance, answer} per prompt (the base model as `load_run` takes it)."""
    cfg, model, tokenizer, router = load_run(Path(run_dir), model_name, cache_dir)
    chosen, distances = route_prompts(router, router_embedder(router, model, tokenizer), prompts)
    answers = generate(model, tokenizer, encode_prompts(cfg, tokenizer, prompts), cfg.max_new_tokens, cfg.eval_batch_size,
                       adapter_names=chosen)
    return [{"prompt": p, "adapter": a, "distance": d, "answer": ans}
            for p, a, d, ans in zip(prompts, chosen, distances, answers)]


def write_answers(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
