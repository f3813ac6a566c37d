"""What a (pruned) model costs, layer by layer: parameters, bytes and FLOPs.

FLOPs follow Han et al. 2015: 2 per multiply-accumulate with a non-zero weight, per image.
A conv weight is applied once per output position (padding positions included, as is usual), at
the data's image size, found by running the model once (hooks on every Linear and Conv2d); a
grouped convolution's weight holds only its groups' connections, so the count stays right.
Biases, activations and pooling are not counted: the paper's columns (fc1 of LeNet-300-100:
235K weights, 470K FLOP) leave them out. Other layers with parameters (batch norm) are neither
pruned nor counted; summary() names them.
"""
import torch
from torch import nn

from .models import prunable_layers, unpruned_parameters

FLOAT_BYTES = 4
INDEX_BYTES = 4  # int32 column indices and row pointers in the CSR count


def output_positions(model: nn.Module, input_shape: tuple) -> dict[str, int]:
    """How many times each layer's weights are applied per image of shape input_shape (C, H, W):
    output H*W for conv, 1 for fc."""
    layers = prunable_layers(model)
    positions, hooks = {}, []
    for name, layer in layers.items():
        def hook(module, inputs, output, name=name):
            positions[name] = output[0, 0].numel() if isinstance(module, nn.Conv2d) else 1
        hooks.append(layer.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()
        model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    return positions


def layer_stats(model: nn.Module, input_shape: tuple) -> dict[str, dict]:
    positions = output_positions(model, input_shape)
    stats = {}
    for name, layer in prunable_layers(model).items():
        w = layer.weight.detach()
        weights, nonzero = w.numel(), int(torch.count_nonzero(w))
        rows = w.shape[0]
        bias = layer.bias.numel() if layer.bias is not None else 0
        bias_nonzero = int(torch.count_nonzero(layer.bias)) if bias else 0
        stats[name] = {
            "params": weights + bias,
            "nonzero": nonzero + bias_nonzero,
            "weights": weights,
            "weights_nonzero": nonzero,
            "kept": nonzero / weights,
            "bytes_dense": FLOAT_BYTES * (weights + bias),
            "bytes_nonzero": FLOAT_BYTES * (nonzero + bias_nonzero),
            "bytes_csr": (FLOAT_BYTES + INDEX_BYTES) * nonzero + INDEX_BYTES * (rows + 1) + FLOAT_BYTES * bias,
            "flops_dense": 2 * weights * positions[name],
            "flops_pruned": 2 * nonzero * positions[name],
        }
    return stats


def totals(layers: dict[str, dict]) -> dict:
    keys = ["params", "nonzero", "weights", "weights_nonzero", "bytes_dense", "bytes_nonzero",
            "bytes_csr", "flops_dense", "flops_pruned"]
    return {k: sum(l[k] for l in layers.values()) for k in keys}


def summary(dense: nn.Module, pruned: nn.Module, test_dense: float, test_pruned: float, input_shape: tuple) -> dict:
    """The evaluate stage's metrics: whole-model figures of both models and the pruned model's layers,
    and (if any) the layers with parameters that are not counted (name -> parameters)."""
    layers = layer_stats(pruned, input_shape)
    total_dense, total = totals(layer_stats(dense, input_shape)), totals(layers)
    out = {
        "test_dense": test_dense,
        "test_pruned": test_pruned,
        "params_dense": total_dense["params"],
        "params_nonzero": total["nonzero"],
        "compression": total_dense["params"] / total["nonzero"],
        "bytes_dense": total_dense["bytes_dense"],
        "bytes_nonzero": total["bytes_nonzero"],
        "bytes_csr": total["bytes_csr"],
        "flops_dense": total_dense["flops_dense"],
        "flops_pruned": total["flops_pruned"],
        "flops_kept": total["flops_pruned"] / total_dense["flops_dense"],
        "layers": layers,
    }
    uncounted = unpruned_parameters(pruned)
    if uncounted:
        out["not_counted"] = uncounted
    return out
