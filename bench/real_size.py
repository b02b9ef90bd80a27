"""Real-size checks: a Llama-3.2-1B-shaped model (built from its published config, random weights, no
download) in the federated pipeline.

CPU half (this machine):
  - peak RSS of `fedrouter run` with 1 vs 8 simulated clients (target <= 1.1x: one shared base);
  - seconds per local training step at batch 1 x 256 tokens, with and without gradient checkpointing.
GPU half (--gpu; on a CUDA machine, prepared to finish in a few minutes):
  - training tokens/s inside a federated round vs a bare peft loop on the same batches (target >= 0.95x),
    in bf16 and in 4-bit;
  - peak GPU memory for 8 clients vs 1 (target <= 1.1x);
  - generation tokens/s for routed mixed-adapter batches vs one adapter;
  - the projected wall time of configs/paper.toml's run.

Usage: python bench/real_size.py [--gpu] [--layers 16] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedrouter.plan import KNOWN_SHAPES  # noqa: E402


def build_model_dir(out: Path, dtype: torch.dtype, layers: int | None) -> Path:
    """Llama-3.2-1B's shape with random weights, saved with the tiny base's tokenizer (whose ids are valid
    in the bigger vocabulary): a local model directory `fedrouter run --model` loads like any other."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedrouter.core.model import TinyBaseSpec, ensure_tiny_base

    shape = dict(KNOWN_SHAPES["meta-llama/Llama-3.2-1B"])
    if layers:
        shape["num_hidden_layers"] = layers
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=2048)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_base(TinyBaseSpec(), progress=False))
    tokenizer.save_pretrained(out)
    del model
    return out


def run_peak_rss(model_dir: Path, clients: int, workdir: Path, extra: dict, gpu: bool = False) -> float:
    """Peak RSS (GiB) of one `fedrouter run` process (its own child, so ru_maxrss is its alone); with
    `gpu`, its peak GPU memory allocated (GiB) instead."""
    sets = {"model": f'"{model_dir}"', "n_clients": clients, "rounds": 1, "local_steps": 1, "batch_size": 1,
            "max_seq_len": 256, "train_per_client": 4, "test_per_client": 1, "general_test_per_task": 1,
            "max_new_tokens": 2, "eval_batch_size": 8, "method": '"fedit"', "scenario": '"all"', "threads": 2,
            "checkpoint_keep": 0, **extra}
    code = ("import resource, sys, torch; from fedrouter.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
            "print('GPUPEAK', torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0); sys.exit(rc)")
    args = [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]
    out = workdir / f"run-{clients}-{time.time_ns()}"
    done = subprocess.run([sys.executable, "-c", code, "run", "--quiet", "--out", str(out), *args],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    if gpu:
        return int(done.stdout.split("GPUPEAK")[-1].split()[0]) / 1024**3
    kib = int(done.stdout.split("PEAK")[-1].split()[0])
    return kib / 1024**2


def step_seconds(model_dir: Path, dtype: torch.dtype, checkpointing: bool, steps: int) -> float:
    """Median seconds of one LoRA training step at batch 1 x 256 tokens (the fedrouter train path)."""
    from fedrouter.core.hardware import Hardware
    from fedrouter.core.model import LoraSettings, adapter_parameters, attach_lora, load_base
    from fedrouter.core.train import train_steps

    hardware = Hardware(torch.device("cuda" if torch.cuda.is_available() else "cpu"), dtype,
                        gradient_checkpointing=checkpointing)
    base, _ = load_base(str(model_dir), progress=False, hardware=hardware)
    model = attach_lora(base, LoraSettings())
    params = list(adapter_parameters(model).values())
    ids = torch.randint(0, 700, (1, 256))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        train_steps(model, params, iter([batch]), 1, 1e-4)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def cpu_half(args) -> dict:
    torch.set_num_threads(2)
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_model_dir(tmp / "llama-1b-shape", torch.bfloat16, args.layers)
        layers = args.layers or KNOWN_SHAPES["meta-llama/Llama-3.2-1B"]["num_hidden_layers"]
        print(f"Llama-3.2-1B shape, {layers} layers, random weights, bf16 on the CPU", flush=True)
        for checkpointing in (False, True):
            s = step_seconds(model_dir, torch.bfloat16, checkpointing, args.steps)
            figures[f"step_s_gc_{checkpointing}"] = s
            print(f"  one local step, batch 1 x 256 tokens, gradient checkpointing {'on' if checkpointing else 'off'}: "
                  f"{s:.2f} s (median of {args.steps})", flush=True)
        rss = {n: run_peak_rss(model_dir, n, tmp, {"dtype": '"bfloat16"', "device": '"cpu"'}) for n in (1, 8)}
        figures.update({"rss_1_gib": rss[1], "rss_8_gib": rss[8], "rss_ratio": rss[8] / rss[1]})
        print(f"  peak RSS of fedrouter run: 1 client {rss[1]:.2f} GiB, 8 clients {rss[8]:.2f} GiB: "
              f"{rss[8] / rss[1]:.3f}x (target <= 1.1x)", flush=True)
    return figures


def gpu_half(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU")
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_model_dir(tmp / "llama-1b-shape", torch.bfloat16, args.layers)
        for quant in ("none", "4bit"):
            for n in (1, 8):
                sets = {"dtype": '"bfloat16"', "device": '"cuda"', "quantization": f'"{quant}"', "threads": 4,
                        "batch_size": 16, "local_steps": 5, "train_per_client": 160}
                figures[f"{quant}_{n}_gpu_gib"] = run_peak_rss(model_dir, n, tmp, sets, gpu=True)
            ratio = figures[f"{quant}_8_gpu_gib"] / figures[f"{quant}_1_gpu_gib"]
            print(f"  {'bf16' if quant == 'none' else '4-bit'}: peak GPU memory, 1 client {figures[f'{quant}_1_gpu_gib']:.2f} "
                  f"GiB, 8 clients {figures[f'{quant}_8_gpu_gib']:.2f} GiB: {ratio:.3f}x (target <= 1.1x)", flush=True)
        for checkpointing in (False, True):
            figures[f"gpu_step_s_gc_{checkpointing}"] = step_seconds(model_dir, torch.bfloat16, checkpointing, args.steps)
            print(f"  GPU step, batch 1 x 256, gc {checkpointing}: {figures[f'gpu_step_s_gc_{checkpointing}']:.3f} s", flush=True)
    return figures


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU half (needs CUDA)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the real 16 (quicker, same width)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting (median)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    figures = gpu_half(args) if args.gpu else cpu_half(args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
