"""Threads that fit the work and the machine (issue 34): the choice from the model's size, the CPUs this
process may use and its sibling processes; the clustering pools capped to it; compare's share per job."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from fedrouter import threads
from fedrouter.config import cpu_threads, load_config, tiny_spec
from fedrouter.core import cluster
from fedrouter.core.embed import resolve_embedder
from fedrouter.core.model import TinyBaseSpec
from fedrouter.study import compare
from fedrouter.threads import SMALL_MODEL_PARAMS, choose_threads

LARGE = 7_000_000_000


@pytest.fixture
def eight_cpus(monkeypatch, tmp_path):
    """A process that may use CPUs 0-7, no $OMP_NUM_THREADS, no cgroup quota file."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads, "CPU_MAX", tmp_path / "no-cgroup" / "cpu.max")
    return tmp_path


@pytest.fixture
def torch_threads_restored():
    before = torch.get_num_threads(), threads._threads, threads._policy
    yield
    torch.set_num_threads(before[0])
    threads._threads, threads._policy = before[1], before[2]


def test_a_large_model_gets_the_cpus_it_may_use_shared_among_its_siblings(eight_cpus):
    assert choose_threads(None, LARGE) == 8
    assert choose_threads(None, None) == 8  # size unknown (a hub model before it loads): treated as large
    assert choose_threads(None, LARGE, processes=2) == 4
    assert choose_threads(None, LARGE, processes=3) == 2  # cores // jobs
    assert choose_threads(None, LARGE, processes=20) == 1  # at least one


def test_a_small_model_gets_one_thread(eight_cpus):
    assert choose_threads(None, SMALL_MODEL_PARAMS - 1) == 1
    assert choose_threads(None, SMALL_MODEL_PARAMS) == 8


def test_the_cgroup_quota_caps_the_cpus(eight_cpus):
    cpu_max = eight_cpus / "cpu.max"
    cpu_max.write_text("300000 100000\n")  # docker --cpus 3
    assert choose_threads(None, LARGE, cpu_max=cpu_max) == 3
    assert choose_threads(None, LARGE, processes=2, cpu_max=cpu_max) == 1
    cpu_max.write_text("50000 100000\n")  # half a CPU: still one thread
    assert choose_threads(None, LARGE, cpu_max=cpu_max) == 1
    cpu_max.write_text("max 100000\n")  # no quota: the affinity alone
    assert choose_threads(None, LARGE, cpu_max=cpu_max) == 8
    cpu_max.write_text("garbage\n")
    assert choose_threads(None, LARGE, cpu_max=cpu_max) == 8


def test_explicit_threads_and_omp_num_threads_override(eight_cpus, monkeypatch):
    assert choose_threads(6, 1000, processes=4) == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(None, 1000) == 3 and choose_threads(None, LARGE, processes=2) == 3
    assert choose_threads(5, LARGE) == 5  # --threads over the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert choose_threads(None, LARGE, processes=2) == 4


def test_a_config_sizes_threads_by_its_model(eight_cpus):
    assert TinyBaseSpec().n_params() == 426_624  # the default tiny base, counted on the built model
    tiny = load_config(None, {})
    assert tiny_spec(tiny).n_params() < SMALL_MODEL_PARAMS and cpu_threads(tiny, processes=2) == 1
    hub = load_config(None, {"model": "some-org/some-model"})
    assert cpu_threads(hub) == 8 and cpu_threads(hub, processes=2) == 4
    assert cpu_threads(load_config(None, {"threads": 3})) == 3


def test_clustering_caps_scikit_learns_openmp_pool_to_the_chosen_threads(torch_threads_restored):
    seen = []

    @cluster.one_blas_thread
    def probe():
        seen.append({i["user_api"]: i["num_threads"] for i in threadpool_info()})

    threads.set_threads(3)
    probe()
    threads.set_threads(2)
    probe()
    if "openmp" not in seen[0]:
        pytest.skip("no OpenMP runtime loaded in this process")
    assert [s["openmp"] for s in seen] == [3, 2] and all(s.get("blas", 1) == 1 for s in seen)
    assert torch.get_num_threads() == 2


class InlinePool:
    """A ProcessPoolExecutor that runs each job here, at once, so the test sees what each job is given."""

    def __init__(self, max_workers, mp_context):
        self.max_workers = max_workers

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        future = Future()
        future.set_result(fn(*args))
        return future


def test_compare_jobs_give_each_job_its_share_of_the_cpus(eight_cpus, monkeypatch, tmp_path, torch_threads_restored):
    seen = {}

    def fake_run(cfg, out_dir, progress=True, resume=False, processes=1):
        threads.set_threads(cpu_threads(cfg, processes))  # as run_experiment does
        seen[out_dir.name] = (processes, torch.get_num_threads())

    monkeypatch.setattr(compare, "run_experiment", fake_run)
    monkeypatch.setattr(compare, "ProcessPoolExecutor", InlinePool)
    monkeypatch.setattr(compare, "_done_line", lambda *args: "")
    configs = {f"cell{i}": load_config(None, {"model": "some-org/some-model", "seed": i}) for i in range(3)}
    compare.run_cells(configs, tmp_path / "cells", jobs=2, echo=lambda _: None)
    assert seen == {f"cell{i}": (2, 4) for i in range(3)}  # 8 CPUs, 2 jobs at once: 4 threads each

    seen.clear()
    compare.run_cells({"one": configs["cell0"]}, tmp_path / "one", jobs=2, echo=lambda _: None)
    assert seen == {"one": (1, 8)}  # a single cell runs alone, here: the whole machine


def test_work_on_another_model_gets_threads_for_that_model_and_then_the_process_own(eight_cpus, torch_threads_restored):
    threads._threads = None
    with threads.threads_for(LARGE):  # a process that never chose its threads: left as it is
        assert threads.chosen_threads() is None
    threads.set_threads(1, None, processes=2)  # a tiny-base run, one of 2 jobs
    with threads.threads_for(LARGE):
        assert torch.get_num_threads() == 4  # the job's share of the 8 CPUs, for a model large enough
    assert torch.get_num_threads() == 1
    with threads.threads_for(SMALL_MODEL_PARAMS - 1):
        assert torch.get_num_threads() == 1
    threads.set_threads(1, 1)  # the user said one thread: one thread for everything
    with threads.threads_for(LARGE):
        assert torch.get_num_threads() == 1


def test_the_sentence_encoder_embeds_the_same_at_any_thread_count(torch_threads_restored):
    encoder = resolve_embedder("minilm")
    texts = ["summarize : kate will fix the lamp on saturday .", "q1 : where does anna live ? duplicate ?",
             "[ hugo | job | painter ]"] * 30
    vectors = {}
    for n in (1, 2):
        threads.set_threads(n, n)
        vectors[n] = encoder.embed(texts)
    # the embedding cache holds what one thread count computed and serves it to any other
    assert np.array_equal(vectors[1], vectors[2])
