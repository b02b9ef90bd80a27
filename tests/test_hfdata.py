"""The Hugging Face loaders on small local copies in each dataset's own columns, offline and cache-isolated."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets", reason="the Hugging Face datasets package is not installed (pip install datasets)")

import huggingface_hub.constants  # noqa: E402  (after the skip: it comes with datasets)

from fedrouter.core.hfdata import PAPER4, load_mapped, load_paper4  # noqa: E402
from fedrouter.errors import FedrouterError  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
SOURCES = {
    "paraphrase": str(FIXTURES / "qqp.jsonl"),
    "data_to_text": str(FIXTURES / "webnlg.jsonl"),
    "summarize": str(FIXTURES / "samsum.jsonl"),
    "headline": str(FIXTURES / "gigaword.jsonl"),
}
NOT_A_DATASET = "fedrouter-test/not-a-dataset-xyz"


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    """No network and a private cache: the offline switches and cache folders set in the environment and,
    since `datasets` and `huggingface_hub` read them once at import, in their config modules too."""
    home = tmp_path / "hf"
    cache = home / "datasets"
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(home),
                        "HF_DATASETS_CACHE": str(cache), "HF_HUB_CACHE": str(home / "hub")}.items():
        monkeypatch.setenv(name, value)
    config = datasets.config
    for name, value in {"HF_HUB_OFFLINE": True, "HF_DATASETS_OFFLINE": True, "HF_CACHE_HOME": str(home),
                        "HF_DATASETS_CACHE": cache, "HF_MODULES_CACHE": home / "modules",
                        "DOWNLOADED_DATASETS_PATH": cache / "downloads",
                        "EXTRACTED_DATASETS_PATH": cache / "downloads" / "extracted"}.items():
        monkeypatch.setattr(config, name, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("a test of fedrouter.core.hfdata tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache


QUESTION = "Are these two questions asking the same thing?\nQuestion 1: {}\nQuestion 2: {}"

PARAPHRASE = [
    {"instruction": "Are these two questions asking the same thing?\nQuestion 1: How do I learn Python quickly?\n"
                    "Question 2: What is the fastest way to learn Python?",
     "output": "yes", "task": "paraphrase"},
    {"instruction": QUESTION.format("Why is the sky blue?", "Why is the ocean salty?"), "output": "no", "task": "paraphrase"},
    {"instruction": QUESTION.format("What is the best laptop for programming?", "Which laptop should a programmer buy?"),
     "output": "yes", "task": "paraphrase"},
    # (the row labelled -1, as in GLUE's test split, is skipped; the surrounding spaces of the next are stripped)
    {"instruction": QUESTION.format("How can I improve my English?", "How do I get better at English?"),
     "output": "no", "task": "paraphrase"},
]

DATA_TO_TEXT = [
    {"instruction": 'Write a sentence that describes these facts:\nAarhus Airport | cityServed | "Aarhus, Denmark"',
     "output": "The Aarhus is the airport of Aarhus, Denmark.", "task": "data_to_text"},
    {"instruction": "Write a sentence that describes these facts:\nAlan Bean | birthPlace | Wheeler, Texas\n"
                    "Alan Bean | occupation | Test pilot",
     "output": "Alan Bean, born in Wheeler, Texas, worked as a test pilot.", "task": "data_to_text"},
    # (Id3 has no lexicalisation: skipped)
    {"instruction": "Write a sentence that describes these facts:\nBakewell pudding | region | Derbyshire Dales\n"
                    "Bakewell pudding | mainIngredient | Almond\nBakewell pudding | course | Dessert",
     "output": "Bakewell pudding is a dessert from the Derbyshire Dales whose main ingredient is almond.",
     "task": "data_to_text"},
]

SUMMARIZE = [
    {"instruction": "Summarize this dialogue:\nAmanda: I baked  cookies. Do you want some?\nJerry: Sure!\n"
                    "Amanda: I'll bring you tomorrow :-)",
     "output": "Amanda baked cookies and will bring Jerry some tomorrow.", "task": "summarize"},
    {"instruction": "Summarize this dialogue:\nOlivia: Who are you voting for in this election?\nOliver: Liberals as always.\n"
                    "Olivia: Me too!!\nOliver: Great",
     "output": "Olivia and Olivier are voting for liberals in this election.", "task": "summarize"},
    # (an empty dialogue and an empty summary: both skipped)
    {"instruction": "Summarize this dialogue:\nEdward: Rachel, I think I'm in love with Bella..\n"
                    "Rachel: Dont say anything else..\nEdward: What do you mean??\nRachel: Open your fb and check my status",
     "output": "Edward thinks he is in love with Bella. Rachel wants Edward to check her status on Facebook.",
     "task": "summarize"},
]

HEADLINE = [
    {"instruction": "Write a short headline for this news sentence:\naustralia 's current account deficit shrunk by a record "
                    "#.## billion dollars -lrb- #.## billion us -rrb- in the june quarter due to soaring commodity prices , "
                    "figures released monday showed .",
     "output": "australian current account deficit narrows sharply", "task": "headline"},
    {"instruction": "Write a short headline for this news sentence:\nat least two people were killed in a suspected bomb "
                    "attack on a passenger bus in the strife-torn southern philippines on monday , the military said .",
     "output": "at least two dead in southern philippines blast", "task": "headline"},
    # (a blank summary: skipped)
    {"instruction": "Write a short headline for this news sentence:\njapanese share prices closed lower on friday as "
                    "investors took profits after recent gains , dealers said .",
     "output": "tokyo stocks close lower", "task": "headline"},
]

EXPECTED = {"paraphrase": PARAPHRASE, "data_to_text": DATA_TO_TEXT, "summarize": SUMMARIZE, "headline": HEADLINE}


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("task", list(EXPECTED))
def test_each_dataset_renders_its_own_format_exactly(task):
    assert load_paper4("train", sources=SOURCES, tasks=[task]) == EXPECTED[task]


def test_paper4_gives_every_task_in_order_and_writes_only_to_the_private_cache(offline_hf):
    examples = load_paper4("train", sources=SOURCES)
    assert examples == PARAPHRASE + DATA_TO_TEXT + SUMMARIZE + HEADLINE
    assert list(PAPER4) == ["paraphrase", "data_to_text", "summarize", "headline"]
    assert offline_hf.is_dir()  # the json builder's arrow cache went to tmp_path, not the user's cache
    # A single file is the split asked for, whichever that is.
    assert load_paper4("test", sources=SOURCES) == examples


def test_paper4_knows_each_datasets_hub_home_and_splits():
    qqp, webnlg, samsum, gigaword = PAPER4.values()
    assert (qqp.hub_id, qqp.config, dict(qqp.splits)) == ("nyu-mll/glue", "qqp", {"train": "train", "test": "validation"})
    assert (webnlg.hub_id, webnlg.config, webnlg.splits["test"]) == ("webnlg-challenge/web_nlg", "release_v3.0_en", "test")
    assert (samsum.hub_id, samsum.splits["test"]) == ("Samsung/samsum", "test")
    assert (gigaword.hub_id, gigaword.splits["test"]) == ("Harvard/gigaword", "test")
    assert qqp.render({"question1": "a?", "question2": "b?", "label": -1}) is None


def test_webnlg_rows_read_as_a_list_of_records_too():
    # A re-export with List(...) features serves sequences of records as lists of dicts.
    row = {"modified_triple_sets": [{"mtriple_set": ["Alan_Bean | nationality | United_States"]}],
           "lex": [{"text": "Alan Bean is American.", "lid": "Id1"}, {"text": "Alan Bean is from the US.", "lid": "Id2"}]}
    assert PAPER4["data_to_text"].render(row) == {
        "instruction": "Write a sentence that describes these facts:\nAlan Bean | nationality | United States",
        "output": "Alan Bean is American.", "task": "data_to_text"}


def test_per_task_caps_each_task_with_a_seeded_shuffle():
    capped = load_paper4("train", per_task=2, sources=SOURCES, seed=3)
    for task, expected in EXPECTED.items():
        rows = [e for e in capped if e["task"] == task]
        assert len(rows) == 2 and all(row in expected for row in rows)
    assert load_paper4("train", per_task=2, sources=SOURCES, seed=3) == capped
    assert load_paper4("train", per_task=0, sources=SOURCES) == []
    assert load_paper4("train", per_task=50, sources=SOURCES, tasks=["headline"]) == HEADLINE
    with pytest.raises(FedrouterError, match="per_task"):
        load_paper4("train", per_task=-1, sources=SOURCES)


def test_a_folder_source_serves_the_datasets_own_split_for_each_fedrouter_split(tmp_path):
    folder = tmp_path / "qqp"
    _write_jsonl(folder / "train.jsonl", [{"question1": "Is it?", "question2": "Is it so?", "label": 1, "idx": 0}])
    _write_jsonl(folder / "validation.jsonl", [{"question1": "Why?", "question2": "How?", "label": 0, "idx": 0},
                                               {"question1": "Who?", "question2": "Whom?", "label": -1, "idx": 1}])
    sources = {"paraphrase": str(folder)}
    assert load_paper4("train", sources=sources, tasks=["paraphrase"]) == [
        {"instruction": QUESTION.format("Is it?", "Is it so?"), "output": "yes", "task": "paraphrase"}]
    # QQP's fedrouter test split is GLUE's validation split.
    assert load_paper4("test", sources=sources, tasks=["paraphrase"]) == [
        {"instruction": QUESTION.format("Why?", "How?"), "output": "no", "task": "paraphrase"}]
    (folder / "validation.jsonl").unlink()
    with pytest.raises(FedrouterError, match=r"has no split 'validation'; its splits: train"):
        load_paper4("test", sources=sources, tasks=["paraphrase"])


def test_a_clone_of_a_hub_repository_with_several_configs_gives_the_tasks_config(tmp_path):
    clone = tmp_path / "glue"
    _write_jsonl(clone / "qqp" / "validation.jsonl", [{"question1": "Why?", "question2": "How?", "label": 1, "idx": 0}])
    _write_jsonl(clone / "sst2" / "validation.jsonl", [{"sentence": "fine", "label": 1, "idx": 0}])
    (clone / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: qqp\n  data_files:\n  - split: validation\n    path: qqp/validation.jsonl\n"
        "- config_name: sst2\n  data_files:\n  - split: validation\n    path: sst2/validation.jsonl\n---\n")
    assert load_paper4("test", sources={"paraphrase": str(clone)}, tasks=["paraphrase"]) == [
        {"instruction": QUESTION.format("Why?", "How?"), "output": "yes", "task": "paraphrase"}]
    with pytest.raises(FedrouterError, match=r"^dataset '.*glue' cannot be loaded: Config name is missing\. "
                       r"Please pick one among the available configs: \['qqp', 'sst2'\]$"):
        load_mapped(str(clone), "validation", {"instruction": "sentence", "output": "label"})
    assert load_mapped(str(clone), "validation", {"instruction": "sentence", "output": "label"}, config="sst2") == [
        {"instruction": "fine", "output": "1", "task": "glue"}]


def test_bad_tasks_splits_fields_and_paths_are_one_line_errors(tmp_path):
    with pytest.raises(FedrouterError, match=r"unknown task 'qqp' in data sources; the paper's tasks are paraphrase, "):
        load_paper4("train", sources={"qqp": SOURCES["paraphrase"]})
    with pytest.raises(FedrouterError, match="unknown split 'dev'"):
        load_paper4("dev", sources=SOURCES)
    no_label = _write_jsonl(tmp_path / "qqp.jsonl", [{"question1": "a?", "question2": "b?"}])
    with pytest.raises(FedrouterError) as caught:
        load_paper4("train", sources={"paraphrase": no_label}, tasks=["paraphrase"])
    assert str(caught.value) == f"dataset {no_label!r} (task paraphrase) has no field 'label'; its fields: question1, question2"
    with pytest.raises(FedrouterError, match="local data path .*missing.jsonl' does not exist"):
        load_paper4("train", sources={"headline": str(tmp_path / "missing.jsonl")}, tasks=["headline"])
    all_skipped = _write_jsonl(tmp_path / "giga.jsonl", [{"document": "x", "summary": ""}])
    with pytest.raises(FedrouterError, match="has no usable rows in split 'train'"):
        load_paper4("train", sources={"headline": all_skipped}, tasks=["headline"])


def test_load_mapped_maps_fields_onto_the_schema(tmp_path):
    source = _write_jsonl(tmp_path / "quiz.jsonl", [
        {"prompt": "What is 2 + 2?", "answer": 4, "kind": "math"},
        {"prompt": " Name a colour. ", "answer": "red", "kind": "words"},
        {"prompt": "", "answer": "skipped: empty prompt", "kind": "words"},
        {"prompt": "Capital of France?", "answer": None, "kind": "geo"},
        {"prompt": "Capital of Italy?", "answer": "Rome", "kind": "geo"},
    ])
    assert load_mapped(source, "train", {"instruction": "prompt", "output": "answer", "task": "kind"}) == [
        {"instruction": "What is 2 + 2?", "output": "4", "task": "math"},
        {"instruction": "Name a colour.", "output": "red", "task": "words"},
        {"instruction": "Capital of Italy?", "output": "Rome", "task": "geo"},
    ]
    # Without a task field, every row gets the source's name (or the task given).
    assert load_mapped(source, "train", {"instruction": "prompt", "output": "answer"}, limit=2) == [
        {"instruction": "What is 2 + 2?", "output": "4", "task": "quiz"},
        {"instruction": "Name a colour.", "output": "red", "task": "quiz"},
    ]
    assert load_mapped(source, "train", {"instruction": "prompt", "output": "kind"}, limit=1, task="trivia") == [
        {"instruction": "What is 2 + 2?", "output": "math", "task": "trivia"}]
    # Any of the paper's files reads the same way.
    assert load_mapped(SOURCES["headline"], "test", {"instruction": "document", "output": "summary"}, limit=1) == [
        {"instruction": HEADLINE[0]["instruction"].split("\n", 1)[1], "output": HEADLINE[0]["output"], "task": "gigaword"}]


def test_load_mapped_names_a_missing_field_or_a_value_that_is_not_text(tmp_path):
    source = _write_jsonl(tmp_path / "tags.jsonl", [{"text": "a", "tags": ["x", "y"]}])
    with pytest.raises(FedrouterError) as caught:
        load_mapped(source, "train", {"instruction": "text", "output": "label"})
    assert str(caught.value) == f"dataset {source!r} has no field 'label'; its fields: text, tags"
    with pytest.raises(FedrouterError, match=r"field 'tags' holds list values, not text"):
        load_mapped(source, "train", {"instruction": "text", "output": "tags"})
    with pytest.raises(FedrouterError, match="needs keys instruction and output"):
        load_mapped(source, "train", {"instruction": "text"})


@pytest.mark.parametrize("load, dataset, hint", [
    (lambda: load_paper4("train", sources={"summarize": NOT_A_DATASET}, tasks=["summarize"]), NOT_A_DATASET,
     "give a local copy with data_sources.summarize=PATH"),
    (lambda: load_paper4("train", per_task=2), "nyu-mll/glue", "give a local copy with data_sources.paraphrase=PATH"),
    (lambda: load_paper4("test", tasks=["headline"]), "Harvard/gigaword", "data_sources.headline=PATH"),
    (lambda: load_mapped(NOT_A_DATASET, "train", {"instruction": "a", "output": "b"}), NOT_A_DATASET,
     "give a local file or folder as the source"),
], ids=["paper4-source", "paper4-hub", "paper4-gigaword", "mapped"])
def test_a_dataset_neither_cached_nor_reachable_is_one_clear_error(load, dataset, hint):
    with pytest.raises(FedrouterError) as caught:
        load()
    message = str(caught.value)
    assert message.startswith(f"dataset {dataset!r} is not in the local Hugging Face cache and the hub cannot be reached "
                              "(HF_HUB_OFFLINE=1): download it where the hub is reachable, or ")
    assert message.endswith(hint) and "\n" not in message


def test_without_the_datasets_package_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    for load in (lambda: load_paper4("train", sources=SOURCES), lambda: load_mapped(NOT_A_DATASET, "train", {"instruction": "a", "output": "b"})):
        with pytest.raises(FedrouterError, match=r"^the Hugging Face datasets package is needed: pip install datasets$"):
            load()


@pytest.mark.parametrize("raised, message", [
    (RuntimeError("Dataset scripts are no longer supported, but found gigaword.py"),
     "dataset 'Harvard/gigaword' is a loading-script dataset, which datasets {version} cannot read: "
     "give a local copy with data_sources.headline=PATH (its columns as JSON lines or parquet)"),
    (ConnectionError("Couldn't reach 'Harvard/gigaword' on the Hub (LocalEntryNotFoundError)"),
     "dataset 'Harvard/gigaword' is not in the local Hugging Face cache and the hub cannot be reached (no connection): "
     "download it where the hub is reachable, or give a local copy with data_sources.headline=PATH"),
    (datasets.exceptions.DatasetNotFoundError("Dataset 'Harvard/gigaword' is a gated dataset on the Hub.\nMore."),
     "dataset 'Harvard/gigaword' cannot be loaded: Dataset 'Harvard/gigaword' is a gated dataset on the Hub. More."),
], ids=["loading-script", "no-connection", "not-found"])
def test_the_hubs_other_refusals_are_one_line_too(monkeypatch, raised, message):
    def refuse(*args, **kwargs):
        raise raised

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # (the connection guard still holds)
    with pytest.raises(FedrouterError) as caught:
        load_paper4("train", tasks=["headline"])
    assert str(caught.value) == message.format(version=datasets.__version__)


def test_a_run_config_with_hf_paper4_builds_the_federated_split_from_local_copies():
    # `fedrouter run --data hf:paper4 --set data_sources.<task>=PATH`: the same federated split as any data
    from fedrouter.config import load_config
    from fedrouter.world import build_data

    sources = {"paraphrase": "qqp.jsonl", "data_to_text": "webnlg.jsonl", "summarize": "samsum.jsonl",
               "headline": "gigaword.jsonl"}
    cfg = load_config(None, {"data": "hf:paper4", "data_sources": {t: str(FIXTURES / f) for t, f in sources.items()},
                             "scenario": "single", "n_clients": 4, "train_per_client": 2, "test_per_client": 1,
                             "general_test_per_task": 1})
    data = build_data(cfg)
    assert data.tasks == sorted(PAPER4)
    assert [c.tasks for c in data.clients] == [[t] for t in sorted(PAPER4)]
    for client in data.clients:
        assert len(client.train) == 2 and {e["task"] for e in client.train} == set(client.tasks)
        assert all(e["instruction"] and e["output"] for e in client.train + client.test)


def test_hf_data_keeps_its_task_column_and_honours_task_field_none(tmp_path):
    # issue 32: the dataset's own `task` column was dropped for a constant task, and --task-field none was ignored
    from fedrouter.config import load_config
    from fedrouter.core.data import UNLABELLED
    from fedrouter.world import build_data

    rows = [{"instruction": f"q{i} {kind}", "output": f"a{i}", "task": kind} for i in range(8) for kind in ("math", "geo")]
    source = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    sizes = {"n_clients": 2, "train_per_client": 4, "test_per_client": 2, "general_test_per_task": 1}
    labelled = build_data(load_config(None, {"data": f"hf:{source}", "scenario": "single", **sizes}))
    assert labelled.tasks == ["geo", "math"]
    assert all({e["task"] for e in c.train} == set(c.tasks) for c in labelled.clients)
    unlabelled = build_data(load_config(None, {"data": f"hf:{source}", "task_field": "none", "scenario": "all", **sizes}))
    assert unlabelled.tasks == [UNLABELLED]
    assert {e["task"] for c in unlabelled.clients for e in c.train + c.test} == {UNLABELLED}
