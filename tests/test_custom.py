"""Your own network on your own data: an architecture named in params.yaml by import path (here a
module in a temporary directory), IDX data with three channels, 32x32 images, four classes and
other statistics, and the clear errors when the two do not fit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hanprune import config, data, datasets, idx, measure, models, sources
from hanprune.check import check
from tests.tiny import stage_commands, tiny_params

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

USER_MODULE = '''
from torch import nn


class TinyNet(nn.Module):
    """Batch norm, a grouped convolution, layers inside nn.Sequential."""

    def __init__(self, in_channels=3, classes=4, width=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width * 16, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class NotAModule:
    pass
'''
LAYERS = ["features.0", "features.3", "classifier.1", "classifier.3"]


def write_color_idx(directory: Path, n_train=400, n_test=120, seed=0) -> dict[str, str]:
    """Four classes of 3-channel 32x32 images, each class a colour pattern plus noise, brighter than
    MNIST (other statistics). Returns file name -> md5."""
    rng = np.random.default_rng(seed)
    patterns = rng.random((4, 3, 32, 32)) > 0.5
    files = {}
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        labels = rng.integers(0, 4, n)
        images = 90 + patterns[labels] * 120 + rng.integers(0, 40, (n, 3, 32, 32))
        files[f"{prefix}-images-idx3-ubyte"] = idx.idx_images(images.astype(np.uint8))
        files[f"{prefix}-labels-idx1-ubyte"] = idx.idx_labels(labels)
    directory.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (directory / name).write_bytes(blob)
    return {name: datasets.md5(blob) for name, blob in files.items()}


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "usernets").mkdir()
    (tmp_path / "usernets" / "mynets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "usernets"))
    return tmp_path / "usernets"


def test_three_channel_idx_data_brings_its_shape_classes_and_statistics(tmp_path):
    spec = datasets.spec("colour", write_color_idx(tmp_path / "src"))
    _, files = sources.fetch(spec, "local", tmp_path / "src")
    raw = data.write_raw(files, tmp_path / "data", spec).raw
    assert raw == tmp_path / "data" / "colour" / "raw"
    info = json.loads((raw / data.INFO_FILE).read_text())
    assert info["classes"] == 4 and len(info["mean"]) == 3 and all(m > 0.5 for m in info["mean"])
    splits = data.Splits(data.verified(raw, "colour"), val_size=50, val_seed=0)
    assert splits.input_shape == (3, 32, 32) and splits.classes == 4
    x = torch.cat([splits.train[0], splits.val[0]])
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=2e-3)  # normalised per channel
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=2e-3)


def test_user_model_by_import_path_layers_flops_and_what_is_not_counted(user_module):
    model = models.make("mynets:TinyNet", {"width": 8})
    assert list(models.prunable_layers(model)) == LAYERS
    stats = measure.layer_stats(model, (3, 32, 32))
    # the grouped convolution: 8 outputs, each seeing 4 of the 8 inputs, at 32x32 positions
    assert stats["features.3"]["weights"] == 8 * 4 * 3 * 3
    assert stats["features.3"]["flops_dense"] == 2 * 8 * 4 * 3 * 3 * 32 * 32
    assert stats["classifier.1"]["flops_dense"] == 2 * 128 * 32
    assert models.unpruned_parameters(model) == {"features.1": 16}
    summary = measure.summary(model, model, 0.9, 0.9, (3, 32, 32))
    assert summary["not_counted"] == {"features.1": 16}
    assert "not_counted" not in measure.summary(models.make("lenet5"), models.make("lenet5"), 0.9, 0.9, (1, 28, 28))


@pytest.mark.parametrize("arch, kwargs, message", [
    ("lenet6", {}, "unknown arch 'lenet6' (did you mean 'lenet5'?); allowed: lenet_300_100, lenet5, lenet5_caffe, "
                   "or an import path package.module:Class"),
    ("nosuchpackage.nets:Net", {}, "arch 'nosuchpackage.nets:Net': cannot import 'nosuchpackage.nets'"),
    ("mynets:Missing", {}, "arch 'mynets:Missing': module 'mynets' has no 'Missing'"),
    ("mynets:NotAModule", {}, "arch 'mynets:NotAModule': NotAModule is not an nn.Module class"),
    ("mynets:TinyNet", {"depth": 3}, "arch 'mynets:TinyNet': TinyNet(**{'depth': 3}) failed: TypeError"),
])
def test_an_architecture_that_cannot_be_made_is_one_config_error(user_module, tmp_path, project_params, arch,
                                                                  kwargs, message):
    project_params["models"]["lenet5"].update(arch=arch, kwargs=kwargs)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(project_params, sort_keys=False))
    with pytest.raises(config.ConfigError) as e:
        check(config.load(path))  # `python -m hanprune check`; the pretrain stage makes the same check
    assert f"models.lenet5.arch: {message}" in str(e.value)


def test_model_and_data_that_do_not_fit_are_refused_before_training(user_module):
    with pytest.raises(models.ModelError, match=r"model three gives \(2, 3\) for a batch of 2 images; the data "
                                                r"has 4 classes, so it must give \(2, 4\)"):
        models.check_fits(models.make("mynets:TinyNet", {"classes": 3}), "three", (3, 32, 32), 4)
    with pytest.raises(models.ModelError, match=r"model lenet5 does not take the data's images \(C, H, W\) = "
                                                r"\(3, 32, 32\): RuntimeError"):
        models.check_fits(models.make("lenet5"), "lenet5", (3, 32, 32), 4)


def project(tmp: Path, user_dir: Path, kwargs: dict) -> Path:
    md5 = write_color_idx(tmp / "src")
    p = tiny_params(ROOT / "params.yaml", tmp / "src", md5, {"lenet5": 1})
    p["models"] = {"mine": {**p["models"]["lenet5"], "arch": "mynets:TinyNet", "kwargs": kwargs,
                            "code": str(user_dir / "mynets.py"), "select": {"noise": 2}}}
    p["models"]["mine"]["quantize"]["bits"] = {name: 4 for name in LAYERS}
    p["prune"] = {"mine-iter1": {"model": "mine", "iteration": 1, "start": "models/mine/dense.pt", "rule": "std",
                                 "s": {name: 0.5 for name in LAYERS}, "epochs": 1, "lr": 0.01}}
    (tmp / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return tmp


def run_stage(tmp: Path, user_dir: Path, script: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(user_dir), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
    return subprocess.run([sys.executable, str(ROOT / "stages" / script), *args], cwd=tmp, env=env,
                          capture_output=True, text=True)


def test_user_model_on_three_channel_data_through_every_stage_kind(tmp_path, user_module):
    tmp = project(tmp_path / "project", user_module, {"width": 8})
    for cmd in [["download.py", "--out", "data"], *stage_commands("mine", 1)]:
        proc = run_stage(tmp, user_module, *cmd)
        assert proc.returncode == 0, f"{cmd[0]}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    detail = json.loads((tmp / "plots/mine/final/detail.json").read_text())
    assert list(detail["layers"]) == LAYERS and detail["not_counted"] == {"features.1": 16}
    assert detail["test_dense"] > 0.6 and detail["test_pruned"] > 0.6  # learned: chance is 0.25
    # the file holds batch norm's tensors too: the decoded model scores what the pruned one does
    assert abs(detail["test_compressed"] - detail["test_pruned"]) < 0.05
    assert json.loads((tmp / "metrics/prune/mine-iter1.json").read_text())["kept"].keys() == set(LAYERS)
    report = (tmp / "reports/REPORT.md").read_text()
    assert "Not pruned, and not in the parameter, byte and FLOP counts: features.1 (16 parameters)" in report


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": 3}, r"error: model mine gives \(2, 3\) for a batch of 2 images; the data has 4 classes"),
    ({"in_channels": 1}, r"error: model mine does not take the data's images \(C, H, W\) = \(3, 32, 32\)"),
])
def test_a_model_that_does_not_fit_the_data_stops_pretrain_with_one_line(tmp_path, user_module, kwargs, message):
    tmp = project(tmp_path / "project", user_module, kwargs)
    assert run_stage(tmp, user_module, "download.py", "--out", "data").returncode == 0
    proc = run_stage(tmp, user_module, *stage_commands("mine", 1)[0])
    assert proc.returncode == 1
    import re
    assert re.search(message, proc.stderr.strip().splitlines()[-1]), proc.stderr
    assert "epoch" not in proc.stdout and not (tmp / "models/mine/dense.pt").exists()
