"""Tiny generated MNIST-like data and a params.yaml for it, so the pipeline runs in seconds."""
import hashlib
from pathlib import Path

import numpy as np
import yaml

from hanprune.data import idx_images, idx_labels


def write_tiny_mnist(directory: Path, n_train=600, n_test=200, seed=0) -> dict[str, str]:
    """Each class is a fixed random blob pattern plus noise (learnable). Returns file name -> md5."""
    rng = np.random.default_rng(seed)
    patterns = rng.random((10, 28, 28)) > 0.7
    directory.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        labels = rng.integers(0, 10, n)
        images = patterns[labels] * 200 + rng.integers(0, 55, (n, 28, 28))
        for name, blob in [(f"{prefix}-images-idx3-ubyte", idx_images(images)),
                           (f"{prefix}-labels-idx1-ubyte", idx_labels(labels))]:
            (directory / name).write_bytes(blob)
            md5[name] = hashlib.md5(blob).hexdigest()
    return md5


def tiny_params(params_file: Path, local_dir: Path, md5: dict, iterations: dict[str, int]) -> dict:
    """The project's params.yaml shrunk to 1-epoch runs on the tiny data, with `iterations[model]`
    prune rounds per model (models not listed are dropped)."""
    p = yaml.safe_load(params_file.read_text())
    p["data"].update(source="local", local_dir=str(local_dir), md5=md5, val_size=100)
    p["run"]["threads"] = 2  # the thread count of the real pipeline: thread-order effects show
    p["models"] = {k: v for k, v in p["models"].items() if k in iterations}
    for key, n in iterations.items():
        p["models"][key]["pretrain"].update(epochs=6, batch_size=32)  # enough to learn the tiny data
        p["models"][key]["retrain"].update(epochs=1, batch_size=32)
        p["models"][key]["quantize"]["finetune"].update(epochs=1, batch_size=32)
        p["models"][key]["final"] = f"models/{key}/iter{n}.pt"
    prune = {}
    for key, it in p["prune"].items():
        if it["model"] in iterations and it["iteration"] <= iterations[it["model"]]:
            prune[key] = {**it, "epochs": 1}
    p["prune"] = prune
    return p
