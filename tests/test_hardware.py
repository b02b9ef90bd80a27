"""Device, dtype, quantization, gradient checkpointing and accumulation, and the dry-run plan -- all on
the CPU: bf16 trains with finite losses and saves float32 adapters; an explicit cpu/float32 run is the
default run bit for bit; what this machine cannot do (4-bit without CUDA, a merged update into 4-bit
weights) is one clear line before any work."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_run, one_error_line, set_args

from fedrouter.cli import main




def test_bf16_on_the_cpu_trains_with_finite_loss_and_saves_float32_adapters(tmp_path, tiny_overrides, tiny_model_dir):
    out = tmp_path / "bf16"
    assert main(["run", "--quiet", "--method", "fedit", "--out", str(out), "--dtype", "bfloat16", "--device", "cpu",
                 *set_args({**tiny_overrides, "rounds": 1})]) == 0
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rounds[0]["train_loss"]) and rounds[0]["train_loss"] > 0
    tensors = load_file(str(out / "adapters" / "global" / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_an_explicit_cpu_float32_run_is_the_default_run_bit_for_bit(tmp_path, tiny_overrides, tiny_model_dir):
    args = ["run", "--quiet", "--method", "fedrouter", *set_args(tiny_overrides)]
    assert main([*args, "--out", str(tmp_path / "default")]) == 0
    assert main([*args, "--out", str(tmp_path / "explicit"), "--device", "cpu", "--dtype", "float32",
                 "--quantization", "none"]) == 0
    assert_same_run(tmp_path / "default", tmp_path / "explicit")


@pytest.mark.parametrize("method", ["flora", "feddpa"])
def test_the_methods_that_write_into_base_weights_run_in_bf16(method, tmp_path, tiny_overrides, tiny_model_dir):
    out = tmp_path / method
    assert main(["run", "--quiet", "--method", method, "--out", str(out), "--dtype", "bfloat16",
                 *set_args({**tiny_overrides, "rounds": 1})]) == 0
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["rouge1"] <= 1
    assert math.isfinite(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["train_loss"])


@pytest.mark.parametrize("args, needle", [
    (["--quantization", "4bit"], 'quantization = "4bit" needs a CUDA GPU'),
    (["--quantization", "8bit"], 'quantization = "8bit" needs a CUDA GPU'),
    (["--device", "cuda"], "this machine has no CUDA GPU"),
    (["--device", "tpu9"], "is not a device"),
    (["--method", "flora", "--quantization", "4bit"], "4bit weights cannot hold"),
    (["--method", "feddpa", "--quantization", "auto"], "auto weights cannot hold"),
])
def test_what_this_machine_cannot_do_is_one_line_before_any_work(args, needle, tmp_path, tiny_overrides, capsys):
    if torch.cuda.is_available() and "--device" in args:
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--out", str(out), *args, *set_args(tiny_overrides)]) == 2
    assert needle in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_the_paper_preset_dry_run_prints_the_plan_and_loads_no_model(monkeypatch, capsys):
    from pathlib import Path

    import fedrouter.core.model as model

    def no_loading(*args, **kwargs):
        raise AssertionError("a dry run loaded a model")

    monkeypatch.setattr(model, "load_base", no_loading)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preset = Path(__file__).resolve().parents[1] / "configs" / "paper.toml"
    assert main(["run", "--config", str(preset), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 clients | 25 rounds x 10 local steps" in out and "lr 0.0005" in out and "LoRA r 8 / alpha 16" in out
    assert "hf:paper4" in out and "600 train / 300 test" in out
    assert "meta-llama/Llama-3.2-1B, 1.24 B parameters" in out
    assert "on a GPU, 4-bit" in out and "GiB" in out


def test_gradient_accumulation_is_one_step_on_the_mean_of_the_micro_batches():
    from fedrouter.core.train import train_steps

    torch.manual_seed(0)
    x = torch.randn(8, 3)
    y = torch.randn(8, 1)

    class Model(torch.nn.Module):  # the loss of a batch is the mean over its rows, as a causal LM's is
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3, 1))

        def forward(self, input_ids, attention_mask, labels):
            return type("Out", (), {"loss": ((input_ids @ self.w - labels) ** 2).mean()})()

    def batch(rows):
        return {"input_ids": x[rows], "attention_mask": torch.ones(len(rows), 1), "labels": y[rows]}

    accumulated, whole = Model(), Model()
    stats = train_steps(accumulated, [accumulated.w], iter([batch([0, 1, 2, 3]), batch([4, 5, 6, 7])]), 1, 0.1,
                        max_grad_norm=0, grad_accum_steps=2)
    train_steps(whole, [whole.w], iter([batch(list(range(8)))]), 1, 0.1, max_grad_norm=0)
    assert torch.allclose(accumulated.w, whole.w, atol=1e-6)  # equal micro-batches: the same step
    assert stats.tokens == 8  # both micro-batches were consumed


def test_a_base_update_in_bf16_is_summed_in_float32_and_undone_exactly(tiny_model_dir):
    from fedrouter.core.hardware import Hardware
    from fedrouter.core.model import LoraSettings, load_base
    from fedrouter.core.workbench import SharedModel, TrainSettings

    base, tokenizer = load_base(str(tiny_model_dir), progress=False, hardware=Hardware(torch.device("cpu"), torch.bfloat16))
    shared = SharedModel(base, tokenizer, LoraSettings(), TrainSettings())
    name = next(n for n, m in shared.model.named_modules() if hasattr(m, "base_layer") and n.endswith("q_proj"))
    weight = shared.model.get_submodule(name).base_layer.weight
    original = weight.detach().clone()
    delta = {name: torch.full(tuple(weight.shape), 1e-3)}
    shared.use_base_delta(delta)
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, (original.float() + 1e-3).to(torch.bfloat16))
    shared.use_base_delta(None)
    assert torch.equal(weight, original)
