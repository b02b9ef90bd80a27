"""`fedrouter predict` round-trips a run directory: routing by nearest centroid, answers by that adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrouter.cli import main


def _run(tmp_path, overrides, method):
    out = tmp_path / method
    args = ["run", "--out", str(out), "--quiet", "--method", method]
    for k, v in {**overrides, "method_options.n_global": 2, "method_options.n_local": 2}.items():
        if method != "fedrouter" and k.startswith("method_options"):
            continue
        args += ["--set", f"{k}={json.dumps(v) if isinstance(v, str) else v}"]
    assert main(args) == 0
    return out


PROMPTS = ["[ anna | job | baker ] [ anna | city | rome ]",
           "the bank of oslo said on monday that it will open the park in may .",
           "kate : can you fix the lamp on saturday ? carla : yes , i will do it . kate : perfect !"]


@pytest.mark.slow
def test_predict_routes_to_nearest_centroid_and_answers_with_that_adapter(tmp_path, tiny_overrides, tiny_model_dir):
    from fedrouter.core.embed import resolve_embedder
    from fedrouter.core.generate import generate
    from fedrouter.core.train import encode_examples
    from fedrouter.serving.finished_run import load_run

    run_dir = _run(tmp_path, tiny_overrides, "fedrouter")
    assert (run_dir / "router" / "router.json").is_file()
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(run_dir), *sum((["--prompt", p] for p in PROMPTS), []), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS

    cfg, model, tokenizer, router = load_run(run_dir)
    x = resolve_embedder(router["embedder"], model, tokenizer).embed(PROMPTS)
    # the discriminant router (the default): distances after the saved whitening map
    assert router["whiten"].shape == (x.shape[1], x.shape[1])
    d = np.linalg.norm((x[:, None, :] - router["centroids"][None, :, :]) @ router["whiten"], axis=2)
    for row, dists in zip(rows, d):
        assert row["adapter"] == router["adapters"][int(dists.argmin())]
        assert row["distance"] == pytest.approx(float(dists.min()), rel=1e-5)
        model.set_adapter(row["adapter"])  # the adapter alone, no mixed batch
        prompt = encode_examples(tokenizer, [{"instruction": row["prompt"], "output": "", "task": ""}],
                                 cfg.prompt_template, cfg.max_seq_len)[0].prompt_ids
        assert generate(model, tokenizer, [prompt], cfg.max_new_tokens) == [row["answer"]]


def test_predict_without_router_uses_the_global_adapter(tmp_path, tiny_overrides, tiny_model_dir, capsys):
    run_dir = _run(tmp_path, tiny_overrides, "fedit")
    assert main(["predict", str(run_dir), "--prompt", PROMPTS[0]]) == 0
    assert "[global]" in capsys.readouterr().out


def test_predict_answers_a_merged_update_run_with_its_base_plus_that_update(tmp_path, tiny_overrides, tiny_model_dir, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    from fedrouter.core.generate import generate
    from fedrouter.core.model import load_base
    from fedrouter.core.train import encode_examples
    from fedrouter.serving.finished_run import load_run

    run_dir = _run(tmp_path, tiny_overrides, "flora")
    update = load_file(run_dir / "merged_update.safetensors")
    assert update and all(bool(d.abs().max() > 0) for d in update.values())
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(run_dir), "--prompt", PROMPTS[0], "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["adapter"] == "global"

    # independently: the plain base with the update added, no peft at all
    cfg = load_run(run_dir)[0]
    base, tokenizer = load_base(str(tiny_model_dir))
    with torch.no_grad():
        for name, delta in update.items():
            weight = base.get_submodule(name.removeprefix("base_model.model.")).weight
            weight.copy_(weight + delta)
    prompt = encode_examples(tokenizer, [{"instruction": PROMPTS[0], "output": "", "task": ""}], cfg.prompt_template,
                             cfg.max_seq_len)[0].prompt_ids
    assert generate(base, tokenizer, [prompt], cfg.max_new_tokens) == [row["answer"]]

    name = next(iter(update))  # a damaged update: one line, exit 2
    save_file({**update, name: torch.zeros(3, 3)}, str(run_dir / "merged_update.safetensors"))
    capsys.readouterr()
    assert main(["predict", str(run_dir), "--prompt", PROMPTS[0]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "merged update" in err[0] and "(3, 3)" in err[0]


def test_predict_refuses_unfinished_runs_and_no_prompts(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    assert main(["predict", str(tmp_path / "half"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a finished run directory" in err[0]
    assert main(["predict", str(tmp_path / "half")]) == 2
    assert "nothing to answer" in capsys.readouterr().err


def test_predict_reads_prompts_from_jsonl_and_reports_bad_lines(tmp_path, capsys):
    from fedrouter.serving.predict import read_prompts

    good = tmp_path / "in.jsonl"
    good.write_text('{"instruction": "a"}\n\n{"instruction": "b", "output": "x"}\n')
    args = type("A", (), {"prompt": ["p"], "file": good})()
    assert read_prompts(args.prompt, args.file) == ["p", "a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n{"text": "b"}\n')
    (tmp_path / "half").mkdir()
    assert main(["predict", str(tmp_path / "half"), "--file", str(bad)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
