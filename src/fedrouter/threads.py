"""How many threads a process computes with: torch's intra-op pool, and scikit-learn's OpenMP pool
during clustering, sized once per process for its model and the CPUs it may use (issue 34)."""

from __future__ import annotations

import math
import os
from pathlib import Path

# Below this many parameters a model's matrix products are too short for threads to pay (the tiny base: 0.4M).
SMALL_MODEL_PARAMS = 50_000_000
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" in microseconds, or "max <period>"
_threads: int | None = None  # what set_threads chose in this process (None: torch's default, untouched)


def choose_threads(explicit: int | None = None, n_params: int | None = None, processes: int = 1,
                   cpu_max: Path = CPU_MAX) -> int:
    """torch's intra-op threads for this process: `explicit` (the `threads` config key, --threads) when
    given, else $OMP_NUM_THREADS when set, else 1 for a model under SMALL_MODEL_PARAMS (`n_params`; None:
    unknown, treated as large), else the CPUs this process may use divided among the `processes` sibling
    fedrouter processes that share them (at least 1).

    Why: torch's default is one thread per core of the machine, whoever else uses them. Its threads
    spin-wait at the end of each parallel region, so on cores that other processes hold (a browser, a
    shared server, the other jobs of `compare --jobs`) every short region waits for a descheduled thread:
    on 2 busy cores the default run took over 6x its quiet time with torch's default, 2.1x with one thread
    (issue 34). A model as small as the tiny base gains nothing from more threads even on a quiet machine:
    its regions are too short to pay for waking them. $OMP_NUM_THREADS is honoured because torch honours it
    too: it is the user's choice, or Ray's for its actors (one per Flower simulation client)."""
    if explicit:
        return explicit
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    if n_params is not None and n_params < SMALL_MODEL_PARAMS:
        return 1
    try:  # the CPUs this process may run on (taskset, a batch scheduler's cpuset); not on macOS
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    try:  # a container's CPU quota (docker --cpus, Kubernetes limits): more threads than it allows only wait
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 here, or a file we cannot read: the affinity alone
    return max(1, cpus // max(1, processes))


def set_threads(threads: int | None) -> None:
    """torch's CPU threads (None: torch's default), remembered for the clustering pools (`chosen_threads`)."""
    global _threads
    if threads:
        import torch  # start-up cost: torch (1 s); the command line imports this module

        torch.set_num_threads(threads)
        _threads = threads


def chosen_threads() -> int | None:
    """The threads set_threads set in this process, or None when it was never called."""
    return _threads
