"""The three MNIST networks, and the way to any other: params.yaml names a model's architecture
(`models.<key>.arch`) as one of these or as an import path `package.module:Class` with `kwargs`.
One definition each; pruning is a mask attached from outside (see pruning.py), never a separate
class."""
import difflib
import importlib
import os
import traceback

import torch
from torch import nn
import torch.nn.functional as F

from .errors import HanpruneError

TORCH_DIR = os.path.dirname(torch.__file__) + os.sep  # where torch's own frames are


class LeNet300100(nn.Module):
    """784-300-100-10 multilayer perceptron (Han et al. 2015, Table 2)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x):
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Classic LeNet-5 as in the reference implementation: 6/16 conv, average pooling, 120/84/10 fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)   # 28x28 -> 28x28
        self.conv2 = nn.Conv2d(6, 16, 5)             # 14x14 -> 10x10
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5Caffe(nn.Module):
    """The paper's LeNet-5 (Caffe): conv 20/50 with max pooling, fc 500/10 (Han et al. 2015, Table 3)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)    # 28x28 -> 24x24
        self.conv2 = nn.Conv2d(20, 50, 5)   # 12x12 -> 8x8
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


MODELS = {  # the built-in architectures
    "lenet_300_100": LeNet300100,
    "lenet5": LeNet5,
    "lenet5_caffe": LeNet5Caffe,
}


class ModelError(HanpruneError):
    pass


def make(arch: str, kwargs: dict | None = None) -> nn.Module:
    """An instance of `arch`: a built-in name or `package.module:Class` (importable from the project
    root), called with `kwargs`."""
    if arch in MODELS:
        cls = MODELS[arch]
    elif ":" in arch:
        module, _, name = arch.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except ImportError as e:
            raise ModelError(f"arch {arch!r}: cannot import {module!r} ({e})") from None
        except AttributeError:
            raise ModelError(f"arch {arch!r}: module {module!r} has no {name!r}") from None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ModelError(f"arch {arch!r}: {name} is not an nn.Module class")
    else:
        close = difflib.get_close_matches(arch, list(MODELS), n=1)
        raise ModelError(f"unknown arch {arch!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; allowed: {', '.join(MODELS)}, or an import path package.module:Class")
    try:
        model = cls(**(kwargs or {}))
    except Exception as e:  # noqa: BLE001 - whatever the user's constructor raises
        raise ModelError(f"arch {arch!r}: {cls.__name__}(**{kwargs or {}}) failed: {type(e).__name__}: {e}") from None
    if not prunable_layers(model):
        raise ModelError(f"arch {arch!r}: {cls.__name__} has no nn.Linear or nn.Conv2d layer to prune")
    return model


def architecture(key: str, arch: str | None, kwargs: dict | None, expected_arch: str | None = None,
                 expected_kwargs: dict | None = None) -> tuple[str, dict]:
    """The (arch, kwargs) that make model `key` of a file (a checkpoint, a compressed file): the ones the
    file names, which must be the expected ones when those are given; for a file of an older format,
    which names none (arch None), the expected ones, else the key itself when it is a built-in
    architecture. ModelError otherwise."""
    expected = None if expected_arch is None else (expected_arch, dict(expected_kwargs or {}))
    if arch is not None:
        if expected is not None and expected != (arch, kwargs):
            raise ModelError(f"holds model {key} of arch {arch!r} with kwargs {kwargs}, expected arch "
                             f"{expected[0]!r} with kwargs {expected[1]}")
        return arch, kwargs
    if expected is not None:
        return expected
    if key in MODELS:
        return key, {}
    raise ModelError(f"of an older format, which does not name the architecture: model {key!r} is not built in "
                     f"({', '.join(MODELS)}); give the arch and kwargs it was made with (models.{key} of its "
                     "params file)")


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights are pruned: every Linear and Conv2d, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def unpruned_parameters(model: nn.Module) -> dict[str, int]:
    """Modules other than Linear and Conv2d that hold parameters (batch norm, say): name -> count.
    They are not pruned, and not counted in the paper's parameter and FLOP figures."""
    return {name: n for name, m in model.named_modules() if not isinstance(m, (nn.Linear, nn.Conv2d))
            if (n := sum(p.numel() for p in m.parameters(recurse=False)))}


def check_fits(model: nn.Module, key: str, input_shape: tuple, classes: int) -> None:
    """ModelError unless the model takes a batch of the data's images and gives one score per class.
    An error that one of torch's layers raises is a shape mismatch: the layer does not take what the
    images have become by then (channels, size). An error that the model's own code raises says so,
    with the traceback's frames outside torch."""
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device=device))
    except Exception as e:  # noqa: BLE001 - whatever the model's code or a torch layer raises
        frames = traceback.extract_tb(e.__traceback__)[1:]  # from the model's call on
        what = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
        if isinstance(e, RuntimeError) and frames and frames[-1].filename.startswith(TORCH_DIR):
            raise ModelError(f"model {key} does not take the data's images (C, H, W) = {tuple(input_shape)}: "
                             f"{what}") from None
        own = traceback.StackSummary.from_list([f for f in frames if not f.filename.startswith(TORCH_DIR)])
        raise ModelError(f"model {key}: its forward pass raised {what}, on a batch of 2 of the data's images "
                         f"(C, H, W) = {tuple(input_shape)}; in the model's code:\n"
                         + "".join(own.format()).rstrip()) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"model {key} gives {shape} for a batch of 2 images; the data has {classes} classes, "
                         f"so it must give (2, {classes})")
