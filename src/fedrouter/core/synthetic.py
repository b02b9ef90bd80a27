"""The embedded multi-task benchmark: four seeded instruction tasks, no download.

The tasks mirror the FedRouter paper's mix (QQP, WebNLG, SAMSum, Gigaword) in character while staying
short enough (about 40 tokens) to train on a laptop CPU:

- ``paraphrase``   two questions, "are they the same?"      -> ``yes`` / ``no``        (classification)
- ``data_to_text`` bracketed (subject | relation | object)  -> one sentence           (structure to text)
- ``summarize``    a short dialogue between speakers        -> who will do what, when (dialogue compression)
- ``headline``     a news sentence                          -> a headline             (compressive rewrite)

Every task differs from the others both in input format and in what it asks, so an embedding router can
tell them apart and an adapter trained on one task is of little use on another. All tasks draw on one
shared vocabulary (below), which is also the vocabulary of the generic pretraining text of the tiny base
model (`pretraining_corpus`): that text never contains an instruction -> answer pair.
"""

from __future__ import annotations

import random
from typing import Callable

NAMES = "anna ben carla david emma felix grace hugo iris jack kate leo mia noah olga paul".split()
CITIES = "paris rome oslo lima cairo delhi tokyo berlin madrid vienna dublin quito".split()
JOBS = "baker doctor teacher farmer pilot singer painter lawyer nurse driver".split()
THINGS = "cake bread book lamp chair kite cup hat map bike boat clock".split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = "march april may june july august".split()
ORGS = "council team club company school bank museum hospital".split()
PLACES = "bridge park library station market stadium theatre tower".split()
COLORS = "red blue green black white yellow".split()
ADJECTIVES = "big small old new quiet busy happy tired".split()
CHORES = "bring fix paint sell buy clean".split()  # summarize: what someone will do with a thing
PROJECTS = "open build close sell repair paint".split()  # headline: what an organisation will do

Generator = Callable[[random.Random], tuple[str, str]]


def _paraphrase(rng: random.Random) -> tuple[str, str]:
    # Several phrasings per (attribute, person); a duplicate pair shares both, a non-duplicate changes one.
    phrasings = {
        "city": ["where does {n} live ?", "in which city does {n} live ?", "what city is home to {n} ?"],
        "job": ["what does {n} do for work ?", "what is the job of {n} ?", "how does {n} earn money ?"],
        "thing": ["what does {n} want to buy ?", "which thing is {n} buying ?", "what will {n} buy ?"],
        "day": ["when will {n} arrive ?", "on which day does {n} come ?", "what day is {n} coming ?"],
    }
    attr = rng.choice(sorted(phrasings))
    name = rng.choice(NAMES)
    first, second = rng.sample(phrasings[attr], 2)
    duplicate = rng.random() < 0.5
    other_name, other_attr = name, attr
    if not duplicate:
        if rng.random() < 0.5:
            other_name = rng.choice([n for n in NAMES if n != name])
        else:
            other_attr = rng.choice([a for a in sorted(phrasings) if a != attr])
            second = rng.choice(phrasings[other_attr])
    q1 = first.format(n=name)
    q2 = second.format(n=other_name)
    return f"q1 : {q1} q2 : {q2} duplicate ?", "yes" if duplicate else "no"


def _data_to_text(rng: random.Random) -> tuple[str, str]:
    name, job, city, thing = rng.choice(NAMES), rng.choice(JOBS), rng.choice(CITIES), rng.choice(THINGS)
    facts = {"job": job, "city": city, "likes": thing}
    relations = rng.sample(sorted(facts), rng.choice([2, 3]))
    triples = " ".join(f"[ {name} | {rel} | {facts[rel]} ]" for rel in relations)
    present = set(relations)
    if present == {"job", "city", "likes"}:
        text = f"{name} is a {job} from {city} who likes the {thing} ."
    elif present == {"job", "city"}:
        text = f"{name} is a {job} from {city} ."
    elif present == {"job", "likes"}:
        text = f"{name} is a {job} who likes the {thing} ."
    else:
        text = f"{name} lives in {city} and likes the {thing} ."
    return triples, text


def _summarize(rng: random.Random) -> tuple[str, str]:
    asker, asked, helper = rng.sample(NAMES, 3)
    chore, thing, day = rng.choice(CHORES), rng.choice(THINGS), rng.choice(DAYS)
    lines = [f"{asker} : can you {chore} the {thing} on {day} ?"]
    if rng.random() < 0.5:
        lines.append(f"{asked} : {rng.choice(['sure', 'ok', 'yes'])} , i will do it .")
        doer = asked
    else:
        lines.append(f"{asked} : sorry , i am busy .")
        lines.append(f"{helper} : {rng.choice(['i can do it', 'leave it to me'])} .")
        doer = helper
    lines.append(f"{asker} : {rng.choice(['thanks', 'great', 'perfect'])} !")
    return " ".join(lines), f"{doer} will {chore} the {thing} on {day} ."


def _headline(rng: random.Random) -> tuple[str, str]:
    org, city, day = rng.choice(ORGS), rng.choice(CITIES), rng.choice(DAYS)
    project, place, month = rng.choice(PROJECTS), rng.choice(PLACES), rng.choice(MONTHS)
    if rng.random() < 0.5:
        sentence = f"the {org} of {city} said on {day} that it will {project} the {place} in {month} ."
    else:
        sentence = f"on {day} , officials of the {city} {org} announced plans to {project} the {place} in {month} ."
    return sentence, f"{city} {org} to {project} {place} in {month}"


TASKS: dict[str, Generator] = {
    "paraphrase": _paraphrase,
    "data_to_text": _data_to_text,
    "summarize": _summarize,
    "headline": _headline,
}


def generate_examples(task: str, n: int, seed: int | str) -> list[dict]:
    """`n` examples of `task` in the data schema ({instruction, output, task}), determined by `seed`."""
    if task not in TASKS:
        raise KeyError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    out = []
    for _ in range(n):
        instruction, output = TASKS[task](rng)
        out.append({"instruction": instruction, "output": output, "task": task})
    return out


def _generic_sentence(rng: random.Random) -> str:
    n, m = rng.sample(NAMES, 2)
    forms = [
        f"{n} lives in {rng.choice(CITIES)} .",
        f"{n} is a {rng.choice(ADJECTIVES)} {rng.choice(JOBS)} .",
        f"{n} likes the {rng.choice(COLORS)} {rng.choice(THINGS)} .",
        f"on {rng.choice(DAYS)} {n} went to the {rng.choice(PLACES)} with {m} .",
        f"the {rng.choice(ORGS)} in {rng.choice(CITIES)} is {rng.choice(ADJECTIVES)} .",
        f"{n} and {m} met in {rng.choice(CITIES)} in {rng.choice(MONTHS)} .",
        f"{n} will {rng.choice(CHORES)} a {rng.choice(THINGS)} for {m} .",
        f"in {rng.choice(MONTHS)} the {rng.choice(PLACES)} was {rng.choice(ADJECTIVES)} and {rng.choice(ADJECTIVES)} .",
        f"{n} said : hello {m} , how are you ? {m} said : fine , thanks !",
        f"who is the {rng.choice(JOBS)} ? it is {n} .",
        f"a list : {rng.choice(THINGS)} , {rng.choice(THINGS)} | {rng.choice(COLORS)} [ {rng.choice(DAYS)} ] .",
        f"people {rng.choice(PROJECTS)} the {rng.choice(PLACES)} of {rng.choice(CITIES)} when it is {rng.choice(ADJECTIVES)} .",
        f"is it true that {n} is {rng.choice(ADJECTIVES)} ? {rng.choice(['yes', 'no', 'maybe'])} .",
        # Function words the tasks use, in sentences that are not instruction -> answer pairs.
        f"{n} came from {rng.choice(CITIES)} , and {m} who works as a {rng.choice(JOBS)} came too .",
        f"what does {n} want ? where does {m} work ? which day is it ? how does it earn money ?",
        f"{n} said that it will rain on {rng.choice(DAYS)} . officials announced plans for the {rng.choice(PLACES)} .",
        f"can you do it ? sure , ok , sorry , i am busy . leave it to me . thanks , great , perfect !",
        f"when will {n} arrive ? {n} is coming home to the city on {rng.choice(DAYS)} to buy a {rng.choice(THINGS)} .",
        f"the job of {n} is to {rng.choice(PROJECTS)} things . {m} is buying the {rng.choice(THINGS)} of {n} .",
    ]
    return rng.choice(forms)


def pretraining_corpus(n_documents: int, seed: int) -> list[str]:
    """Generic text in the benchmark's vocabulary, for the tiny base model's full-parameter pretraining.

    Documents are random sentences; some repeat an earlier sentence or a word sequence verbatim, which
    teaches the base to copy from its context -- the skill every generation task here relies on.
    """
    rng = random.Random(f"pretrain:{seed}")
    docs = []
    for _ in range(n_documents):
        sentences = [_generic_sentence(rng) for _ in range(rng.randint(2, 5))]
        roll = rng.random()
        if roll < 0.3:
            sentences.append(rng.choice(sentences))
        elif roll < 0.5:
            vocabulary = NAMES + CITIES + THINGS + JOBS + DAYS
            words = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 7)))
            sentences += [words, "again :", words]
        docs.append(" ".join(sentences))
    return docs
