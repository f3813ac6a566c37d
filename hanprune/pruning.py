"""Magnitude pruning after Han et al. 2015, on top of torch.nn.utils.prune.

A rule (hanprune/rules.py) only computes masks. Applying them, keeping pruned weights at zero
through training (weight = weight_orig * weight_mask, recomputed before every forward) and
combining masks across rounds is torch's re-parametrisation (prune.custom_from_mask); this module
adds the checkpoint format around it.
"""
import pickle
import re
import warnings

import torch
from torch import nn
from torch.nn.utils import prune

from .models import ModelError, architecture, make, prunable_layers
from .errors import HanpruneError, torch_text
from .finite import nonfinite

CHECKPOINT_FORMAT = 2  # format 1, read too, is the same without arch and kwargs


class PruningError(HanpruneError):
    pass


def weight_std(model: nn.Module) -> dict[str, float]:
    """Each prunable layer's weight std: in the dense model, the unit of the std rule's thresholds."""
    return {name: m.weight.detach().std().item() for name, m in prunable_layers(model).items()}


def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    layers = prunable_layers(model)
    for name, mask in masks.items():
        prune.custom_from_mask(layers[name], "weight", mask)


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight_mask.bool() for name, m in prunable_layers(model).items()
            if hasattr(m, "weight_mask")}


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the effective weights (pruned entries exactly zero), without torch's
    weight_orig / weight_mask re-parametrisation, loadable into the plain architecture."""
    out = {}
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("_mask"):
            continue
        if key.endswith("_orig"):
            key = key[: -len("_orig")]
            value = value * state[key + "_mask"]
        out[key] = value.detach().clone().cpu()
    return out


class CheckpointError(HanpruneError):
    pass


def checkpoint(model_key: str, arch: str, kwargs: dict, model: nn.Module, dense_std: dict[str, float],
               history: list[dict]) -> dict:
    """What a checkpoint holds: the model's key, the arch and kwargs that make it (models.make), the
    effective weights, the masks, the dense model's per-layer weight std (the unit of the pruning
    thresholds) and one record per prune round so far."""
    return {"format": CHECKPOINT_FORMAT, "model": model_key, "arch": arch, "kwargs": dict(kwargs),
            "state_dict": plain_state_dict(model), "masks": masks_of(model), "dense_std": dense_std,
            "history": history}


def load_checkpoint(path, model_key: str | None = None, arch: str | None = None, kwargs: dict | None = None):
    """Load a checkpoint written by this project (never executes pickled code: weights_only=True) and
    make its model with the arch and kwargs it names. model_key, and arch with kwargs, if given, are
    what the caller expects it to hold. Where both the caller and the checkpoint name the arch, the
    arch and kwargs must match and the key may differ: a study prunes the paper's run's dense model
    under a key of its own (studies/rules). A checkpoint of format 1 names no arch: its key must be
    model_key, and it is taken to hold `arch` with `kwargs`, else (models.architecture) its key's
    built-in architecture. Returns (model with masks attached, checkpoint dict)."""
    try:
        with warnings.catch_warnings():  # torch warns of a pickle protocol it does not write; refused below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found")
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler met more than tensors and plain data
        refused = re.search(r"GLOBAL (\S+)", str(e))
        raise CheckpointError(f"{path}: refused unread: it holds objects that a checkpoint of this project never "
                              "holds" + (f" (it calls {refused[1]})" if refused else f" ({torch_text(e)})")
                              + "; checkpoints come "
                              "from the pretrain, prune and quantize stages") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {torch_text(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (1, CHECKPOINT_FORMAT):
        raise CheckpointError(f"{path}: not a checkpoint of this project (format 1 or {CHECKPOINT_FORMAT})")
    entries = [("model", str), ("state_dict", dict), ("masks", dict), ("dense_std", dict), ("history", list)]
    for key, kind in entries + ([("arch", str), ("kwargs", dict)] if ckpt["format"] == CHECKPOINT_FORMAT else []):
        if not isinstance(ckpt.get(key), kind):
            raise CheckpointError(f"{path}: checkpoint entry {key!r} missing or not a {kind.__name__}")
    if model_key is not None and ckpt["model"] != model_key and (arch is None or ckpt.get("arch") is None):
        raise CheckpointError(f"{path}: holds model {ckpt['model']!r}, expected {model_key!r}")
    try:
        model = make(*architecture(ckpt["model"], ckpt.get("arch"), ckpt.get("kwargs"), arch, kwargs))
    except ModelError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not fit {ckpt['model']}: {torch_text(e)}") from None
    if bad := nonfinite(ckpt["state_dict"]):  # what a diverged training run leaves
        raise CheckpointError(f"{path}: refused: {bad}; the training that wrote it diverged (or the file was altered)")
    layers = prunable_layers(model)
    for name, mask in ckpt["masks"].items():
        if name not in layers:
            raise CheckpointError(f"{path}: mask for unknown layer {name!r}; layers: {', '.join(layers)}")
        if mask.shape != layers[name].weight.shape:
            raise CheckpointError(f"{path}: mask of {name} has shape {tuple(mask.shape)}, "
                                  f"weight has {tuple(layers[name].weight.shape)}")
    attach_masks(model, {k: v.float() for k, v in ckpt["masks"].items()})
    return model, ckpt
