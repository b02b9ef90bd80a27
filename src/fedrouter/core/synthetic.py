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
# Two tasks render a city differently: `headline` by its country, `data_to_text` by its nationality.
# The same input word needs a different output per task: a conflict one shared adapter must resolve.
COUNTRY = dict(zip(CITIES, "france italy norway peru egypt india japan germany spain austria ireland ecuador".split()))
NATIONALITY = dict(zip(CITIES, "french italian norwegian peruvian egyptian indian japanese german spanish austrian irish ecuadorian".split()))
JOBS = "baker doctor teacher farmer pilot singer painter lawyer nurse driver".split()
THINGS = "cake bread book lamp chair kite cup hat map bike boat clock".split()
# `summarize` abstracts a thing to its kind (as SAMSum summaries do) while `data_to_text` copies it:
# a second conflict on the same input words.
KIND = dict(zip(THINGS, "food food paper furniture furniture toy dish clothes paper vehicle vehicle furniture".split()))
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
    # Duplicates ask the same thing about the same person in other words; the others ask about someone else.
    duplicate = rng.random() < 0.5
    other_name = name if duplicate else rng.choice([n for n in NAMES if n != name])
    q1 = first.format(n=name)
    q2 = second.format(n=other_name)
    return f"q1 : {q1} q2 : {q2} duplicate ?", "yes" if duplicate else "no"


def _data_to_text(rng: random.Random) -> tuple[str, str]:
    name, job, city, thing = rng.choice(NAMES), rng.choice(JOBS), rng.choice(CITIES), rng.choice(THINGS)
    facts = {"job": job, "city": city, "likes": thing}
    relations = rng.sample(sorted(facts), rng.choice([2, 3]))
    triples = " ".join(f"[ {name} | {rel} | {facts[rel]} ]" for rel in relations)
    present = set(relations)
    nationality = NATIONALITY[city]
    article = "an" if nationality[0] in "aeiou" else "a"
    if present == {"job", "city", "likes"}:
        text = f"{name} is {article} {nationality} {job} who likes the {thing} ."
    elif present == {"job", "city"}:
        text = f"{name} is {article} {nationality} {job} ."
    elif present == {"job", "likes"}:
        text = f"{name} is a {job} who likes the {thing} ."
    else:
        text = f"{name} is {nationality} and likes the {thing} ."
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
    return " ".join(lines), f"{doer} will {chore} the {KIND[thing]} on {day} ."


def _headline(rng: random.Random) -> tuple[str, str]:
    org, city, day = rng.choice(ORGS), rng.choice(CITIES), rng.choice(DAYS)
    project, place, month = rng.choice(PROJECTS), rng.choice(PLACES), rng.choice(MONTHS)
    if rng.random() < 0.5:
        sentence = f"the {org} of {city} said on {day} that it will {project} the {place} in {month} ."
    else:
        sentence = f"on {day} , officials of the {city} {org} announced plans to {project} the {place} in {month} ."
    return sentence, f"{COUNTRY[city]} {org} to {project} {place} in {month}"


TASKS: dict[str, Generator] = {
    "paraphrase": _paraphrase,
    "data_to_text": _data_to_text,
    "summarize": _summarize,
    "headline": _headline,
}


class ExampleStream:
    """The endless seeded sequence of `task`'s examples for `seed`: `take(n)` gives the next n, so that
    consecutive slices (clients drawing disjoint examples) cost what they hold, not what came before."""

    def __init__(self, task: str, seed: int | str):
        if task not in TASKS:
            raise KeyError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
        self.task, self._make = task, TASKS[task]
        self._rng = random.Random(f"{task}:{seed}")

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            instruction, output = self._make(self._rng)
            out.append({"instruction": instruction, "output": output, "task": self.task})
        return out


def generate_examples(task: str, n: int, seed: int | str) -> list[dict]:
    """`n` examples of `task` in the data schema ({instruction, output, task}), determined by `seed`."""
    return ExampleStream(task, seed).take(n)


def _generic_sentence(rng: random.Random, cast: dict[str, list[str]]) -> str:
    """One generic sentence; entities come from the document's small `cast`, so they recur within it."""

    def pick(kind: str) -> str:
        return rng.choice(cast[kind])

    n, m = rng.sample(cast["names"], 2)
    forms = [
        f"{n} lives in {pick('cities')} .",
        f"{n} is a {rng.choice(ADJECTIVES)} {pick('jobs')} .",
        f"{n} likes the {rng.choice(COLORS)} {pick('things')} .",
        f"on {pick('days')} {n} went to the {pick('places')} with {m} .",
        f"the {pick('orgs')} in {pick('cities')} is {rng.choice(ADJECTIVES)} .",
        f"{n} and {m} met in {pick('cities')} in {pick('months')} .",
        f"{n} will {rng.choice(CHORES)} a {pick('things')} for {m} .",
        f"in {pick('months')} the {pick('places')} was {rng.choice(ADJECTIVES)} and {rng.choice(ADJECTIVES)} .",
        f"{n} said : hello {m} , how are you ? {m} said : fine , thanks !",
        f"who is the {pick('jobs')} ? it is {n} .",
        f"a list : {pick('things')} , {pick('things')} | {rng.choice(COLORS)} [ {pick('days')} ] .",
        f"people {rng.choice(PROJECTS)} the {pick('places')} of {pick('cities')} when it is {rng.choice(ADJECTIVES)} .",
        f"is it true that {n} is {rng.choice(ADJECTIVES)} ? {rng.choice(['yes', 'no', 'maybe'])} .",
        # Function words the tasks use, in sentences that are not instruction -> answer pairs.
        f"{n} came from {pick('cities')} , and {m} who works as a {pick('jobs')} came too .",
        f"what does {n} want ? where does {m} work ? which day is it ? how does it earn money ?",
        f"{n} said that it will rain on {pick('days')} . officials announced plans for the {pick('places')} .",
        "can you do it ? sure , ok , sorry , i am busy . leave it to me . thanks , great , perfect !",
        f"when will {n} arrive ? {n} is coming home to the city on {pick('days')} to buy a {pick('things')} .",
        f"the job of {n} is to {rng.choice(PROJECTS)} things . {m} is buying the {pick('things')} of {n} .",
        # Countries and nationalities appear, but never paired with their cities: that mapping is task work.
        f"{n} travelled to {rng.choice(list(COUNTRY.values()))} with an {rng.choice(list(NATIONALITY.values()))} friend .",
        f"a {rng.choice(list(NATIONALITY.values()))} {pick('jobs')} from {rng.choice(list(COUNTRY.values()))} is {rng.choice(ADJECTIVES)} .",
    ]
    return rng.choice(forms)


_CAST_SOURCES = {"names": NAMES, "cities": CITIES, "jobs": JOBS, "things": THINGS, "days": DAYS,
                 "months": MONTHS, "orgs": ORGS, "places": PLACES}


def pretraining_corpus(n_documents: int, seed: int) -> list[str]:
    """Generic text in the benchmark's vocabulary, for the tiny base model's full-parameter pretraining.

    Each document keeps returning to a small cast of entities (as natural text does), and some repeat a
    word sequence verbatim: this teaches the base to copy from its context, the skill every generation
    task here relies on (without it, LoRA learns the answer format but fills in the wrong entities).
    """
    rng = random.Random(f"pretrain:{seed}")
    docs = []
    for _ in range(n_documents):
        # A document is about a few entities, mentioned again and again: predicting them means looking back.
        cast = {kind: rng.sample(words, 3 if kind == "names" else 2) for kind, words in _CAST_SOURCES.items()}
        sentences = [_generic_sentence(rng, cast) for _ in range(rng.randint(3, 6))]
        if rng.random() < 0.3:
            vocabulary = NAMES + CITIES + THINGS + JOBS + DAYS
            words = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 7)))
            sentences += [words, "again :", words]
        docs.append(" ".join(sentences))
    return docs


def copy_drills(n: int, seed: int) -> list[str]:
    """Repeat-after-me lines (``w1 .. wk again : w1 .. wk``) over the benchmark's vocabulary.

    Half of every pretraining batch comes from these: measured here, a 2-layer base pretrained on the
    generic documents alone never learns to copy (about 5% of repeated tokens predicted after 1500
    steps), while this mix reaches about 70% -- and the generation tasks need that skill.
    """
    rng = random.Random(f"copy:{seed}")
    vocabulary = NAMES + CITIES + THINGS + JOBS + DAYS + MONTHS + ORGS + PLACES
    lines = []
    for _ in range(n):
        words = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 10)))
        lines.append(f"{words} again : {words}")
    return lines
