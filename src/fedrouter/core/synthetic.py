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

The hard variant (``data: "synthetic-hard"``, `TASKS_HARD`) measures task discovery under what real
FLAN-style data does. Every task is written in 3 to 5 templates (`HARD_TEMPLATES`), each an ask wrapped
around one of several input layouts (`LAYOUTS`), drawn at random per example; a task's answer does not
depend on its template. Two new tasks share an input format with an existing one but ask something else:

- ``question_subject`` the two questions of ``paraphrase``         -> the person the first question is about
- ``fact_lookup``      the facts of ``data_to_text``, one asked for -> that fact's object (a city stays a city)

and each uses exactly its partner's layouts, so the input format alone does not tell the task: only the
ask does. The asks add a few instruction words that the tiny base's pretraining text (unchanged) lacks;
its byte-level tokenizer splits them into pieces. The default variant's generators and their random
draws are left as they were.
"""

from __future__ import annotations

import random
from typing import Callable, NamedTuple

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


# ---------------------------------------------------------------- the hard variant (data: "synthetic-hard")


class Drawn(NamedTuple):
    """One drawn example and how it was written; clients get only {instruction, output, task} of it."""

    instruction: str
    output: str
    template: str  # "<task>/<k>": the k-th entry of the task's HARD_TEMPLATES ("<task>/0" in the default variant)
    layout: str  # how the input is laid out (a key of LAYOUTS); tasks that share a format share these
    body: str  # the input as laid out: the instruction is the template's ask wrapped around it


# The two-question input of `paraphrase` and `question_subject`: the draws of `_paraphrase`, kept apart from it.
_QUESTIONS = {
    "city": ["where does {n} live ?", "in which city does {n} live ?", "what city is home to {n} ?"],
    "job": ["what does {n} do for work ?", "what is the job of {n} ?", "how does {n} earn money ?"],
    "thing": ["what does {n} want to buy ?", "which thing is {n} buying ?", "what will {n} buy ?"],
    "day": ["when will {n} arrive ?", "on which day does {n} come ?", "what day is {n} coming ?"],
}
# `fact_lookup` asks for a relation by this word
FIELD = {"job": "job", "city": "city", "likes": "liked thing"}


def _question_pair(rng: random.Random) -> tuple[tuple[str, str], str, bool]:
    """Two questions, the person the first is about, and whether they are duplicates (same as `_paraphrase`)."""
    attr = rng.choice(sorted(_QUESTIONS))
    name = rng.choice(NAMES)
    first, second = rng.sample(_QUESTIONS[attr], 2)
    duplicate = rng.random() < 0.5
    other_name = name if duplicate else rng.choice([n for n in NAMES if n != name])
    return (first.format(n=name), second.format(n=other_name)), name, duplicate


def _facts(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """A subject and 2 or 3 of its (relation, object) facts, in random order (as `_data_to_text` draws them)."""
    name, job, city, thing = rng.choice(NAMES), rng.choice(JOBS), rng.choice(CITIES), rng.choice(THINGS)
    facts = {"job": job, "city": city, "likes": thing}
    return name, [(rel, facts[rel]) for rel in rng.sample(sorted(facts), rng.choice([2, 3]))]


def fact_sentence(name: str, facts: dict[str, str]) -> str:
    """`data_to_text`'s answer for `name`'s facts (relation -> object): a city is rendered by its nationality."""
    job, city, thing = facts.get("job"), facts.get("city"), facts.get("likes")
    nationality = NATIONALITY[city] if city else ""
    article = "an" if nationality[:1] in ("a", "e", "i", "o", "u") else "a"
    if job and city and thing:
        return f"{name} is {article} {nationality} {job} who likes the {thing} ."
    if job and city:
        return f"{name} is {article} {nationality} {job} ."
    if job:
        return f"{name} is a {job} who likes the {thing} ."
    return f"{name} is {nationality} and likes the {thing} ."


def _dialogue(rng: random.Random) -> tuple[list[tuple[str, str]], str]:
    """(speaker, line) turns and who will do what, when (as `_summarize` draws them)."""
    asker, asked, helper = rng.sample(NAMES, 3)
    chore, thing, day = rng.choice(CHORES), rng.choice(THINGS), rng.choice(DAYS)
    turns = [(asker, f"can you {chore} the {thing} on {day} ?")]
    if rng.random() < 0.5:
        turns.append((asked, f"{rng.choice(['sure', 'ok', 'yes'])} , i will do it ."))
        doer = asked
    else:
        turns.append((asked, "sorry , i am busy ."))
        turns.append((helper, f"{rng.choice(['i can do it', 'leave it to me'])} ."))
        doer = helper
    turns.append((asker, f"{rng.choice(['thanks', 'great', 'perfect'])} !"))
    return turns, f"{doer} will {chore} the {KIND[thing]} on {day} ."


# How an input is laid out, by kind of input: two questions (q_), one subject's facts (f_), a dialogue (d_),
# a news sentence (n_).
LAYOUTS: dict[str, Callable] = {
    "q_tagged": lambda qs: f"q1 : {qs[0]} q2 : {qs[1]}",
    "q_words": lambda qs: f"question one : {qs[0]} question two : {qs[1]}",
    "q_quoted": lambda qs: f'" {qs[0]} " and " {qs[1]} "',
    "q_numbered": lambda qs: f"1 ) {qs[0]} 2 ) {qs[1]}",
    "f_brackets": lambda f: " ".join(f"[ {f[0]} | {rel} | {obj} ]" for rel, obj in f[1]),
    "f_parens": lambda f: " ".join(f"( {f[0]} , {rel} , {obj} )" for rel, obj in f[1]),
    "f_record": lambda f: f"subject : {f[0]} , " + " , ".join(f"{rel} : {obj}" for rel, obj in f[1]),
    "f_dashes": lambda f: " ; ".join(f"{f[0]} - {rel} - {obj}" for rel, obj in f[1]),
    "d_colon": lambda turns: " ".join(f"{who} : {line}" for who, line in turns),
    "d_quoted": lambda turns: " ".join(f'{who} : " {line} "' for who, line in turns),
    "d_says": lambda turns: " ".join(f"{who} says {line}" for who, line in turns),
    "n_plain": lambda sentence: sentence,
    "n_quoted": lambda sentence: f'" {sentence} "',
    "n_tagged": lambda sentence: f"article : {sentence}",
}

# Per task, its templates: (input layout, ask); the ask holds the laid-out input at {input} and may name
# the subject ({name}) and the asked relation ({field}). Partner tasks use the same layouts, other asks.
HARD_TEMPLATES: dict[str, list[tuple[str, str]]] = {
    "paraphrase": [
        ("q_tagged", "{input} duplicate ?"),
        ("q_words", "{input} do these two questions ask the same thing ?"),
        ("q_quoted", "are {input} asking the same ? answer yes or no"),
        ("q_numbered", "same meaning ? {input}"),
        ("q_tagged", "is q2 a duplicate of q1 ? {input}"),
    ],
    "question_subject": [
        ("q_tagged", "{input} who is q1 about ?"),
        ("q_words", "{input} who does question one ask about ?"),
        ("q_quoted", "in {input} , who is the first question about ? answer with a name"),
        ("q_numbered", "name the person in question 1 : {input}"),
    ],
    "data_to_text": [
        ("f_brackets", "{input} write a sentence about these facts ."),
        ("f_parens", "describe the data in words : {input}"),
        ("f_record", "{input} turn this record into text ."),
        ("f_dashes", "facts : {input} what sentence says this ?"),
    ],
    "fact_lookup": [
        ("f_brackets", "{input} what is the {field} of {name} ?"),
        ("f_parens", "from the data , find the {field} of {name} : {input}"),
        ("f_record", "{input} which {field} does the record give ?"),
        ("f_dashes", "look up {field} : {input}"),
        ("f_brackets", "{name} has which {field} ? {input}"),
    ],
    "summarize": [
        ("d_colon", "{input} what was decided ?"),
        ("d_quoted", "summarize : {input}"),
        ("d_says", "{input} who will do what and when ?"),
    ],
    "headline": [
        ("n_plain", "{input} headline :"),
        ("n_quoted", "write a title for {input}"),
        ("n_tagged", "{input} give it a short title ."),
    ],
}
# the format-sharing pairs: (existing task, new task asking something else of the same input)
SHARED_FORMATS = (("paraphrase", "question_subject"), ("data_to_text", "fact_lookup"))


def _ask_paraphrase(rng: random.Random):
    questions, _, duplicate = _question_pair(rng)
    return questions, {}, "yes" if duplicate else "no"


def _ask_question_subject(rng: random.Random):
    questions, first_about, _ = _question_pair(rng)
    return questions, {}, first_about


def _ask_data_to_text(rng: random.Random):
    name, facts = _facts(rng)
    return (name, facts), {}, fact_sentence(name, dict(facts))


def _ask_fact_lookup(rng: random.Random):
    name, facts = _facts(rng)
    relation, obj = rng.choice(facts)
    return (name, facts), {"name": name, "field": FIELD[relation]}, obj


def _ask_summarize(rng: random.Random):
    turns, summary = _dialogue(rng)
    return turns, {}, summary


def _ask_headline(rng: random.Random):
    sentence, title = _headline(rng)  # the default's news sentence and headline, same draws
    return sentence, {}, title


def _written(task: str, draw: Callable) -> Callable[[random.Random], Drawn]:
    """`task`'s hard generator: draw the input and answer, pick one of its templates at random, lay the input
    out and wrap the ask around it."""

    def make(rng: random.Random) -> Drawn:
        content, slots, output = draw(rng)
        k = rng.randrange(len(HARD_TEMPLATES[task]))
        layout, ask = HARD_TEMPLATES[task][k]
        body = LAYOUTS[layout](content)
        return Drawn(ask.format(input=body, **slots), output, f"{task}/{k}", layout, body)

    return make


TASKS_HARD: dict[str, Callable[[random.Random], Drawn]] = {
    "paraphrase": _written("paraphrase", _ask_paraphrase),
    "question_subject": _written("question_subject", _ask_question_subject),
    "data_to_text": _written("data_to_text", _ask_data_to_text),
    "fact_lookup": _written("fact_lookup", _ask_fact_lookup),
    "summarize": _written("summarize", _ask_summarize),
    "headline": _written("headline", _ask_headline),
}
VARIANTS = ("default", "hard")  # `TASKS`, `TASKS_HARD`


def tasks_of(variant: str) -> dict[str, Callable]:
    """The generators of a benchmark variant, by task name."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown synthetic variant {variant!r}; known: {', '.join(VARIANTS)}")
    return TASKS if variant == "default" else TASKS_HARD


class ExampleStream:
    """The endless seeded sequence of `task`'s examples for `seed` in benchmark `variant` ("default" or
    "hard"): `take(n)` gives the next n, so that consecutive slices (clients drawing disjoint examples) cost
    what they hold, not what came before; `drawn(n)` gives them with their template and layout."""

    def __init__(self, task: str, seed: int | str, variant: str = "default"):
        tasks = tasks_of(variant)
        if task not in tasks:
            raise KeyError(f"unknown synthetic task {task!r}; known: {', '.join(tasks)}")
        self.task, self.variant, self._make = task, variant, tasks[task]
        self._rng = random.Random(f"{task}:{seed}" if variant == "default" else f"hard:{task}:{seed}")

    def drawn(self, n: int) -> list[Drawn]:
        if self.variant != "default":
            return [self._make(self._rng) for _ in range(n)]
        out = []
        for _ in range(n):
            instruction, output = self._make(self._rng)
            out.append(Drawn(instruction, output, f"{self.task}/0", self.task, instruction))
        return out

    def take(self, n: int) -> list[dict]:
        return [{"instruction": d.instruction, "output": d.output, "task": self.task} for d in self.drawn(n)]


def generate_examples(task: str, n: int, seed: int | str, variant: str = "default") -> list[dict]:
    """`n` examples of `task` in the data schema ({instruction, output, task}), determined by `seed`."""
    return ExampleStream(task, seed, variant).take(n)


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
