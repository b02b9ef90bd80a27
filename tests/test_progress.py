"""Progress that a log shows (issue 34): plain lines, rate-limited, when stderr is not a terminal; tqdm
bars on a terminal; nothing when progress is off."""

from __future__ import annotations

import io
import re

import torch
from tqdm import tqdm

from conftest import ScriptedTransport
from fedrouter import progress
from fedrouter.engines.inprocess import InProcessTransport
from fedrouter.engines.loop import RoundLoop
from fedrouter.methods import fedit
from fedrouter.methods.base import ClientContext, Message, MethodSetup
from fedrouter.progress import phase, steps

A, B = "m.lora_A.weight", "m.lora_B.weight"


class Terminal(io.StringIO):
    def isatty(self):
        return True


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_log_gets_a_line_at_most_every_few_seconds_and_at_the_last_step():
    log, clock = io.StringIO(), FakeClock()
    bar = steps(range(10), "pretraining", stream=log, clock=clock, every_s=5.0)
    for i in bar:
        clock.now += 2.0  # each step takes 2 s
        bar.set_postfix(loss=f"{1 / (i + 1):.2f}")
    assert log.getvalue().splitlines() == [
        "pretraining 3/10 after 6 s: loss 0.33",   # the first step 5 s after the start
        "pretraining 6/10 after 12 s: loss 0.17",  # then 5 s after the previous line, not sooner
        "pretraining 9/10 after 18 s: loss 0.11",
        "pretraining 10/10 after 20 s: loss 0.10",  # the last step, whenever it ends
    ]


def test_a_resumed_loop_counts_from_where_it_stands():
    log, clock = io.StringIO(), FakeClock()
    bar = steps(range(3, 5), "rounds", initial=3, total=5, stream=log, clock=clock, every_s=0.0)
    for _ in bar:
        clock.now += 1.0
    assert log.getvalue().splitlines() == ["rounds 4/5 after 1 s", "rounds 5/5 after 2 s"]


def test_a_terminal_gets_a_tqdm_bar_and_no_lines():
    term = Terminal()
    bar = steps(range(3), "rounds", stream=term)
    assert isinstance(bar, tqdm)
    list(bar)
    bar.close()
    phase("loading the base model", stream=term)
    assert "loading the base model" not in term.getvalue() and "\r" in term.getvalue()


def test_progress_off_or_an_inner_loop_prints_nothing_on_a_log():
    log = io.StringIO()
    for bar in (steps(range(3), "rounds", enabled=False, stream=log), steps(range(3), "clients", log=False, stream=log)):
        for _ in bar:
            bar.set_postfix_str("x")
    phase("loading the base model", enabled=False, stream=log)
    assert log.getvalue() == ""
    phase("loading the base model", stream=log)
    assert log.getvalue() == "loading the base model\n"


def test_a_round_loop_on_a_log_says_each_round_its_time_and_the_clients_that_answered(monkeypatch, capsys):
    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # every round a line (rounds here take no time)
    start = {A: torch.zeros(1, 2), B: torch.zeros(2, 1)}
    server = fedit.Server(MethodSetup(0, 2), start, [0, 1, 2])
    good = Message({A: torch.ones(1, 2), B: torch.ones(2, 1)}, {"n_examples": 1, "loss": 0.5, "tokens": 1})
    failed = Message(config={"failed": "InjectedFailure: injected failure"})
    script = {0: {0: good, 1: good, 2: good}, 1: {0: good, 1: failed, 2: good}}
    RoundLoop(server, ScriptedTransport(script), [0, 1, 2], 2, 1.0, 0, progress=True).run()
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("fedrouter:")]  # warnings
    assert len(lines) == 2, lines
    pattern = r"rounds {k}/2 after \d+ s: loss \S+, round \d+\.\d s, {n}/3 clients answered"
    assert re.fullmatch(pattern.format(k=1, n=3), lines[0]) and re.fullmatch(pattern.format(k=2, n=2), lines[1])


class EchoClient:
    """A client part whose setup, training and evaluation answer at once."""

    def setup(self, msg, ctx):
        return Message(config={"client": ctx.client_id})

    fit = evaluate = setup


def test_in_process_setup_and_evaluation_say_each_client_on_a_log_and_training_leaves_it_to_the_round(monkeypatch, capsys):
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    contexts = {cid: ClientContext(cid, None) for cid in range(3)}
    transport = InProcessTransport(EchoClient(), contexts, progress=True)
    messages = {cid: Message(config={}) for cid in contexts}
    assert transport.setup(messages)[2].config == {"client": 2}
    transport.fit(messages)
    transport.evaluate(messages)
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("fedrouter:")]
    assert [line.split(" after ")[0] for line in lines] == [f"clients setting up {k}/3" for k in (1, 2, 3)] + [
        f"clients evaluating {k}/3" for k in (1, 2, 3)]
