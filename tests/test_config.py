import pytest
from pydantic import ValidationError

from fedrouter import world
from fedrouter.config import Config, load_config, parse_value
from fedrouter.errors import FedrouterError
from fedrouter.methods.common import client_rank


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.method == "fedrouter" and cfg.scenario == "dual"  # the paper's method on its dual scenario
    assert cfg.scenario == "dual"
    assert cfg.n_clients == 8 and cfg.rounds == 25 and cfg.local_steps == 10 and cfg.batch_size == 16
    assert cfg.data == "synthetic" and cfg.model == "tiny"
    assert cfg.lora.r == 8 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    # the config's [tiny] defaults are the tiny base's own defaults (one recipe, not two)
    from fedrouter.core.model import TinyBaseSpec

    spec = TinyBaseSpec()
    assert all(getattr(cfg.tiny, k) == getattr(spec, k) for k in cfg.tiny.model_dump())


def test_overrides_applied_including_dotted():
    cfg = load_config(overrides={"rounds": 3, "lora.r": 4, "tiny.pretrain_steps": 60, "method": "local"})
    assert cfg.rounds == 3
    assert cfg.lora.r == 4
    assert cfg.lora.alpha == 16  # untouched sibling keeps its default
    assert cfg.tiny.pretrain_steps == 60
    assert cfg.method == "local"


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(ValidationError):
        cfg.rounds = 3


@pytest.mark.parametrize("key", ["roundz", "lora.rank", "tiny.layers"])
def test_unknown_key_named_in_error(key):
    with pytest.raises(FedrouterError) as exc:
        load_config(overrides={key: 1})
    assert key in str(exc.value)
    assert "unknown key" in str(exc.value)


@pytest.mark.parametrize("key,value", [("rounds", 0), ("lr", -1.0), ("client_fraction", 1.5), ("lora.dropout", 1.0),
                                       ("rounds", "many"), ("prompt_template", "no slot here"), ("engine", "spark")])
def test_bad_value_names_key(key, value):
    with pytest.raises(FedrouterError) as exc:
        load_config(overrides={key: value})
    msg = str(exc.value)
    assert key in msg
    assert "\n" not in msg


def test_unknown_method():
    with pytest.raises(FedrouterError) as exc:
        load_config(overrides={"method": "fedsomething"})
    assert "method" in str(exc.value) and "fedsomething" in str(exc.value)


def test_unknown_scenario():
    with pytest.raises(FedrouterError) as exc:
        load_config(overrides={"scenario": "triple"})
    assert "scenario" in str(exc.value) and "triple" in str(exc.value)


def test_dotted_key_into_a_value_is_an_error():
    with pytest.raises(FedrouterError, match="not a section"):
        load_config(overrides={"lora.r": 4, "lora.r.x": 1})


def test_toml_file_and_precedence(tmp_path):
    f = tmp_path / "exp.toml"
    f.write_text('method = "local"\nrounds = 5\nseed = 11\n\n[lora]\nr = 4\nalpha = 8\n')
    cfg = load_config(f)
    assert (cfg.method, cfg.rounds, cfg.seed, cfg.lora.r, cfg.lora.alpha) == ("local", 5, 11, 4, 8)
    assert cfg.batch_size == 16  # not in the file: default

    cfg = load_config(str(f), {"rounds": 7, "lora.r": 16})
    assert cfg.rounds == 7  # override beats file
    assert cfg.lora.r == 16
    assert cfg.lora.alpha == 8  # the rest of the file's section survives
    assert cfg.seed == 11 and cfg.method == "local"


def test_toml_file_unknown_key(tmp_path):
    f = tmp_path / "typo.toml"
    f.write_text("local_step = 3\n")
    with pytest.raises(FedrouterError, match="local_step"):
        load_config(f)


def test_missing_toml_file(tmp_path):
    with pytest.raises(FedrouterError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_invalid_toml(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("rounds = = 3\n")
    with pytest.raises(FedrouterError) as exc:
        load_config(f)
    assert "invalid TOML" in str(exc.value) and str(f) in str(exc.value)


@pytest.mark.parametrize("text,expected", [
    ("3", 3),
    ("-2", -2),
    ("0.5", 0.5),
    ("1e-3", 0.001),
    ("true", True),
    ("false", False),
    ("[1, 2]", [1, 2]),
    ('["q_proj", "v_proj"]', ["q_proj", "v_proj"]),
    ('"quoted"', "quoted"),
    ("fedit", "fedit"),
    ("some/path/data", "some/path/data"),
    ("", ""),
])
def test_parse_value(text, expected):
    value = parse_value(text)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("ranks", [[], [4, 0], [4, "8"]])
def test_bad_client_ranks_are_one_line(ranks):
    with pytest.raises(FedrouterError) as exc:
        load_config(overrides={"method": "flora", "lora.client_ranks": ranks})
    assert "lora.client_ranks" in str(exc.value) and "\n" not in str(exc.value)


def test_client_ranks_only_for_a_method_that_takes_them():
    cfg = load_config(overrides={"method": "flora", "lora.client_ranks": [4, 8, 16]})
    setup = world.method_setup(cfg)
    assert [client_rank(setup, c) for c in range(4)] == [4, 8, 16, 4]
    assert client_rank(world.method_setup(load_config(overrides={"method": "flora"})), 3) is None
    with pytest.raises(FedrouterError) as exc:
        load_config(overrides={"method": "fedit", "lora.client_ranks": [4, 8]})
    msg = str(exc.value)
    assert "fedit trains one rank" in msg and "flora" in msg and "\n" not in msg
