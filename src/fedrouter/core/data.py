"""Tasks, examples and scenarios: which client holds which tasks, and how many examples of each.

An example is a dict ``{"instruction": str, "output": str, "task": str}``. Data comes from the embedded
synthetic benchmark (`fedrouter.core.synthetic`: ``synthetic``, or ``synthetic-hard``, its variant with
several templates per task and tasks that share an input format) or from JSONL files in that schema, where
the task label may sit in another field (``category`` in flan8).

Scenarios spread tasks over clients:
- ``single``: client i holds task ``i mod T`` (8 clients, 4 tasks: two clients per task);
- ``dual``: client i holds tasks ``i mod T`` and ``(i+1) mod T``, half and half;
- ``all``: every client holds every task in equal parts;
- ``dirichlet``: client i's task mixture is drawn from Dir(alpha) (small alpha: skewed clients).
Each client's test set follows its own task mixture (personalization); the generalization test set holds
every task (test-time generalization).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedrouter.core import hfdata, synthetic
from fedrouter.errors import FedrouterError
from fedrouter.progress import steps

log = logging.getLogger(__name__)

SCENARIOS = ("single", "dual", "all", "dirichlet")
SYNTHETIC = "synthetic"
SYNTHETIC_HARD = "synthetic-hard"
NO_TASK_FIELD = "none"  # task_field for data without task labels
UNLABELLED = "unlabelled"  # the one task such data is read as (use scenario "all")
EMBEDDED = {SYNTHETIC: "default", SYNTHETIC_HARD: "hard"}  # data value -> variant of the embedded benchmark
HF = "hf:"  # "hf:paper4" or "hf:<hub id or local path>" (fedrouter.core.hfdata)


@dataclass
class ClientData:
    client_id: int
    tasks: list[str]  # the tasks this client holds, in scenario order
    train: list[dict]
    test: list[dict]


@dataclass
class FederatedData:
    tasks: list[str]
    clients: list[ClientData]
    general_test: list[dict] = field(default_factory=list)  # every task: test-time generalization


def task_shares(scenario: str, tasks: list[str], n_clients: int, seed: int = 0, alpha: float = 0.5) -> list[dict[str, float]]:
    """Per client, the share of its data that each of its tasks takes (shares sum to 1)."""
    n_tasks = len(tasks)
    if scenario == "single":
        return [{tasks[i % n_tasks]: 1.0} for i in range(n_clients)]
    if scenario == "dual":
        if n_tasks < 2:
            raise FedrouterError("scenario 'dual' needs at least 2 tasks")
        return [{tasks[i % n_tasks]: 0.5, tasks[(i + 1) % n_tasks]: 0.5} for i in range(n_clients)]
    if scenario == "all":
        return [{t: 1.0 / n_tasks for t in tasks} for _ in range(n_clients)]
    if scenario == "dirichlet":
        rng = np.random.default_rng(seed)
        shares = rng.dirichlet([alpha] * n_tasks, size=n_clients)
        return [{t: float(s) for t, s in zip(tasks, row) if s > 0} for row in shares]
    raise FedrouterError(f"unknown scenario {scenario!r}; choose one of: {', '.join(SCENARIOS)}")


def split_count(total: int, shares: dict) -> dict:
    """Split `total` items over the keys of `shares`, exactly (largest remainder), dropping zero counts."""
    raw = {t: total * s for t, s in shares.items()}
    counts = {t: int(v) for t, v in raw.items()}
    leftover = total - sum(counts.values())
    for t in sorted(raw, key=lambda t: raw[t] - counts[t], reverse=True)[:leftover]:
        counts[t] += 1
    return {t: c for t, c in counts.items() if c > 0}


def read_jsonl_rows(path: Path, required: tuple[str, ...]) -> list[dict]:
    """JSON objects from a JSONL file, each with string fields `required`; a bad line is reported with
    its file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FedrouterError(f"data file not found: {path}")
    rows = []
    try:
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FedrouterError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise FedrouterError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                for key in required:
                    if not isinstance(row.get(key), str):
                        problem = "missing" if key not in row else "not a string"
                        hint = (" (data without task labels: task_field 'none')"
                                if key not in ("instruction", "output") and key not in row else "")
                        raise FedrouterError(f"{path}:{lineno}: field {key!r} is {problem}{hint}")
                    try:
                        row[key].encode("utf-8")
                    except UnicodeEncodeError as exc:  # a lone surrogate such as \ud800: no text, and no tokenizer takes it
                        bad = row[key][exc.start]
                        raise FedrouterError(f"{path}:{lineno}: field {key!r} holds an invalid character "
                                             f"(a lone surrogate, \\u{ord(bad):04x})") from None
                rows.append(row)
    except (OSError, UnicodeDecodeError) as exc:
        raise FedrouterError(f"cannot read data file {path}: {exc}") from None
    if not rows:
        raise FedrouterError(f"data file {path} holds no examples")
    return rows


def load_jsonl(path: Path, task_field: str = "task") -> list[dict]:
    """Examples ({instruction, output, task}) from a JSONL file whose task label sits in `task_field`.

    `task_field` NO_TASK_FIELD ("none") reads data without labels: every example's task is UNLABELLED (what
    a real client holds; FedRouter finds the tasks itself, and clustering scores are null).
    """
    if task_field == NO_TASK_FIELD:
        return [{"instruction": r["instruction"], "output": r["output"], "task": UNLABELLED}
                for r in read_jsonl_rows(path, ("instruction", "output"))]
    return [{"instruction": r["instruction"], "output": r["output"], "task": r[task_field]}
            for r in read_jsonl_rows(path, ("instruction", "output", task_field))]


class _Pools:
    """Per (task, split) example pools that clients draw disjoint slices from: the embedded benchmark's
    seeded streams, a folder's JSONL files, or Hugging Face datasets ("hf:paper4": the paper's four, at
    most `cap` rows per task and split; "hf:<id or path>": any dataset with a field mapping)."""

    def __init__(self, source: str, task_field: str, seed: int, sources: dict | None = None, fields: dict | None = None,
                 cap: dict[str, int] | None = None):
        self.source, self.seed = source, seed
        self.variant = EMBEDDED.get(source)  # None: not the embedded benchmark
        self._next = {}  # (task, split) -> next unused index
        self._streams: dict[tuple[str, str], synthetic.ExampleStream] = {}
        if self.variant:
            self.tasks = list(synthetic.tasks_of(self.variant))
            self._pool = {}
        else:
            self._pool = {}
            for split, rows in self._read(source, task_field, sources or {}, fields or {}, cap or {}):
                for ex in rows:
                    self._pool.setdefault((ex["task"], split), []).append(ex)
            for key in self._pool:
                random.Random(f"{seed}:{key}").shuffle(self._pool[key])
            self.tasks = sorted({t for t, _ in self._pool})
            for t in self.tasks:
                if (t, "test") not in self._pool or (t, "train") not in self._pool:
                    raise FedrouterError(f"task {t!r} needs examples in both train and test data")

    @staticmethod
    def _read(source: str, task_field: str, sources: dict, fields: dict, cap: dict):
        if source.startswith(HF):
            name = source[len(HF):]
            for split in ("train", "test"):
                if name == "paper4":
                    rows = hfdata.load_paper4(split, per_task=cap.get(split), sources=sources)
                else:  # the task from data_fields.task, else the column task_field names ("task": if there is one)
                    columns = dict(fields) or {"instruction": "instruction", "output": "output"}  # field -> its column
                    if task_field == NO_TASK_FIELD:
                        columns.pop("task", None)
                    elif "task" not in columns and task_field != "task":
                        columns["task"] = task_field
                    rows = hfdata.load_mapped(name, split, columns,
                                              task_column="task" if "task" not in columns and task_field != NO_TASK_FIELD else None)
                if task_field == NO_TASK_FIELD:  # data read as unlabelled, as from JSONL: the labels are not used
                    rows = [{**row, "task": UNLABELLED} for row in rows]
                yield split, rows
            return
        train_path, test_path = _resolve_files(Path(source))
        for split, path in (("train", train_path), ("test", test_path)):
            yield split, load_jsonl(path, task_field)

    def available(self, task: str, split: str) -> int:
        return len(self._pool[(task, split)]) if not self.variant else 10**9

    def take(self, task: str, split: str, n: int) -> list[dict]:
        start = self._next.get((task, split), 0)
        self._next[(task, split)] = start + n
        if self.variant:
            # One long seeded stream per (task, split), continued: slices never repeat across clients.
            if (task, split) not in self._streams:
                self._streams[(task, split)] = synthetic.ExampleStream(task, seed=f"{self.seed}:{split}", variant=self.variant)
            return self._streams[(task, split)].take(n)
        return self._pool[(task, split)][start : start + n]


def _resolve_files(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        train, test = path / "train.jsonl", path / "test.jsonl"
        for f in (train, test):
            if not f.is_file():
                raise FedrouterError(f"data directory {path} has no {f.name} (expected train.jsonl and test.jsonl)")
        return train, test
    raise FedrouterError(f"data path not found or not a directory: {path} (expected a folder with train.jsonl and test.jsonl)")


def build_federated_data(
    source: str,
    scenario: str,
    n_clients: int,
    train_per_client: int,
    test_per_client: int,
    general_test_per_task: int,
    seed: int = 0,
    task_field: str = "task",
    tasks: list[str] | None = None,
    dirichlet_alpha: float = 0.5,
    sources: dict | None = None,
    fields: dict | None = None,
) -> FederatedData:
    """Partition `source` ("synthetic", "synthetic-hard", "hf:..." or a folder with train.jsonl/test.jsonl) over
    clients by `scenario`.

    Clients sharing a task get disjoint examples of it. When a JSONL pool is too small for the requested
    sizes, every client's count for that task is scaled down alike, and a warning says so.
    """
    # at most what every client could ask of one task (a hub dataset may hold millions of rows)
    cap = {"train": n_clients * train_per_client, "test": n_clients * test_per_client + general_test_per_task}
    pools = _Pools(source, task_field, seed, sources, fields, cap)
    all_tasks = pools.tasks
    if tasks:
        unknown = sorted(set(tasks) - set(all_tasks))
        if unknown:
            raise FedrouterError(f"unknown task(s) {', '.join(unknown)}; the data has: {', '.join(all_tasks)}")
        all_tasks = [t for t in all_tasks if t in tasks]
    shares = task_shares(scenario, all_tasks, n_clients, seed, dirichlet_alpha)

    per_split = {}
    for split, per_client in (("train", train_per_client), ("test", test_per_client)):
        wanted = [split_count(per_client, s) for s in shares]
        for task in all_tasks:
            demand = sum(w.get(task, 0) for w in wanted)
            have = pools.available(task, split)
            if demand > have:
                holders = [i for i, w in enumerate(wanted) if task in w]
                if have < len(holders):
                    raise FedrouterError(f"task {task!r} has {have} {split} examples for {len(holders)} clients holding it")
                log.warning("task %s: %d %s examples wanted, %d available; scaling down", task, demand, split, have)
                scaled = split_count(have, {i: wanted[i][task] / demand for i in holders})
                for i in holders:  # a negligible share can round to zero: that client drops the task
                    if scaled.get(i, 0):
                        wanted[i][task] = scaled[i]
                    else:
                        del wanted[i][task]
        empty = [i for i, w in enumerate(wanted) if not w]
        if empty:
            raise FedrouterError(f"client {empty[0]} would get no {split} examples: the data is too small for {n_clients} clients")
        per_split[split] = wanted


    clients = []
    # A bar only where building takes a while (thousands of clients); leave=False keeps small runs quiet.
    for cid in steps(range(n_clients), "building client data", unit="client", leave=False, enabled=n_clients >= 500):
        train = [ex for t, n in per_split["train"][cid].items() for ex in pools.take(t, "train", n)]
        test = [ex for t, n in per_split["test"][cid].items() for ex in pools.take(t, "test", n)]
        random.Random(f"{seed}:client{cid}").shuffle(train)
        clients.append(ClientData(cid, list(shares[cid]), train, test))

    general = []
    for task in all_tasks:
        if pools.variant:
            general += synthetic.generate_examples(task, general_test_per_task, seed=f"{seed}:general", variant=pools.variant)
        else:  # may overlap client test sets: it is a separate evaluation, not a held-out split
            general += pools._pool[(task, "test")][:general_test_per_task]
    return FederatedData(all_tasks, clients, general)
