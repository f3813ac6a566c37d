"""A dataset on disk, verified, and served as in-memory tensors: train, validation and test splits.

A dataset's directory, raw_dir(root, name) (hanprune/datasets.py), holds its four IDX files
(hanprune/idx.py) and dataset.json, written with them by the download stage: the dataset's name,
each file's md5, the training images' per-channel mean and standard deviation (the normalisation
every stage uses) and the number of classes. Labels are class numbers 0..K-1.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .datasets import FILES, Spec, joint_md5, md5, raw_dir
from .errors import DataError
from .idx import IMAGE_MAGICS, LABEL_MAGIC, read_idx
from .io import write_bytes

INFO_FILE = "dataset.json"


@dataclass(frozen=True)
class Dataset:
    """A dataset on disk: its directory and what dataset.json there says of it. md5 is joint_md5
    of its four files."""
    raw: Path
    name: str
    title: str
    md5: str
    mean: list[float]
    std: list[float]
    classes: int


def write_raw(files: dict[str, bytes], root, spec: Spec) -> Dataset:
    """Write the four IDX files and dataset.json into raw_dir(root, spec.name); return the Dataset
    they make."""
    raw = raw_dir(root, spec.name)
    for name, blob in files.items():
        write_bytes(raw / name, blob)
    images = read_idx(raw / "train-images-idx3-ubyte", IMAGE_MAGICS)
    labels = read_idx(raw / "train-labels-idx1-ubyte", (LABEL_MAGIC,))
    stats = image_stats(images, labels)
    info = {"name": spec.name, "title": spec.title, "md5": {name: md5(files[name]) for name in FILES}, **stats}
    write_bytes(raw / INFO_FILE, (json.dumps(info, indent=2) + "\n").encode())
    return Dataset(raw, spec.name, spec.title, joint_md5(files[name] for name in FILES), **stats)


def image_stats(images: np.ndarray, labels: np.ndarray) -> dict:
    """Per-channel mean and standard deviation of the images scaled to [0, 1], to 4 significant
    digits (so MNIST's training images give the usual 0.1307 and 0.3081), and the number of classes."""
    per_channel = np.moveaxis(images.reshape(len(images), -1, *images.shape[-2:]), 1, 0)
    mean, std = [], []
    for c, values in enumerate(per_channel):
        m, sd = float(values.mean(dtype=np.float64)) / 255, float(values.std(dtype=np.float64)) / 255
        if sd == 0:
            raise DataError(f"channel {c} of the training images is constant: nothing to learn from it")
        mean.append(float(f"{m:.4g}"))
        std.append(float(f"{sd:.4g}"))
    return {"mean": mean, "std": std, "classes": int(labels.max()) + 1 if labels.size else 0}


def _info(path: Path) -> dict:
    """dataset.json, checked to hold what write_raw writes."""
    if not path.exists():
        raise DataError(f"{path}: missing; run the download stage (it writes the dataset's md5s and statistics)")
    try:
        info = json.loads(path.read_text())
        ok = ({"name", "title"} <= info.keys() and set(info["md5"]) == set(FILES)
              and len(info["mean"]) == len(info["std"]) >= 1 and info["classes"] >= 1)
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, a key missing, a wrong type
        ok = False
    if not ok:
        raise DataError(f"{path}: not the description the download stage writes (name, title, the md5 of each "
                        "of the four files, mean and std per channel, classes >= 1); run it again")
    return info


def verified(raw, name: str | None = None) -> Dataset:
    """The dataset in `raw`, each file read once and checked against the md5 that dataset.json
    recorded when the download stage verified it, and (given a name) checked to be `name`."""
    raw = Path(raw)
    info = _info(raw / INFO_FILE)
    if name is not None and info["name"] != name:
        raise DataError(f"{raw} holds {info['name']}, not {name} (data.name); run the download stage")

    def checked(file: str) -> bytes:
        if not (raw / file).exists():
            raise DataError(f"{raw / file}: missing; run the download stage")
        blob = (raw / file).read_bytes()
        if md5(blob) != info["md5"][file]:
            raise DataError(f"{raw / file}: md5 mismatch: expected {info['md5'][file]} ({INFO_FILE}), got "
                            f"{md5(blob)}; the file changed after download: re-run the download stage or `dvc checkout`")
        return blob

    stats = {k: info[k] for k in ("mean", "std", "classes")}
    return Dataset(raw, info["name"], info["title"], joint_md5(map(checked, FILES)), **stats)


def load_split(dataset: Dataset, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 (N, C, H, W), normalised per channel with the dataset's statistics, and
    labels as int64 (N,)."""
    raw, prefix = dataset.raw, "train" if train else "t10k"
    images = read_idx(raw / f"{prefix}-images-idx3-ubyte", IMAGE_MAGICS)
    labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte", (LABEL_MAGIC,))
    if len(images) != len(labels):
        raise DataError(f"{raw}: {len(images)} {prefix} images but {len(labels)} labels")
    if labels.size and labels.max() >= dataset.classes:
        raise DataError(f"{raw / f'{prefix}-labels-idx1-ubyte'}: label {int(labels.max())} out of range "
                        f"0..{dataset.classes - 1}")
    x = torch.from_numpy(images.copy()).float().div_(255)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[1] != len(dataset.mean):
        raise DataError(f"{raw / INFO_FILE}: statistics of {len(dataset.mean)} channels, the images have "
                        f"{x.shape[1]}; run the download stage again")
    for c, (mean, std) in enumerate(zip(dataset.mean, dataset.std)):
        x[:, c].sub_(mean).div_(std)
    return x, torch.from_numpy(labels.astype(np.int64))


class Splits:
    """Train / validation / test tensors. The validation images are carved from the training images
    with a seeded permutation; the test set is only used for reporting. input_shape (C, H, W) and
    classes say what a model must take and give."""

    def __init__(self, dataset: Dataset, val_size: int, val_seed: int):
        x, y = load_split(dataset, train=True)
        self.dataset = dataset
        self.input_shape = tuple(x.shape[1:])
        self.classes = dataset.classes
        if not 0 < val_size < len(x):
            raise DataError(f"data.val_size {val_size} must be between 1 and {len(x) - 1}")
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(val_seed))
        val, train = perm[:val_size], perm[val_size:]
        self.train = (x[train], y[train])
        self.val = (x[val], y[val])
        self.test = load_split(dataset, train=False)

    def to(self, device) -> "Splits":
        for name in ("train", "val", "test"):
            x, y = getattr(self, name)
            setattr(self, name, (x.to(device), y.to(device)))
        return self


def open_splits(root, cfg, device) -> Splits:
    """The dataset cfg.name (params' data section) under root, verified, split and moved to device."""
    return Splits(verified(raw_dir(root, cfg.name), cfg.name), cfg.val_size, cfg.val_seed).to(device)
