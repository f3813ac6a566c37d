"""Dead units (Han et al. 2015, §3.4, "pruning neurons"): a unit (a Linear's output feature, a
Conv2d's output channel) whose every outgoing connection is pruned contributes nothing to the
model's output, so its incoming weights and its bias can go too, and the output stays the same bit
for bit (the next layer multiplies that unit by zeros, whatever finite value it holds).

Which layer reads a layer's units comes from the model's torch.fx graph: layer a feeds layer b when
a's output reaches b, and nothing else, through operations that act on each unit alone (PER_UNIT:
activations, pooling, batch norm, dropout, flatten from dim 1). Unit u of a is then the u-th slice
of b's input dimension (_unit_inputs). Where the graph cannot be traced, or a layer's output goes anywhere else
(a residual sum, two readers, the model's output), nothing of that layer is dropped."""
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .models import prunable_layers
from .quantize import QuantizedLayer

PER_UNIT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm1d,
                    nn.BatchNorm2d, nn.Dropout, nn.Identity)
PER_UNIT_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.relu, torch.sigmoid, torch.tanh,
                      F.max_pool2d, F.avg_pool2d, F.adaptive_max_pool2d, F.adaptive_avg_pool2d, F.dropout}
PER_UNIT_METHODS = {"relu", "sigmoid", "tanh"}


def _flattens_from_1(node: fx.Node, modules: dict) -> bool:
    """x.flatten(1), torch.flatten(x, 1) or nn.Flatten() (start_dim 1, end_dim -1)."""
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if (node.op, node.target) in (("call_method", "flatten"), ("call_function", torch.flatten)):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False


def _per_unit(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], PER_UNIT_MODULES) or _flattens_from_1(node, modules)
    if node.op == "call_function":
        return node.target in PER_UNIT_FUNCTIONS or _flattens_from_1(node, modules)
    return node.op == "call_method" and (node.target in PER_UNIT_METHODS or _flattens_from_1(node, modules))


def readers(model: nn.Module) -> dict[str, tuple[str, bool]]:
    """{layer a: (layer b, whether the path flattens)} for each prunable layer whose units only
    layer b reads (module docstring); {} where the model does not trace."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - a model fx cannot trace: no layer is known to feed another
        return {}
    modules = dict(model.named_modules())
    layers = set(prunable_layers(model))
    found = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in layers:
            continue
        path, flattened = node, False
        while len(path.users) == 1:
            (user,) = path.users
            if user.op == "call_module" and user.target in layers:
                found[node.target] = (user.target, flattened)
                break
            if not _per_unit(user, modules) or user.args[0] is not path or operator.countOf(user.args, path) != 1:
                break
            path, flattened = user, flattened or _flattens_from_1(user, modules)
    return found


def _unit_inputs(a: torch.Tensor, b: torch.Tensor, flattened: bool) -> torch.Tensor | None:
    """b's kept connections (bool, b's weight shape) grouped by a's units: (b's units, a's units, -1);
    None where b's input dimension is not a's units as this module knows them (a grouped conv, say).
    A Linear reads a Linear's units one to one, a Conv2d a Conv2d's channels, and a Linear a Conv2d's
    channels after a flatten, each channel's positions in a row."""
    units = a.shape[0]
    if (a.dim(), b.dim()) == (2, 2) and b.shape[1] == units or (a.dim(), b.dim()) == (4, 4) and b.shape[1] == units \
            or (a.dim(), b.dim()) == (4, 2) and flattened and b.shape[1] % units == 0:
        return b.reshape(b.shape[0], units, -1)
    return None


def dead_units(layers: dict[str, QuantizedLayer], feeds: dict[str, tuple[str, bool]]) -> dict[str, torch.Tensor]:
    """{layer: bool per unit} of the units whose every connection into the layer that reads them is
    pruned, or goes to a unit that is itself dead (repeated until nothing changes)."""
    dead = {}
    while True:
        found = {}
        for a, (b, flattened) in feeds.items():
            kept = layers[b].codes >= 0
            if b in dead:
                kept[dead[b]] = False
            grouped = _unit_inputs(layers[a].codes, kept, flattened)
            if grouped is not None and (unread := ~grouped.any(2).any(0)).any():
                found[a] = unread
        if found.keys() == dead.keys() and all(torch.equal(found[a], dead[a]) for a in found):
            return dead
        dead = found


def drop_dead_units(model: nn.Module, layers: dict[str, QuantizedLayer]) -> tuple[dict[str, QuantizedLayer], int]:
    """The layers with every dead unit's incoming weights pruned and its bias set to 0, and how many
    units that dropped; the model (made by the same arch) gives the same output with either."""
    dead = dead_units(layers, readers(model))
    out = dict(layers)
    for name, units in dead.items():
        layer = layers[name]
        codes = layer.codes.clone()
        codes[units] = -1
        bias = None if layer.bias is None else torch.where(units, torch.zeros(()), layer.bias)
        out[name] = QuantizedLayer(codes=codes, codebook=layer.codebook, bias=bias)
    return out, sum(int(units.sum()) for units in dead.values())
