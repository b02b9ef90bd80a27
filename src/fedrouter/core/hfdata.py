"""The FedRouter paper's four datasets, and any other dataset, read through Hugging Face `datasets`.

`load_paper4` gives the paper's task mix with the embedded benchmark's task names:

| task           | dataset: hub id, config                                | fedrouter train / test split |
| -------------- | ------------------------------------------------------ | ---------------------------- |
| `paraphrase`   | QQP: `nyu-mll/glue`, `qqp`                             | train / validation           |
| `data_to_text` | WebNLG: `webnlg-challenge/web_nlg`, `release_v3.0_en`  | train / test                 |
| `summarize`    | SAMSum: `Samsung/samsum`                               | train / test                 |
| `headline`     | Gigaword: `Harvard/gigaword`                           | train / test                 |

(`web_nlg` and `gigaword`, the old ids, redirect to the last two.) WebNLG and Gigaword were hub
loading-script datasets when this was written, which `datasets` 4 and later cannot read: for them,
give a local copy (`sources`).

Every row is rendered into the data schema ``{"instruction": str, "output": str, "task": str}`` with a
FLAN-like template (the exact strings are the `*_TEMPLATE` constants below):

- QQP: ``Are these two questions asking the same thing?\\nQuestion 1: {q1}\\nQuestion 2: {q2}`` -> ``yes`` / ``no``;
- WebNLG: ``Write a sentence that describes these facts:\\n{triples}``, one ``subject | property | object``
  triple a line with the DBpedia underscores turned into spaces -> the first lexicalisation;
- SAMSum: ``Summarize this dialogue:\\n{dialogue}``, one stripped turn a line -> the summary;
- Gigaword: ``Write a short headline for this news sentence:\\n{document}`` -> the summary.

Texts are stripped of surrounding white space. A row that cannot be used (an empty text, a QQP label
other than 0 or 1, a WebNLG entry without lexicalisation) is skipped.

`load_mapped` reads any dataset -- a hub id or a local file or folder -- whose fields map onto the schema.

`datasets` asks the hub for a dataset and falls back on its local cache when the hub cannot be reached;
it honours ``HF_HUB_OFFLINE`` (cache only), which is left alone here. A dataset that is neither cached nor reachable, a missing field, an unknown
task: each is one `FedrouterError` line that names the dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrouter.errors import FedrouterError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")  # fedrouter's splits; each dataset says which of its own splits serves for each

QQP_TEMPLATE = "Are these two questions asking the same thing?\nQuestion 1: {question1}\nQuestion 2: {question2}"
QQP_ANSWERS = {0: "no", 1: "yes"}
WEBNLG_TEMPLATE = "Write a sentence that describes these facts:\n{triples}"
SAMSUM_TEMPLATE = "Summarize this dialogue:\n{dialogue}"
GIGAWORD_TEMPLATE = "Write a short headline for this news sentence:\n{document}"

# A local copy is read by the `datasets` builder that its file name ends with.
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# `datasets` names a folder's dev.* files "validation"; a dataset's own split name may be either.
_SPLIT_ALIASES = {"dev": "validation", "validation": "dev"}

Pair = tuple[str, str]


@dataclass(frozen=True)
class PaperDataset:
    """One of the paper's datasets: where it lives on the hub, which splits serve, how a row reads."""

    task: str  # the task name, as in the embedded benchmark
    hub_id: str
    config: str | None  # the hub dataset's config name (None: its default)
    splits: Mapping[str, str]  # fedrouter split ("train", "test") -> the dataset's own split
    fields: tuple[str, ...]  # the columns the renderer reads
    pair: Callable[[dict], Pair | None]  # row -> (instruction, output), None for an unusable row

    def render(self, row: dict) -> dict | None:
        """`row` as ``{"instruction", "output", "task"}``, or None when the row cannot be used."""
        pair = self.pair(row)
        if pair is None:
            return None
        return {"instruction": pair[0], "output": pair[1], "task": self.task}


def _text(value: Any) -> str:
    """A text field, stripped; "" for a missing or non-text value (the renderers then skip the row)."""
    return value.strip() if isinstance(value, str) else ""


def _qqp(row: dict) -> Pair | None:
    question1, question2, label = _text(row["question1"]), _text(row["question2"]), row["label"]
    # GLUE's test split hides its labels as -1; only a real 0/1 label makes an example.
    if not question1 or not question2 or isinstance(label, bool) or label not in QQP_ANSWERS:
        return None
    return QQP_TEMPLATE.format(question1=question1, question2=question2), QQP_ANSWERS[label]


def _column(value: Any, key: str) -> list:
    """`key`'s values from a `datasets` sequence of records: served as a dict of lists by the
    `Sequence(...)` features of the hub copy, or as a list of dicts by a re-export with `List(...)`."""
    if isinstance(value, Mapping):
        return list(value.get(key) or [])
    if isinstance(value, list):
        return [item.get(key) for item in value if isinstance(item, Mapping)]
    return []


def _webnlg(row: dict) -> Pair | None:
    triple_sets = _column(row["modified_triple_sets"], "mtriple_set")
    # An entry has one modified triple set; its triples read "Subject_Name | property | Object_Name".
    triples = [_text(t).replace("_", " ") for t in (triple_sets[0] if triple_sets else []) if _text(t)]
    texts = [_text(t) for t in _column(row["lex"], "text")]
    if not triples or not texts or not texts[0]:
        return None
    return WEBNLG_TEMPLATE.format(triples="\n".join(triples)), texts[0]


def _samsum(row: dict) -> Pair | None:
    # SAMSum's dialogues end turns with "\r\n" (and stray spaces): one stripped turn a "\n" line.
    dialogue = "\n".join(line.strip() for line in _text(row["dialogue"]).splitlines() if line.strip())
    summary = _text(row["summary"])
    if not dialogue or not summary:
        return None
    return SAMSUM_TEMPLATE.format(dialogue=dialogue), summary


def _gigaword(row: dict) -> Pair | None:
    # Kept as served: lower case, tokenised, digits as '#', brackets as -lrb- / -rrb-.
    document, summary = _text(row["document"]), _text(row["summary"])
    if not document or not summary:
        return None
    return GIGAWORD_TEMPLATE.format(document=document), summary


PAPER4: dict[str, PaperDataset] = {
    d.task: d
    for d in (
        # QQP's test labels are all -1 (hidden): GLUE's validation split is the test set.
        PaperDataset("paraphrase", "nyu-mll/glue", "qqp", {"train": "train", "test": "validation"},
                     ("question1", "question2", "label"), _qqp),
        PaperDataset("data_to_text", "webnlg-challenge/web_nlg", "release_v3.0_en", {"train": "train", "test": "test"},
                     ("modified_triple_sets", "lex"), _webnlg),
        PaperDataset("summarize", "Samsung/samsum", None, {"train": "train", "test": "test"},
                     ("dialogue", "summary"), _samsum),
        PaperDataset("headline", "Harvard/gigaword", None, {"train": "train", "test": "test"},
                     ("document", "summary"), _gigaword),
    )
}


def load_paper4(split: str, per_task: int | None = None, sources: dict[str, str] | None = None, seed: int = 0,
                *, tasks: Sequence[str] | None = None) -> list[dict]:
    """The examples of the paper's tasks for fedrouter split `split` ("train" or "test"), task by task.

    per_task: at most this many examples a task -- the first usable rows after a shuffle of the
        split seeded by `seed`; None: every usable row, in the dataset's order.
    sources: task -> a local copy that replaces the hub id: a .json / .jsonl (or .csv / .parquet) file,
        read whole as the split asked for, or a folder read with ``load_dataset(folder)``, from which the
        task's split is taken (train.jsonl, test.jsonl, validation.jsonl...; in a clone of the hub
        repository, the task's config). A value that is no local path is taken as another hub id
        holding the same columns, read with its default config.
    tasks: which of PAPER4's tasks to load (default: all four, in PAPER4's order).
    """
    if split not in SPLITS:
        raise FedrouterError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    _check_count("per_task", per_task)
    sources = dict(sources or {})
    for what, names in (("data sources", sources), ("tasks", tasks or [])):
        for name in names:
            if name not in PAPER4:
                raise FedrouterError(f"unknown task {name!r} in {what}; the paper's tasks are {', '.join(PAPER4)}")
    examples: list[dict] = []
    for task in tasks or list(PAPER4):
        spec = PAPER4[task]
        source = sources.get(task, spec.hub_id)
        # The config name goes with the hub id, and with a local clone of its repository; not with a mirror.
        config = spec.config if source == spec.hub_id or _local_path(source) else None
        hint = f"give a local copy with data_sources.{task}=PATH"
        rows = _open(source, config, spec.splits[split], hint)
        _check_fields(rows, spec.fields, f"{source!r} (task {task})")
        examples += _take(map(spec.render, _order(rows, per_task, seed)), per_task, source, spec.splits[split])
    return examples


def load_mapped(source: str, split: str, fields: dict[str, str], limit: int | None = None, *,
                config: str | None = None, task: str | None = None, task_column: str | None = None) -> list[dict]:
    """The rows of any dataset as examples, through a field mapping.

    source: a hub dataset id, or a local file or folder (read as in `load_paper4`'s sources).
    split: the dataset's own split name ("train", "validation", ...); a single local file is read whole.
    fields: ``{"instruction": <field>, "output": <field>, "task": <field>}``; without "task", every row
        gets the constant task `task`, by default the source's name (``Samsung/samsum`` -> ``samsum``,
        ``data/qa.jsonl`` -> ``qa``). A number becomes its str(); a row with an empty or null value is skipped.
    limit: at most this many examples, the first usable rows in the dataset's order (None: all).
    config: the hub dataset's config name, if it has several.
    task_column: without fields["task"], a column to take the task from when the dataset has one (the
        `--task-field` default, "task": a dataset's own task labels are not dropped for a constant).
    """
    _check_count("limit", limit)
    unknown = sorted(set(fields) - {"instruction", "output", "task"})
    missing = [k for k in ("instruction", "output") if k not in fields]
    if unknown or missing:
        raise FedrouterError(f"field mapping for dataset {source!r} needs keys instruction and output (and optionally task); "
                             f"{'unknown: ' + ', '.join(unknown) if unknown else 'missing: ' + ', '.join(missing)}")
    constant_task = task or _source_name(source)
    rows = _open(source, config, split, "give a local file or folder as the source")
    if "task" not in fields and task_column is not None and task_column in rows.column_names:
        fields = {**fields, "task": task_column}
    _check_fields(rows, tuple(fields.values()), repr(source))

    def render(row: dict) -> dict | None:
        example = {key: _as_text(row[field], field, source) for key, field in fields.items()}
        example.setdefault("task", constant_task)
        if not all(example.values()):
            return None
        return {"instruction": example["instruction"], "output": example["output"], "task": example["task"]}

    return _take(map(render, rows), limit, source, split)


def _check_count(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise FedrouterError(f"{name} must be a whole number >= 0 or None, not {value!r}")


def _source_name(source: str) -> str:
    name = source.rstrip("/").rsplit("/", 1)[-1]
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix in _FILE_BUILDERS else name


def _as_text(value: Any, field: str, source: str) -> str:
    """A mapped value as text: strings stripped, numbers (a class label) as str(), None as "" (skipped)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)):
        return str(value)
    raise FedrouterError(f"dataset {source!r}: field {field!r} holds {type(value).__name__} values, not text; "
                         "map a text field")


def _check_fields(rows: Any, needed: Iterable[str], dataset: str) -> None:
    """Name the first needed field that the rows lack, before any row is read."""
    columns = list(rows.column_names)
    for field in needed:
        if field not in columns:
            raise FedrouterError(f"dataset {dataset} has no field {field!r}; its fields: {', '.join(columns)}")


def _order(rows: Any, per_task: int | None, seed: int) -> Iterable[dict]:
    # A hub split is often sorted (by topic, by date): a capped take comes from a seeded shuffle.
    # keep_in_memory: the shuffle's index list is not written to the datasets cache.
    if per_task is None:
        return rows
    return rows.shuffle(seed=seed, keep_in_memory=True)


def _take(examples: Iterable[dict | None], cap: int | None, source: str, split: str) -> list[dict]:
    """The first `cap` usable examples (all when None); a source with none at all is an error."""
    out: list[dict] = []
    skipped = 0
    for example in examples:
        if cap is not None and len(out) >= cap:
            break
        if example is None:
            skipped += 1
            continue
        out.append(example)
    if not out and cap != 0:
        raise FedrouterError(f"dataset {source!r} has no usable rows in split {split!r}")
    if skipped:
        log.info("dataset %r, split %r: skipped %d unusable row(s)", source, split, skipped)
    return out


def _local_path(source: str) -> Path | None:
    """`source` as a local path, or None for a hub id ("name" or "owner/name")."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.startswith(("/", ".", "~")) or source.count("/") > 1 or path.suffix in _FILE_BUILDERS:
        raise FedrouterError(f"local data path {source!r} does not exist")
    return None


def _open(source: str, config: str | None, split: str, hint: str) -> Any:
    """Split `split` of `source` as a `datasets.Dataset`; the library's errors become one FedrouterError line."""
    try:
        import datasets  # start-up cost: datasets (0.7 s), for hf: data only
        from datasets.exceptions import DatasetsError
    except ImportError:
        raise FedrouterError("the Hugging Face datasets package is needed: pip install datasets") from None
    path = _local_path(source)
    try:
        if path is None:
            return datasets.load_dataset(source, config, split=split)
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise FedrouterError(f"cannot read {source!r}: give a {', '.join(_FILE_BUILDERS)} file or a folder")
            # One file has no splits: read for train and for test, it gives the same rows to both.
            log.warning("%s is a single file, read whole as split %r (a folder with one file a split keeps "
                        "train and test apart)", source, split)
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        # A folder holds one file (or file set) a split; pick ours by name, dev and validation alike.
        # A clone of a hub repository with several configs (GLUE) declares them in its README: then ours.
        try:
            available = datasets.load_dataset(str(path))
        except ValueError as e:
            if config is None or not str(e).startswith("Config name is missing"):
                raise
            available = datasets.load_dataset(str(path), config)
        for name in (split, _SPLIT_ALIASES.get(split)):
            if name in available:
                return available[name]
        raise FedrouterError(f"dataset {source!r} has no split {split!r}; its splits: {', '.join(available)}")
    except FedrouterError:
        raise
    except ConnectionError:
        # OfflineModeIsEnabled is a ConnectionError too; datasets raises it once its cache had no copy.
        why = "HF_HUB_OFFLINE=1" if datasets.config.HF_HUB_OFFLINE else "no connection"
        raise FedrouterError(f"dataset {source!r} is not in the local Hugging Face cache and the hub cannot be reached "
                             f"({why}): download it where the hub is reachable, or {hint}") from None
    except RuntimeError as e:
        if "scripts are no longer supported" not in str(e):
            raise
        # datasets >= 4 runs no loading scripts, and some hub datasets still are one.
        raise FedrouterError(f"dataset {source!r} is a loading-script dataset, which datasets {datasets.__version__} "
                             f"cannot read: {hint} (its columns as JSON lines or parquet)") from None
    except (DatasetsError, FileNotFoundError, ValueError) as e:
        # Not on the hub (or gated), an unknown config or split, a malformed file. The library's first two
        # lines say what and which (a missing config name, then the configs to pick from), on one line here.
        what = " ".join(line.strip() for line in str(e).strip().splitlines()[:2]) or type(e).__name__
        raise FedrouterError(f"dataset {source!r} cannot be loaded: {what}") from None
