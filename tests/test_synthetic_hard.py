"""The hard embedded benchmark (data: "synthetic-hard"): templates per task, two task pairs that share an input
format, answers that follow from the input, its federated split; and the default benchmark left as it was."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict

import pytest

from fedrouter.core import synthetic
from fedrouter.core.data import build_federated_data
from fedrouter.core.synthetic import CITIES, COUNTRY, JOBS, KIND, NAMES, NATIONALITY, THINGS, ExampleStream

HARD_TASKS = ["paraphrase", "question_subject", "data_to_text", "fact_lookup", "summarize", "headline"]
PAIRS = [("paraphrase", "question_subject"), ("data_to_text", "fact_lookup")]


def _drawn(task, n=400, seed=0):
    return ExampleStream(task, seed, variant="hard").drawn(n)


def test_hard_tasks_and_the_pairs_sharing_a_format():
    assert list(synthetic.TASKS_HARD) == HARD_TASKS
    assert [tuple(p) for p in synthetic.SHARED_FORMATS] == PAIRS
    assert set(synthetic.TASKS) < set(synthetic.TASKS_HARD)  # the four default tasks stay, two join them


@pytest.mark.parametrize("task", HARD_TASKS)
def test_each_task_is_written_in_3_to_5_templates_drawn_at_random(task):
    drawn = _drawn(task)
    templates = Counter(d.template for d in drawn)
    assert 3 <= len(templates) <= 5
    assert len(templates) == len(synthetic.HARD_TEMPLATES[task])  # every template shows up in 400 draws
    assert min(templates.values()) > 400 / len(templates) / 2  # and none is rare: a uniform draw
    # the templates differ in layout, not only in wording
    assert len({d.layout for d in drawn}) >= 3
    # outside fact_lookup's slots, the ask (the instruction without its input) is one string per template
    if task != "fact_lookup":
        asks = defaultdict(set)
        for d in drawn:
            assert d.body in d.instruction
            asks[d.template].add(d.instruction.replace(d.body, "{input}"))
        assert all(len(a) == 1 for a in asks.values())
        assert len({a.pop() for a in asks.values()}) == len(templates)


@pytest.mark.parametrize("task", HARD_TASKS)
def test_clients_get_examples_without_the_template(task):
    examples = synthetic.generate_examples(task, 20, seed=1, variant="hard")
    assert all(set(ex) == {"instruction", "output", "task"} and ex["task"] == task for ex in examples)
    assert [ex["instruction"] for ex in examples] == [d.instruction for d in _drawn(task, 20, seed=1)]
    assert all(len(ex["instruction"].split()) < 60 for ex in synthetic.generate_examples(task, 300, seed=2, variant="hard"))


_CONTENT = set(NAMES + CITIES + JOBS + THINGS + ["job", "city", "likes"])
_CONTENT |= {w for forms in synthetic._QUESTIONS.values() for form in forms for w in form.split() if w not in ("?", "{n}")}


def _skeleton(body: str) -> str:
    """The layout of an input: its content words (entities, relations, question words) masked to one `_` a run."""
    words = ["_" if w in _CONTENT else w for w in body.split()]
    return " ".join(w for i, w in enumerate(words) if w != "_" or i == 0 or words[i - 1] != "_")


@pytest.mark.parametrize(("task", "partner"), PAIRS)
def test_format_sharing_pairs_lay_out_their_input_alike_and_differ_only_in_the_ask(task, partner):
    a, b = _drawn(task, 600), _drawn(partner, 600)
    assert {d.layout for d in a} == {d.layout for d in b}
    assert len({d.layout for d in a}) >= 3
    # black box: with the content masked, the inputs of the two tasks have the same skeletons
    skeletons_a, skeletons_b = {_skeleton(d.body) for d in a}, {_skeleton(d.body) for d in b}
    assert skeletons_a == skeletons_b
    assert len(skeletons_a) >= 3
    # while the asks do not overlap
    asks_a = {_skeleton(d.instruction.replace(d.body, " {input} ")) for d in a}
    asks_b = {_skeleton(d.instruction.replace(d.body, " {input} ")) for d in b}
    assert not asks_a & asks_b


def test_format_sharing_pairs_draw_their_inputs_from_the_same_distribution():
    # the same rng state gives the same input in both tasks of a pair: only the ask and the answer differ
    import random

    for task, partner in PAIRS:
        compared = 0
        for seed in range(40):
            x, y = synthetic.TASKS_HARD[task](random.Random(seed)), synthetic.TASKS_HARD[partner](random.Random(seed))
            if x.layout == y.layout:
                assert x.body == y.body
                compared += 1
        assert compared >= 5


def _questions(d):
    """The two questions of a two-question input, whatever its layout."""
    pattern = {"q_tagged": r"q1 : (.+\?) q2 : (.+\?)", "q_words": r"question one : (.+\?) question two : (.+\?)",
               "q_quoted": r'" (.+\?) " and " (.+\?) "', "q_numbered": r"1 \) (.+\?) 2 \) (.+\?)"}[d.layout]
    return re.fullmatch(pattern, d.body).groups()


def _asked_relation(d):
    """The relation a fact_lookup example asks for: the one field word in its ask (the instruction less its input)."""
    ask = f" {d.instruction.replace(d.body, ' ')} "
    (relation,) = [rel for rel, word in synthetic.FIELD.items() if f" {word} " in ask]
    return relation


def _name_in(question):
    (name,) = [w for w in question.split() if w in NAMES]
    return name


def _facts(d):
    """(subject, {relation: object}) of a facts input, whatever its layout."""
    if d.layout == "f_record":
        subject, *pairs = d.body.split(" , ")
        return subject.removeprefix("subject : "), dict(p.split(" : ") for p in pairs)
    pattern = {"f_brackets": r"\[ (\w+) \| (\w+) \| (\w+) \]", "f_parens": r"\( (\w+) , (\w+) , (\w+) \)",
               "f_dashes": r"(\w+) - (\w+) - (\w+)"}[d.layout]
    triples = re.findall(pattern, d.body)
    assert len(triples) in (2, 3) and len({s for s, _, _ in triples}) == 1
    return triples[0][0], {r: o for _, r, o in triples}


def test_answers_follow_from_the_input():
    for d in _drawn("paraphrase", 200):
        q1, q2 = _questions(d)
        assert d.output == ("yes" if _name_in(q1) == _name_in(q2) else "no")
    for d in _drawn("question_subject", 200):
        assert d.output == _name_in(_questions(d)[0])
    for d in _drawn("fact_lookup", 300):
        subject, facts = _facts(d)
        assert d.output == facts[_asked_relation(d)]
        assert d.output in CITIES + JOBS + THINGS  # a city is looked up, not turned into a nationality
    for d in _drawn("data_to_text", 300):
        subject, facts = _facts(d)
        assert d.output.startswith(f"{subject} is ")
        if "city" in facts:
            assert NATIONALITY[facts["city"]] in d.output.split()
        for rel in ("job", "likes"):
            if rel in facts:
                assert facts[rel] in d.output.split()
    for d in _drawn("headline", 100):
        (city,) = [w for w in d.body.split() if w in CITIES]
        assert d.output.startswith(COUNTRY[city] + " ")
    for d in _drawn("summarize", 100):
        (thing,) = [w for w in d.body.split() if w in THINGS]
        assert f" the {KIND[thing]} on " in d.output


def test_a_few_answers_exactly():
    assert synthetic.fact_sentence("anna", {"job": "pilot", "city": "oslo"}) == "anna is a norwegian pilot ."
    assert synthetic.fact_sentence("ben", {"city": "oslo", "likes": "kite"}) == "ben is norwegian and likes the kite ."
    assert synthetic.fact_sentence("iris", {"city": "oslo", "job": "baker", "likes": "cup"}) == \
        "iris is a norwegian baker who likes the cup ."
    assert synthetic.fact_sentence("leo", {"job": "nurse", "likes": "map"}) == "leo is a nurse who likes the map ."
    assert synthetic.fact_sentence("mia", {"city": "vienna", "job": "nurse"}) == "mia is an austrian nurse ."
    # the first example of each hard task for seed 0 (a change here changes every hard run)
    first = {t: synthetic.generate_examples(t, 1, seed=0, variant="hard")[0] for t in HARD_TASKS}
    assert first["question_subject"] == {
        "instruction": 'in " on which day does leo come ? " and " when will felix arrive ? " , who is the first '
                       "question about ? answer with a name", "output": "leo", "task": "question_subject"}
    assert first["fact_lookup"] == {
        "instruction": "carla has which job ? [ carla | job | teacher ] [ carla | likes | hat ] [ carla | city | delhi ]",
        "output": "teacher", "task": "fact_lookup"}
    assert first["paraphrase"]["output"] == "yes" and first["data_to_text"]["output"] == "hugo is japanese and likes the cup ."


def test_unknown_variant_or_task_is_refused():
    with pytest.raises(ValueError, match="variant"):
        ExampleStream("paraphrase", 0, variant="harder")
    with pytest.raises(KeyError, match="fact_lookup"):
        ExampleStream("fact_lookup", 0)  # a hard-only task is not in the default benchmark


# ---------------------------------------------------------------- federated split


def _hard(**kw):
    args = dict(source="synthetic-hard", scenario="all", n_clients=3, train_per_client=24, test_per_client=12,
                general_test_per_task=4, seed=0)
    args.update(kw)
    return build_federated_data(**args)


def test_every_client_gets_all_six_tasks_in_scenario_all():
    data = _hard()
    assert data.tasks == HARD_TASKS
    for c in data.clients:
        assert c.tasks == HARD_TASKS
        assert Counter(ex["task"] for ex in c.train) == {t: 4 for t in HARD_TASKS}
        assert Counter(ex["task"] for ex in c.test) == {t: 2 for t in HARD_TASKS}
        assert all(set(ex) == {"instruction", "output", "task"} for ex in c.train + c.test)
    assert Counter(ex["task"] for ex in data.general_test) == {t: 4 for t in HARD_TASKS}
    # the examples are the hard ones (templated asks), not the default benchmark's
    default_ask = {ex["instruction"] for ex in synthetic.generate_examples("data_to_text", 50, seed="0:train")}
    assert not {ex["instruction"] for c in data.clients for ex in c.train} & default_ask


def test_hard_split_is_deterministic_by_seed_and_disjoint_across_clients():
    a, b, c = _hard(seed=5), _hard(seed=5), _hard(seed=6)
    assert [(x.tasks, x.train, x.test) for x in a.clients] == [(x.tasks, x.train, x.test) for x in b.clients]
    assert a.general_test == b.general_test
    assert [x.train for x in a.clients] != [x.train for x in c.clients]
    big = _hard(n_clients=2, train_per_client=300, test_per_client=60)
    for task in ("data_to_text", "fact_lookup", "summarize", "headline"):  # large example spaces: no chance repeats
        seen = [{(e["instruction"], e["output"]) for e in cl.train if e["task"] == task} for cl in big.clients]
        assert not seen[0] & seen[1]


def test_hard_split_takes_a_task_subset_and_the_single_scenario():
    data = _hard(tasks=["fact_lookup", "data_to_text"], scenario="single", n_clients=4)
    assert data.tasks == ["data_to_text", "fact_lookup"]
    assert [c.tasks for c in data.clients] == [["data_to_text"], ["fact_lookup"]] * 2


# ---------------------------------------------------------------- the default benchmark, unchanged

# The first three examples of each default task for seed 0, as they were before the hard variant was added.
DEFAULT_SEED0 = [
    ("q1 : what does mia want to buy ? q2 : which thing is jack buying ? duplicate ?", "no", "paraphrase"),
    ("q1 : what day is david coming ? q2 : when will david arrive ? duplicate ?", "yes", "paraphrase"),
    ("q1 : what day is kate coming ? q2 : when will david arrive ? duplicate ?", "no", "paraphrase"),
    ("[ david | city | madrid ] [ david | job | painter ] [ david | likes | clock ]",
     "david is a spanish painter who likes the clock .", "data_to_text"),
    ("[ grace | job | teacher ] [ grace | likes | bread ]", "grace is a teacher who likes the bread .", "data_to_text"),
    ("[ hugo | job | painter ] [ hugo | city | paris ]", "hugo is a french painter .", "data_to_text"),
    ("kate : can you fix the lamp on saturday ? carla : yes , i will do it . kate : perfect !",
     "carla will fix the furniture on saturday .", "summarize"),
    ("ben : can you paint the bread on wednesday ? olga : sorry , i am busy . leo : leave it to me . ben : thanks !",
     "leo will paint the food on wednesday .", "summarize"),
    ("leo : can you bring the book on friday ? hugo : sorry , i am busy . carla : i can do it . leo : thanks !",
     "carla will bring the paper on friday .", "summarize"),
    ("the museum of berlin said on wednesday that it will close the station in august .",
     "germany museum to close station in august", "headline"),
    ("on monday , officials of the quito bank announced plans to repair the stadium in march .",
     "ecuador bank to repair stadium in march", "headline"),
    ("the company of delhi said on friday that it will close the bridge in june .",
     "india company to close bridge in june", "headline"),
]
# digests taken before the hard variant was added: 500 examples per default task (seed 1), and a dual split
DEFAULT_STREAMS_SHA = "802d025baf22a15be642cfb0ce0e0e16daea210c6d3dd12ede246e4db5a4c431"
DEFAULT_SPLIT_SHA = "58abbbaaa0a043525e3db77c127a8e558b51f487265ec7225e4ef9f107653ea4"


def test_default_benchmark_is_unchanged():
    assert list(synthetic.TASKS) == ["paraphrase", "data_to_text", "summarize", "headline"]
    got = [(e["instruction"], e["output"], e["task"]) for t in synthetic.TASKS for e in synthetic.generate_examples(t, 3, seed=0)]
    assert got == DEFAULT_SEED0
    streams = json.dumps([synthetic.generate_examples(t, 500, seed=1) for t in synthetic.TASKS])
    assert hashlib.sha256(streams.encode()).hexdigest() == DEFAULT_STREAMS_SHA
    fd = build_federated_data("synthetic", "dual", 8, 40, 10, 5, seed=3)
    split = json.dumps([[c.tasks, c.train, c.test] for c in fd.clients] + [fd.general_test], sort_keys=True)
    assert hashlib.sha256(split.encode()).hexdigest() == DEFAULT_SPLIT_SHA
