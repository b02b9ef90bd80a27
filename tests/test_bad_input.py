"""Bad input, as a careless user or an adversary gives it (issue 13's probes): each case ends with exit
code 2, exactly one `fedrouter: error: ...` line naming the problem, no traceback, and nothing left that
looks complete (no results.json, no half-written file)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import exit_code, kill_after_checkpoint, one_error_line, set_args

from fedrouter.checkpoint import path_of
from fedrouter.cli import main




def _nothing_complete(folder: Path) -> None:
    if folder.exists():
        assert not list(folder.rglob("results.json")) and not list(folder.rglob("*.tmp")), sorted(folder.rglob("*"))


# ---------------------------------------------------------------------------- config and data (no model)

def _surrogate_data(tmp: Path) -> str:
    folder = tmp / "data"
    folder.mkdir()
    row = '{"instruction": "caf\\ud800", "output": "x", "task": "t"}\n'  # a lone surrogate escape
    (folder / "train.jsonl").write_text(row)
    (folder / "test.jsonl").write_text(row)
    return str(folder)


CONFIG_CASES = {
    "lr=inf": (["--set", "lr=inf"], "lr: Input should be a finite number"),
    "mu=nan": (["--method", "fedprox", "--set", "method_options.mu=nan"], "method_options.mu is not a finite number"),
    "server_lr=nan": (["--method", "fedit", "--set", 'method_options.server_opt="fedadam"', "--set",
                       "method_options.server_lr=nan"], "method_options.server_lr is not a finite number"),
    "rounds=true": (["--set", "rounds=true"], "rounds: Input should be a valid integer"),
    "seed=-5": (["--seed", "-5"], "seed: Input should be greater than or equal to 0"),
    "heads": (["--set", "tiny.hidden_size=130"], "must be a multiple of tiny.num_heads"),
    "set =5": (["--set", "=5"], "'' is not a config key"),
    "template field": (["--set", 'prompt_template="{__class__}"'], "not {__class__}"),
    "template index": (["--set", 'prompt_template="{0}"'], "not {0}"),
    "template brace": (["--set", 'prompt_template="{"'], "is not a valid template"),
    "template spec": (["--set", 'prompt_template="{instruction:>999999999999}"'], "not {instruction:>999999999999}"),
    "template literal": (["--set", 'prompt_template="{{instruction}}"'], "must insert the input with {instruction}"),
    "surrogate": (None, "holds an invalid character (a lone surrogate, \\ud800)"),
    # issue 32: values accepted before, then a traceback or a silence of minutes
    "device meta": (["--device", "meta"], "'meta' is not a device this runs on"),
    "device xpu": (["--device", "xpu"], "'xpu' is not a device this runs on"),
    "grad_accum_steps huge": (["--set", "grad_accum_steps=1000000"], "grad_accum_steps: one optimizer step of 1000000 batches of 16"),
    "n_clients huge": (["--clients", "100000"], "n_clients: 100000 clients in one process"),
    "lr nan flag": (["--lr", "nan"], "argument --lr: not a finite number: 'nan'"),
    "client fraction inf flag": (["--client-fraction", "inf"], "argument --client-fraction: not a finite number"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_a_config_or_data_a_user_could_not_mean_is_one_line(case, tmp_path, capsys):
    args, needle = CONFIG_CASES[case]
    if args is None:
        args = ["--data", _surrogate_data(tmp_path)]
    out = tmp_path / "run"
    assert exit_code(lambda: main(["run", "--quiet", "--out", str(out), *args])) == 2
    assert needle in one_error_line(capsys.readouterr().err)
    assert not out.exists()  # refused before the run directory was claimed


ARGPARSE_CASES = {
    "unknown flag": (["run", "--bogus"], "fedrouter: error: unrecognized arguments: --bogus (see fedrouter --help)"),
    "missing argument": (["flower", "keys"], "fedrouter: error: flower keys: the following arguments are required: dir"),
    "bad int": (["run", "--rounds", "x"], "fedrouter: error: run: argument --rounds: invalid int value: 'x'"),
    "no command": ([], "fedrouter: error: the following arguments are required: command"),
    "bad choice": (["nonsense"], "invalid choice: 'nonsense'"),
}


@pytest.mark.parametrize("case", sorted(ARGPARSE_CASES))
def test_argparse_errors_are_one_line_not_a_screen_of_usage(case, capsys):
    argv, needle = ARGPARSE_CASES[case]
    assert exit_code(lambda: main(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in one_error_line(err) and "usage:" not in err, err


def test_a_model_whose_weights_are_a_pickle_payload_is_refused_and_runs_nothing(tmp_path, tiny_model_dir, capsys):
    import torch

    from test_security import Payload

    marker = tmp_path / "ran"
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    torch.save({"weight": Payload(marker)}, model / "pytorch_model.bin")
    assert main(["run", "--quiet", "--out", str(tmp_path / "run"), "--model", str(model)]) == 2
    assert "cannot load model" in one_error_line(capsys.readouterr().err)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_cache_dir_that_cannot_be_created_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["run", "--quiet", "--out", str(tmp_path / "run"), "--set", f'cache_dir="{tmp_path / "file" / "cache"}"']) == 2
    assert "cannot create the model cache" in one_error_line(capsys.readouterr().err)


def test_building_the_synthetic_split_is_linear_in_clients(monkeypatch):
    # 116 s for 2,000 clients before: every client regenerated the stream up to its slice. Now every
    # example is generated once: count the generator calls for 50 and 500 clients.
    from fedrouter.core import data, synthetic

    calls = {"n": 0}
    original = synthetic.TASKS["headline"]

    def counted(rng):
        calls["n"] += 1
        return original(rng)

    monkeypatch.setitem(synthetic.TASKS, "headline", counted)
    for n_clients in (50, 500):
        calls["n"] = 0
        built = data.build_federated_data("synthetic", "single", n_clients, 8, 4, 2, seed=0)
        held = sum(len(c.train) + len(c.test) for c in built.clients if "headline" in c.tasks)
        assert calls["n"] == held + 2  # each example made once (+ the 2 general-test ones)


# ------------------------------------------------------------------------------------ run directories

def test_an_unwritable_out_is_one_line_and_leaves_nothing(tmp_path, tiny_overrides, tiny_model_dir, capsys):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "run"
    assert main(["run", "--quiet", "--out", str(out), *set_args(tiny_overrides)]) == 2
    assert "cannot create run directory" in one_error_line(capsys.readouterr().err)


def test_two_runs_racing_for_one_new_directory_exactly_one_wins(tmp_path):
    from fedrouter import rundir
    from fedrouter.errors import FedrouterError

    for attempt in range(5):
        target, outcomes = tmp_path / f"race{attempt}", []
        barrier = threading.Barrier(8)

        def claim(i):
            barrier.wait()
            try:
                rundir.claim(target, {"who": i})
                outcomes.append(("won", i))
            except FedrouterError as exc:
                outcomes.append(("lost", str(exc)))

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for what, i in outcomes if what == "won"]
        assert len(winners) == 1 and json.loads((target / "config.json").read_text()) == {"who": winners[0]}


def _limited_file_size(limit: int):
    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return setup


def test_a_full_disk_mid_run_reaches_the_terminal_and_failed_and_leaves_no_partial_file(tmp_path, tiny_overrides, tiny_model_dir):
    # Files may grow to 40 kB: config.json and the first metrics fit, the first checkpoint (an adapter
    # and its optimizer) does not -- as a disk that fills up mid-run.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedrouter.cli", "run", "--quiet", "--method", "fedit", "--out", str(out),
           *set_args(tiny_overrides)]
    done = subprocess.run(cmd, preexec_fn=_limited_file_size(40_000), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert "File too large" in line and "round-00001.safetensors" in line
    assert "File too large" in (out / "FAILED").read_text()  # the reason, where the disk allowed it
    _nothing_complete(out)
    assert not list((out / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------------ resume

@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, tiny_model_dir):
    """An unfinished fedit run with the checkpoint of round 1 (killed mid-round 2)."""
    from conftest import TINY_OVERRIDES

    out = tmp_path_factory.mktemp("killed") / "run"
    overrides = {**TINY_OVERRIDES, "rounds": 4, "local_steps": 12, "n_clients": 2}
    cmd = [sys.executable, "-m", "fedrouter.cli", "run", "--quiet", "--method", "fedit", "--out", str(out), *set_args(overrides)]
    kill_after_checkpoint(cmd, path_of(out, 1))
    return out


def _edit_config(run_dir: Path, **changes) -> None:
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, **changes}))


def _drop_server_part(run_dir: Path) -> None:
    from fedrouter.checkpoint import read, save

    for path in sorted((run_dir / "checkpoints").glob("round-*")):
        payload = read(path)
        del payload["server"]
        path.unlink()
        save(run_dir, payload["round"], {k: v for k, v in payload.items() if k not in ("format", "round")}, keep=5)


RESUME_CASES = {
    "method edited": (lambda d: _edit_config(d, method="fedprox"), "method = 'fedprox', but the checkpoint was written with method = 'fedit'"),
    "clients edited": (lambda d: _edit_config(d, n_clients=3), "n_clients = 3"),
    "no server part": (_drop_server_part, "no readable checkpoint"),
    "config corrupt": (lambda d: (d / "config.json").write_text('{"method": '), "is unreadable or corrupt"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_a_resume_that_does_not_belong_is_refused_before_any_work(case, killed_run, tmp_path, capsys):
    damage, needle = RESUME_CASES[case]
    run_dir = tmp_path / "run"
    shutil.copytree(killed_run, run_dir)
    damage(run_dir)
    before = sorted(p.name for p in run_dir.rglob("*"))
    assert main(["run", "--quiet", "--resume", str(run_dir)]) == 2
    assert needle in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # nothing written, nothing lost
    _nothing_complete(run_dir)


# ---------------------------------------------------------------------------------- predict and report

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    from conftest import TINY_OVERRIDES

    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "--quiet", "--method", "fedrouter", "--out", str(out), *set_args(TINY_OVERRIDES)]) == 0
    return out


def _write_centroids(run_dir: Path, rows: int) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"centroids": torch.zeros(rows, 4)}, str(run_dir / "router" / "centroids.safetensors"))


def _bend_whitening_map(run_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = str(run_dir / "router" / "centroids.safetensors")
    tensors = load_file(path)
    assert "whiten" in tensors  # the default router is the discriminant one
    tensors["whiten"] = tensors["whiten"][:, :-1].contiguous()
    save_file(tensors, path)


def _rename_adapter(run_dir: Path) -> None:
    router = json.loads((run_dir / "router" / "router.json").read_text())
    router["adapters"][0] = "../../outside"
    (run_dir / "router" / "router.json").write_text(json.dumps(router))


def _fewer_adapters(run_dir: Path) -> None:
    router = json.loads((run_dir / "router" / "router.json").read_text())
    router["adapters"] = router["adapters"][:-1] or []
    (run_dir / "router" / "router.json").write_text(json.dumps(router))


PREDICT_CASES = {
    "config corrupt": (lambda d: (d / "config.json").write_text("{"), "is unreadable or corrupt"),
    "router corrupt": (lambda d: (d / "router" / "router.json").write_text('{"adapters": ['), "is unreadable or corrupt"),
    "centroids corrupt": (lambda d: (d / "router" / "centroids.safetensors").write_bytes(b"\x00" * 12), "is unreadable or corrupt"),
    "fewer adapters": (_fewer_adapters, "adapters for"),
    "adapter path": (_rename_adapter, "is not a plain name"),
    "centroid count": (lambda d: _write_centroids(d, 99), "for 99 centroids"),
    "whitening map": (_bend_whitening_map, "the whitening map must be a finite"),
}


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
def test_predict_on_a_damaged_run_is_one_line(case, finished_run, tmp_path, capsys):
    damage, needle = PREDICT_CASES[case]
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    damage(run_dir)
    assert main(["predict", str(run_dir), "--prompt", "hello"]) == 2
    assert needle in one_error_line(capsys.readouterr().err)


def test_predict_out_a_directory_is_refused_before_any_answer(finished_run, tmp_path, capsys):
    assert main(["predict", str(finished_run), "--prompt", "hello", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "give a file in an existing folder" in one_error_line(captured.err) and captured.out == ""


@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / "metrics.jsonl").write_text((d / "metrics.jsonl").read_text()[:-7]), "metrics.jsonl:2: not valid JSON"),
    (lambda d: (d / "embedding_map.json").write_text((d / "embedding_map.json").read_text()[:100]), "is unreadable or corrupt"),
])
def test_report_on_a_truncated_file_is_one_line(damage, needle, finished_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    damage(run_dir)
    before = sorted(p.name for p in run_dir.iterdir())
    assert main(["report", str(run_dir)]) == 2
    assert needle in one_error_line(capsys.readouterr().err)
    # nothing half-written: no page, no figures/ with some figures in it, no staging folder left
    assert sorted(p.name for p in run_dir.iterdir()) == before and "figures" not in before


# ------------------------------------------------------------------------------------------- flower

def test_flower_keys_and_app_refuse_bad_arguments_and_leave_nothing(tmp_path, capsys):
    pytest.importorskip("cryptography")
    assert main(["flower", "keys", str(tmp_path / "keys"), "--days", "-5"]) == 2
    assert "--days must be" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "keys").exists()
    (tmp_path / "a-file").write_text("")
    assert main(["flower", "keys", str(tmp_path / "a-file")]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err)
    assert main(["flower", "app", str(tmp_path / "a-file")]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "a-file").read_text() == ""
    assert main(["flower", "worker", "--socket", str(tmp_path / "missing" / "node.sock")]) == 2
    assert "does not exist" in one_error_line(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


FLOWER_EXTRA_CASES = {  # the module each needs first, blocked as if the flower extra were not installed
    "app": (["flower", "app", "{tmp}/app"], "flwr"),
    "worker": (["flower", "worker", "--socket", "{tmp}/w/node.sock"], "flwr"),
    "keys": (["flower", "keys", "{tmp}/keys"], "cryptography"),
    "supernode": (["flower", "supernode", "--insecure"], "flwr"),
}


@pytest.mark.parametrize("case", sorted(FLOWER_EXTRA_CASES))
def test_flower_commands_without_the_extra_say_what_to_install(case, tmp_path, capsys, monkeypatch):
    argv, blocked = FLOWER_EXTRA_CASES[case]
    (tmp_path / "w").mkdir(mode=0o700)
    for name in [m for m in sys.modules if m == blocked or m.startswith((blocked + ".", "fedrouter.engines.flower"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)  # `import flwr` now fails as on a machine without it
    before = set(sys.modules)
    try:
        assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    finally:  # what was imported with the extra blocked goes too: later tests import it afresh, whole
        for name in set(sys.modules) - before:
            del sys.modules[name]
    line = one_error_line(capsys.readouterr().err)
    assert f"needs the flower extra ({blocked} is missing): pip install 'fedrouter[flower]'" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"] and not list((tmp_path / "w").iterdir())


@pytest.mark.parametrize("hosts, needle", [
    ("a b", "'a b' is not a host name"), ("../x", "'../x' is not a host name"), ("-x.example", "'-x.example'"),
    ("ok.example," + "x" * 64 + ".example", "is not a host name"), ("bad_name.example", "'bad_name.example'"),
])
def test_flower_keys_refuses_names_that_cannot_be_hosts(hosts, needle, tmp_path, capsys):
    pytest.importorskip("cryptography")
    assert main(["flower", "keys", str(tmp_path / "keys"), f"--hosts={hosts}"]) == 2
    assert needle in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "keys").exists()


def test_flower_keys_writes_an_international_name_in_its_ascii_form(tmp_path):
    pytest.importorskip("cryptography")
    from cryptography import x509

    assert main(["flower", "keys", str(tmp_path / "keys"), "--hosts", "bücher.example,127.0.0.1"]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "keys" / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["xn--bcher-kva.example"]
