"""What identifies a dataset before it is fetched: the built-in ones (mnist, fashion-mnist, kmnist)
and the user's, their four IDX files, their md5s and where they lie under the data root
(<root>/<directory>/raw, torchvision's layout: MNIST, FashionMNIST, KMNIST for the built-ins, the
dataset's name for another)."""
import hashlib
from dataclasses import dataclass
from pathlib import Path

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SOURCES = ("auto", "torchvision", "pypi", "url", "local")


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
