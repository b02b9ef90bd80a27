"""The run directory: its format, written and read here and nowhere else.

```
<run>/config.json          the resolved config; written when the run claims the directory
<run>/metrics.jsonl        one line per round
<run>/checkpoints/         one checkpoint per round (fedrouter.checkpoint); removed when the run ends
<run>/adapters/<name>/     PEFT format (adapter_config.json + adapter_model.safetensors)
<run>/router/              centroids.safetensors + router.json (cluster -> adapter, embedder)
<run>/embedding_map.json   a 2-D map of the clients' training embeddings (FedRouter, in simulation)
<run>/base_model.json      the base model the adapters were trained on: its name and fingerprint
<run>/per_client.csv
<run>/results.json         written last: a run without it is not finished
<run>/FAILED               the reason a run stopped (absent while it runs or once it has finished)
<run>/.lock                the pid of the process running it; locked (flock) while a run or resume works in it
```

Claiming a new directory is atomic (two runs racing for the same `--out`: exactly one wins), and a run or
resume holds the directory's lock for its whole life (a second resume of the same run is refused, naming
the pid that holds it; the lock goes with the process, however it ends). Every file is written whole or
not at all (`fedrouter.atomic`). Readers (`predict`, `report`, `serve`) get one clear `FedrouterError`
for a directory that is unfinished, damaged or tampered with -- read only from regular files (a FIFO is
refused, not waited on) -- and never unpickle.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import os
import re
import shutil
import stat
import time
from datetime import datetime
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedrouter import atomic, checkpoint
from fedrouter.config import CONFIG_FILE
from fedrouter.errors import FedrouterError

log = logging.getLogger(__name__)

CONFIG = CONFIG_FILE
METRICS = "metrics.jsonl"
RESULTS = "results.json"
FAILED = "FAILED"
ADAPTERS = "adapters"
ROUTER = "router"
CHECKPOINTS = checkpoint.DIR
EMBEDDING_MAP = "embedding_map.json"
PER_CLIENT = "per_client.csv"
BASE = "base_model.json"
LOCK = ".lock"

# Names a run directory gives its adapters (cluster2, client3-local, global): a plain name, never a path.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def plain_name(name, what: str) -> str:
    """`name` if it is a plain file name (letters, digits, '_', '.', '-'; no path, not '.' or '..')."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise FedrouterError(f"{what} {name!r} is not a plain name (letters, digits, '_', '.', '-')")
    return name


def default_path(method: str, scenario: str, seed: int) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{method}-{scenario}-seed{seed}-{stamp}"


# ------------------------------------------------------------------------------------------- writing

class RunLock:
    """The exclusive lock of a run directory, held from the moment a run claims it (or a resume starts)
    until that process ends its work: an flock on <run>/.lock, which also says the holder's pid. The
    kernel drops it when the process ends in any way (a SIGKILL too), so a stale lock never blocks a
    resume. The file itself is never removed (removing a lock file lets two processes lock two files)."""

    def __init__(self, run_dir: Path):
        run_dir = Path(run_dir)
        path = run_dir / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise FedrouterError(f"cannot lock run directory {run_dir}: {exc.strerror or exc}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FedrouterError(f"cannot lock run directory {run_dir}: {path} is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "(starting; pid not written yet)"
                raise FedrouterError(f"run directory {run_dir} is in use by process {holder} (a run or resume of it); "
                                     "wait for it to end, or stop that process first") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the lock goes with the last descriptor of its open file
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(run_dir: Path, config: dict) -> RunLock:
    """Make `run_dir` this run's (new, or existing and empty): lock it, then create its config.json
    exclusively -- of two runs racing for it, exactly one succeeds. Returns the lock, held. One clear error
    when it is taken or cannot be written."""
    run_dir = Path(run_dir)
    lock = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if any(p.name != LOCK for p in run_dir.iterdir()):  # (a lock file alone: a claim that failed)
            raise FedrouterError(f"run directory {run_dir} already exists and is not empty; choose another --out")
        lock = RunLock(run_dir)
        atomic.create_exclusive(run_dir / CONFIG, (json.dumps(config, indent=2) + "\n").encode(), mode=0o644)
    except BaseException as exc:
        if lock is not None:
            lock.release()
        if isinstance(exc, FileExistsError):
            if run_dir.is_dir():  # another run created config.json between our look and our write
                raise FedrouterError(f"run directory {run_dir} was just claimed by another run; choose another --out") from None
            raise FedrouterError(f"cannot create run directory {run_dir}: a file of that name exists") from None
        if isinstance(exc, OSError):
            raise FedrouterError(f"cannot create run directory {run_dir}: {exc.strerror or exc}") from None
        raise
    return lock


def reopen(run_dir: Path) -> None:
    """A resumed run is being worked on again: it is no longer failed."""
    (Path(run_dir) / FAILED).unlink(missing_ok=True)


def resumable(run_dir: Path, config: dict) -> dict:
    """The newest readable checkpoint of the unfinished run in `run_dir`, written under `config`; one
    clear error when there is none or the config differs (before any work)."""
    run_dir = Path(run_dir)
    if (run_dir / RESULTS).exists():
        raise FedrouterError(f"{run_dir} is a finished run (it has {RESULTS}); nothing to resume")
    saved = checkpoint.load_latest(run_dir)
    if saved is None:
        raise FedrouterError(f"{run_dir} has no readable checkpoint to resume from; run it again from the start")
    checkpoint.check_belongs(saved, config, run_dir / CONFIG)
    return saved


def lock_for_resume(run_dir: Path, config: dict) -> tuple[RunLock, dict]:
    """The lock of the unfinished run in `run_dir` and its newest readable checkpoint, for a resume. What
    cannot be resumed is refused first, touching nothing; then the lock is taken (a run or resume going on
    in it is refused, naming its pid) and the checkpoint read again under it (the run may have moved on)."""
    resumable(run_dir, config)
    lock = RunLock(run_dir)
    try:
        return lock, resumable(run_dir, config)
    except BaseException:
        lock.release()
        raise


def write_run(run_dir: Path, config: dict, produce, resumed_under: RunLock | None = None,
              start: float | None = None) -> dict:
    """Claim `run_dir` (locking it and writing its config.json) -- or, for a resume, reopen it under the
    lock the caller took before reading its checkpoint (`resumed_under`) -- let `produce()` fill it and
    return the results, then write results.json last -- or FAILED with the reason (a signal's name too),
    so an unfinished run never looks complete or alive. A write that fails (a full disk) ends in one
    FedrouterError with the reason. The lock is released when this returns or raises."""
    start = time.perf_counter() if start is None else start
    if resumed_under is not None:
        lock = resumed_under
        reopen(run_dir)
    else:
        lock = claim(run_dir, config)
    try:
        results = produce()
        results["wall_s"] = time.perf_counter() - start
        results["run_dir"] = str(run_dir)
        finish(run_dir, results)
    except BaseException as exc:
        unrecorded = mark_failed(run_dir, exc)
        if isinstance(exc, OSError):
            where = f" ({exc.filename})" if exc.filename else ""
            also = f"; FAILED could not be written either ({unrecorded})" if unrecorded else ""
            raise FedrouterError(f"run {run_dir} failed: {exc.strerror or exc}{where}{also}") from None
        raise
    finally:
        lock.release()
    return results


def mark_failed(run_dir: Path, exc: BaseException) -> str | None:
    """Record why the run stopped in FAILED; returns None, or why even that could not be written (a full
    disk): then an empty FAILED is left if at all possible, so the run never looks complete or running."""
    reason = f"{type(exc).__name__}: {exc}\n"
    try:
        atomic.write_text(Path(run_dir) / FAILED, reason)
        return None
    except OSError as write_error:
        try:
            os.close(os.open(Path(run_dir) / FAILED, os.O_WRONLY | os.O_CREAT, 0o644))
        except OSError:
            pass
        return write_error.strerror or str(write_error)


def finish(run_dir: Path, results: dict) -> None:
    """results.json, last and atomically; the checkpoints go (a finished run needs none)."""
    atomic.write_json(Path(run_dir) / RESULTS, results)
    shutil.rmtree(Path(run_dir) / CHECKPOINTS, ignore_errors=True)


def write_json(path: Path, payload) -> None:
    atomic.write_json(path, payload)


class MetricsLog:
    """metrics.jsonl as the run goes: one line per round, flushed as it is written. It starts from the
    rounds `earlier` (none for a new run; a resumed run's rounds up to its checkpoint, so that rounds a
    killed process recorded past it are dropped)."""

    def __init__(self, run_dir: Path, earlier: list[dict]):
        self.path, self.earlier = Path(run_dir) / METRICS, list(earlier)
        self.handle = None

    def __enter__(self) -> "MetricsLog":
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.earlier))
        self.handle = self.path.open("a")
        return self

    def append(self, record: dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def __exit__(self, *exc) -> None:
        self.handle.close()


def save_base(run_dir: Path, name: str, fingerprint: dict) -> None:
    """Which base model the run's adapters belong to (`core.model.base_fingerprint`)."""
    atomic.write_json(Path(run_dir) / BASE, {"model": name, "fingerprint": fingerprint})


def read_base(run_dir: Path) -> dict | None:
    """The run's recorded base model ({"model", "fingerprint"}), or None for a run made before it was
    recorded; one clear error for a damaged file."""
    path = Path(run_dir) / BASE
    if not path.exists():
        return None
    base = read_json(path, "the run's base model record")
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), dict):
        raise FedrouterError(f"{path} is not a base model record (an object with a fingerprint)")
    return base


def save_embedding_map(run_dir: Path, points: list[dict] | None) -> None:
    """The 2-D map of the clients' training embeddings (points with x, y, task, cluster), if there is one."""
    if points:
        atomic.write_json(Path(run_dir) / EMBEDDING_MAP, {"projection": "PCA", "points": points})


def write_per_client_csv(run_dir: Path, rows: list[dict]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "tasks": "+".join(row["tasks"])})
    atomic.write_text(Path(run_dir) / PER_CLIENT, buffer.getvalue())


def save_adapters(folder: Path, shared, named: dict) -> list[str]:
    """Adapters by name, in PEFT format under <folder>/adapters/<name>/ (each loaded into the shared
    model's slot, then saved by peft)."""
    for name, adapter in named.items():
        plain_name(name, "adapter name")
        shared.load(adapter)
        shared.model.save_pretrained(Path(folder) / ADAPTERS / name)
    return sorted(named)


def save_tensors(run_dir: Path, filename: str, tensors: dict) -> None:
    """A method's other tensors (FLoRA's merged update) as one safetensors file in the run directory."""
    atomic.write_bytes(Path(run_dir) / plain_name(filename, "tensor file"), save(tensors))


def save_router(run_dir: Path, router: dict | None) -> None:
    """router/centroids.safetensors (the centroids, and the discriminant router's whitening map when it has
    one) + router/router.json (cluster -> adapter, embedder): what predict needs."""
    if router is None:
        return
    out = Path(run_dir) / ROUTER
    out.mkdir(exist_ok=True)
    tensors = {"centroids": torch.tensor(router["centroids"], dtype=torch.float32).contiguous()}
    if router.get("whiten") is not None:
        tensors["whiten"] = torch.tensor(router["whiten"], dtype=torch.float32).contiguous()
    atomic.write_bytes(out / "centroids.safetensors", save(tensors))
    atomic.write_json(out / "router.json", {"adapters": router["adapters"], "embedder": router["embedder"]})


# ------------------------------------------------------------------------------------------- reading

def read_json(path: Path, what: str):
    """A JSON file, or one clear error naming it (missing, unreadable, truncated, not a regular file)."""
    try:
        return json.loads(atomic.read_regular_text(path))
    except FileNotFoundError:
        raise FedrouterError(f"{what} {path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FedrouterError(f"{what} {path} is unreadable or corrupt ({type(exc).__name__}: {exc})") from None


def require_finished(run_dir: Path) -> None:
    if not (Path(run_dir) / RESULTS).is_file():
        raise FedrouterError(f"{run_dir} is not a finished run directory (no {RESULTS})")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of the run directory (a regular file: `atomic.read_regular`), or one line saying it is not."""
    try:
        return load(atomic.read_regular(path))
    except (OSError, SafetensorError) as exc:
        raise FedrouterError(f"{path} is unreadable or corrupt ({type(exc).__name__})") from None


MERGED_UPDATE = "merged_update.safetensors"  # FLoRA, FlexLoRA, FedEx-LoRA: the model they leave is base + it


def read_merged_update(run_dir: Path) -> dict[str, torch.Tensor] | None:
    """The run's merged update (module name -> dense delta W), or None when it has none; every tensor checked
    to be a finite float matrix."""
    path = Path(run_dir) / MERGED_UPDATE
    if not path.exists():
        return None
    tensors = _read_tensors(path)
    bad = [n for n, t in tensors.items() if t.ndim != 2 or not t.is_floating_point() or not bool(torch.isfinite(t).all())]
    if not tensors or bad:
        raise FedrouterError(f"{path}: " + (f"{bad[0]!r} is not a finite float matrix" if bad else "it holds no tensors"))
    return tensors


def read_router(run_dir: Path) -> dict | None:
    """The run's router -- {"centroids": float32 array (k, d), "adapters": k names, "embedder": str,
    "whiten": float32 array (d, d) or None} -- or None when the run has none; every part checked (one
    adapter per centroid, plain names that exist, a square whitening map as wide as the centroids)."""
    folder = Path(run_dir) / ROUTER
    if not (folder / "router.json").exists():
        return None
    router = read_json(folder / "router.json", "the router file")
    if not isinstance(router, dict) or not isinstance(router.get("adapters"), list) or not isinstance(router.get("embedder"), str):
        raise FedrouterError(f"{folder / 'router.json'} is not a router (it needs a list 'adapters' and a string 'embedder')")
    names = [plain_name(n, "the router's adapter") for n in router["adapters"]]
    tensors = _read_tensors(folder / "centroids.safetensors")
    if "centroids" not in tensors:
        raise FedrouterError(f"{folder / 'centroids.safetensors'} is unreadable or corrupt (KeyError)")
    centroids, whiten = tensors["centroids"], tensors.get("whiten")
    if centroids.ndim != 2 or not centroids.is_floating_point() or not bool(torch.isfinite(centroids).all()):
        raise FedrouterError(f"{folder / 'centroids.safetensors'}: centroids must be a finite (clusters x dimensions) matrix")
    if len(names) != centroids.shape[0]:
        raise FedrouterError(f"the router lists {len(names)} adapters for {centroids.shape[0]} centroids")
    if whiten is not None and (tuple(whiten.shape) != (centroids.shape[1],) * 2 or not whiten.is_floating_point()
                               or not bool(torch.isfinite(whiten).all())):
        raise FedrouterError(f"{folder / 'centroids.safetensors'}: the whitening map must be a finite "
                             f"({centroids.shape[1]} x {centroids.shape[1]}) matrix, got {tuple(whiten.shape)}")
    for name in names:
        require_adapter(run_dir, name)
    return {"centroids": centroids.float().numpy(), "adapters": names, "embedder": router["embedder"],
            "whiten": None if whiten is None else whiten.float().numpy()}


def require_adapter(run_dir: Path, name: str) -> Path:
    path = Path(run_dir) / ADAPTERS / plain_name(name, "adapter")
    if not (path / "adapter_model.safetensors").is_file() or not (path / "adapter_config.json").is_file():
        raise FedrouterError(f"adapter {name!r} is missing from {Path(run_dir) / ADAPTERS}")
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rounds ([] when there is none); a bad line is one clear error naming it."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    try:
        lines = atomic.read_regular_text(path).splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FedrouterError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise FedrouterError(f"{path}:{number}: not valid JSON (a truncated or damaged file)") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise FedrouterError(f"{path}:{number}: not a round record")
        rows.append(row)
    return rows


def read_embedding_map(run_dir: Path) -> list[dict] | None:
    """The embedding map's points ({x, y, task, cluster}), None when the run has none; one clear error
    for a damaged file."""
    path = Path(run_dir) / EMBEDDING_MAP
    if not path.exists():
        return None
    payload = read_json(path, "the embedding map")
    points = payload.get("points") if isinstance(payload, dict) else None
    ok = isinstance(points, list) and all(
        isinstance(p, dict) and isinstance(p.get("x"), (int, float)) and isinstance(p.get("y"), (int, float))
        and isinstance(p.get("task"), str) and isinstance(p.get("cluster"), int) for p in points)
    if not ok:
        raise FedrouterError(f"{path} is not an embedding map (a list of points with x, y, task and cluster)")
    return points


# What results.json must hold for the comparison tables and the report.
RESULT_KEYS = ("method", "scenario", "seed", "rouge1", "generalization", "per_client", "per_task", "base_rouge1",
               "bytes_up", "bytes_down", "wall_s")


def read_results(run_dir: Path) -> dict:
    """A finished run's results.json, or one clear error naming the file when it is unreadable or incomplete."""
    path = Path(run_dir) / RESULTS
    r = read_json(path, "the run's results")
    missing = [k for k in RESULT_KEYS if not isinstance(r, dict) or k not in r]
    if missing:
        raise FedrouterError(f"{path} lacks {', '.join(missing)}: not a finished fedrouter run (delete that run to redo it)")
    return r
