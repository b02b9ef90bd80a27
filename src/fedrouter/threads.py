"""How many threads a process computes with: torch's intra-op pool, and scikit-learn's OpenMP pool
during clustering, sized once per process for its model and the CPUs it may use (issue 34); a block of
work on another model (a sentence encoder embedding a dataset) sized for that model (`threads_for`)."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path

# Below this many parameters a model's matrix products are too short for threads to pay. Measured on 2 cores
# (docs/benchmark.md, "How fast"): the tiny base (0.4M) trains no faster with 2 threads idle and 2.5x slower
# beside 2 busy processes; all-MiniLM-L6-v2 (22.7M) embeds 1.85x faster with 2 threads idle, and as fast as
# with 1 beside 2 busy processes.
SMALL_MODEL_PARAMS = 10_000_000
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" in microseconds, or "max <period>"
_threads: int | None = None  # what set_threads chose in this process (None: torch's default, untouched)
_policy: tuple[int | None, int] = (None, 1)  # the explicit threads and sibling processes set_threads chose by


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
    return max(1, usable_cpus(cpu_max) // max(1, processes))


def usable_cpus(cpu_max: Path = CPU_MAX) -> int:
    """The CPUs this process may run on (taskset, a batch scheduler's cpuset; all on macOS), capped by a
    container's CPU quota (docker --cpus, Kubernetes limits): more threads than it allows only wait."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 here, or a file we cannot read: the affinity alone
    return cpus


def set_threads(threads: int | None, explicit: int | None = None, processes: int = 1) -> None:
    """torch's CPU threads (None: torch's default), remembered for the clustering pools (`chosen_threads`)
    and, with the `explicit` threads and sibling `processes` they were chosen by, for `threads_for`."""
    global _threads, _policy
    if threads:
        import torch  # start-up cost: torch (1 s); the command line imports this module

        torch.set_num_threads(threads)
        _threads, _policy = threads, (explicit, processes)


@contextmanager
def threads_for(n_params: int):
    """Within the block, torch's threads as `choose_threads` picks them for a model of `n_params` under this
    process's policy (the user's explicit choice still wins); back to the process's own after. Outside a
    process that chose its threads, nothing changes."""
    wanted = choose_threads(_policy[0], n_params, _policy[1]) if _threads else None
    if not wanted or wanted == _threads:
        yield
        return
    import torch  # start-up cost, as above

    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(_threads)


def chosen_threads() -> int | None:
    """The threads set_threads set in this process, or None when it was never called."""
    return _threads
