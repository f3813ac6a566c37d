"""Weight sharing after Deep Compression (Han, Mao & Dally 2016), on a pruned model.

Per layer, the surviving weights are clustered by 1-D k-means into 2**bits shared values (linear
initialisation over [min, max], as the paper recommends: it keeps the rare large weights). Each
weight then stores only its cluster's code. Fine-tuning trains the shared values: the layer's
weight becomes a function of the codebook (a torch parametrization), so autograd gives each
codebook entry the sum of its members' gradients, exactly the paper's centroid update, while the
codes and the sparsity pattern stay fixed. After fine-tuning, the shared values and the biases are
rounded to half precision (round_to_half), as the compressed file stores them.
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .models import prunable_layers
from .pruning import CheckpointError, load_checkpoint

KMEANS_MAX_ITERATIONS = 100


@dataclass(eq=False)
class QuantizedLayer:
    """A weight as Deep Compression stores it: a code per position (-1 = pruned), the codebook of
    shared values the codes index, and the raw bias."""
    codes: torch.Tensor
    codebook: torch.Tensor
    bias: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        """codebook[codes] where a weight survives, exactly 0.0 where it is pruned (float32)."""
        weight = torch.zeros(self.codes.shape, dtype=torch.float32)
        kept = self.codes >= 0
        weight[kept] = self.codebook[self.codes[kept]]
        return weight


def kmeans_1d(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm in one dimension from k centroids spaced linearly over [min, max].
    Returns (codebook, codes); an entry no value is nearest to keeps its initial position."""
    values = values.double()
    codebook = torch.linspace(values.min().item(), values.max().item(), k, dtype=torch.float64)
    codes = None
    for _ in range(KMEANS_MAX_ITERATIONS):
        # The codebook stays sorted, so the nearest centroid is found between midpoints.
        new_codes = torch.searchsorted((codebook[1:] + codebook[:-1]) / 2, values)
        if codes is not None and torch.equal(new_codes, codes):
            break
        codes = new_codes
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, codes, values)
        counts = torch.bincount(codes, minlength=k)
        codebook = torch.where(counts > 0, sums / counts.clamp(min=1), codebook)
    return codebook.float(), codes


class _Lookup(torch.autograd.Function):
    """codebook[codes], whose backward sums each entry's gradient in a fixed order. On the CPU with
    bincount: indexing's own backward accumulates in parallel in whatever order threads finish, so
    two identical fine-tuning runs came out different in the last bits. On CUDA, where bincount
    with weights adds atomically (in no fixed order) and indexing's deterministic backward adds up
    each entry's members one after another (20 ms a step for lenet_300_100's 64 entries), as the
    product of the gradient with the codes' one-hot matrix (`members`)."""

    @staticmethod
    def forward(ctx, codebook, codes, members):
        ctx.save_for_backward(codes, members)
        ctx.k = len(codebook)
        return codebook[codes]

    @staticmethod
    def backward(ctx, grad):
        codes, members = ctx.saved_tensors
        if members is None:
            return torch.bincount(codes.flatten(), grad.flatten(), minlength=ctx.k).to(grad.dtype), None, None
        return members.t() @ grad.flatten(), None, None


class SharedWeight(nn.Module):
    """Parametrization: weight = codebook[codes] where codes >= 0, exactly zero where pruned."""

    def __init__(self, codes: torch.Tensor, codebook: torch.Tensor):
        super().__init__()
        self.register_buffer("codes", codes)
        self.codebook = nn.Parameter(codebook)
        self._members = None  # on CUDA: the one-hot matrix of the codes, made once per device

    def forward(self, _original):
        codes = self.codes.clamp(min=0)  # pruned entries (-1) get code 0, and where() zeroes them
        members = None
        if codes.device.type == "cuda":
            if self._members is None or self._members.device != codes.device:
                self._members = torch.nn.functional.one_hot(codes.flatten(), len(self.codebook)).float()
            members = self._members
        return torch.where(self.codes >= 0, _Lookup.apply(self.codebook, codes, members), 0.0)


def share_weights(model: nn.Module, bits: dict[str, int], masks: dict[str, torch.Tensor]) -> None:
    """Replace each layer's surviving weights (masks[layer] true) by 2**bits[layer] shared values,
    in place; pruned weights stay zero. Only codebooks and biases remain trainable."""
    for name, layer in prunable_layers(model).items():
        w = layer.weight.detach()
        survivors = masks[name].bool() if name in masks else torch.ones_like(w, dtype=torch.bool)
        codes = torch.full(w.shape, -1, dtype=torch.int64)
        codebook = torch.zeros(1)
        if survivors.any():
            codebook, codes[survivors] = kmeans_1d(w[survivors], 2 ** bits[name])
        parametrize.register_parametrization(layer, "weight", SharedWeight(codes, codebook), unsafe=True)
        layer.parametrizations.weight.original.requires_grad_(False)


def round_to_half(model: nn.Module) -> None:
    """Round each weight-shared layer's codebook and bias to the nearest float16 value, in place
    (they stay float32 tensors): the compressed file then stores them in 2 bytes each instead of 4
    (encoding.py, format version 4), and the model is exactly what the file holds."""
    with torch.no_grad():
        for layer in prunable_layers(model).values():
            for values in (layer.parametrizations.weight[0].codebook, layer.bias):
                if values is not None:
                    values.copy_(values.half().float())


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """The codes, codebooks and biases of a model prepared by share_weights."""
    out = {}
    for name, layer in prunable_layers(model).items():
        shared = layer.parametrizations.weight[0]
        out[name] = QuantizedLayer(codes=shared.codes.clone(), codebook=shared.codebook.detach().clone(),
                                   bias=None if layer.bias is None else layer.bias.detach().clone())
    return out


def load_quantized(path, model_key: str, arch: str | None = None,
                   kwargs: dict | None = None) -> tuple[nn.Module, dict[str, QuantizedLayer]]:
    """A checkpoint written by the quantize stage: (plain model with masks, its quantized layers).
    model_key, arch and kwargs as for load_checkpoint."""
    model, ckpt = load_checkpoint(path, model_key, arch, kwargs)
    entries = ckpt.get("quantized")
    if not isinstance(entries, dict) or set(entries) != set(prunable_layers(model)):
        raise CheckpointError(f"{path}: no codes and codebooks for every layer; is it the output of "
                              f"the quantize stage?")
    layers = {}
    for name, entry in entries.items():
        layer = QuantizedLayer(codes=entry["codes"].long(), codebook=entry["codebook"],
                               bias=ckpt["state_dict"].get(f"{name}.bias"))
        if not torch.equal(layer.weight(), ckpt["state_dict"][f"{name}.weight"]):
            raise CheckpointError(f"{path}: codes and codebook of {name} do not give its weights")
        layers[name] = layer
    return model, layers


def other_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a plain state dict that are not a prunable layer's weight or bias (batch
    norm's, say): what the compressed file stores as they are."""
    layers = {f"{name}.{what}" for name in prunable_layers(model) for what in ("weight", "bias")}
    return {k: v for k, v in state.items() if k not in layers}


def load_into(model: nn.Module, layers: dict[str, QuantizedLayer]) -> nn.Module:
    """Set a plain model's weights and biases from quantized layers (e.g. a decoded file)."""
    modules = prunable_layers(model)
    if set(layers) != set(modules):
        raise ValueError(f"layers {sorted(layers)} do not match the model's {sorted(modules)}")
    with torch.no_grad():
        for name, q in layers.items():
            module = modules[name]
            if tuple(q.codes.shape) != tuple(module.weight.shape):
                raise ValueError(f"{name}: shape {tuple(q.codes.shape)} does not fit the model's "
                                 f"{tuple(module.weight.shape)}")
            module.weight.copy_(q.weight())
            if (q.bias is None) != (module.bias is None) or (q.bias is not None and q.bias.shape != module.bias.shape):
                raise ValueError(f"{name}: bias does not fit the model")
            if q.bias is not None:
                module.bias.copy_(q.bias)
    return model
