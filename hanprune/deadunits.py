"""Dead units (Han et al. 2015, §3.4, "pruning neurons"): a unit (a Linear's output feature, a
Conv2d's output channel) whose every outgoing connection is pruned contributes nothing to the
model's output, so its incoming weights and its bias can go too, and the output stays the same bit
for bit (the next layer multiplies that unit by zeros, whatever finite value it holds).

Which layer reads a layer's units comes from the model's torch.fx graph: layer a feeds layer b when
a's output reaches b, and nothing else, through operations that act on each unit alone (PER_UNIT:
activations, pooling, batch norm, dropout, flatten from dim 1). Unit u of a is then the u-th slice
of b's input dimension. Where the graph cannot be traced, or a layer's output goes anywhere else
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


def readers(model: nn.Module) -> dict[str, str]:
    """{layer a: layer b} for each prunable layer whose units only layer b reads (module docstring);
    {} where the model does not trace."""
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
        path = node
        while len(path.users) == 1:
            (user,) = path.users
            if user.op == "call_module" and user.target in layers:
                found[node.target] = user.target
                break
            if not _per_unit(user, modules) or user.args[0] is not path or operator.countOf(user.args, path) != 1:
                break
            path = user
    return found


def dead_units(layers: dict[str, QuantizedLayer], feeds: dict[str, str]) -> dict[str, torch.Tensor]:
    """{layer: bool per unit} of the units whose every connection into the layer that reads them is
    pruned; a layer's units count as read by its reader as it is once its own dead units are dropped."""
    dead = {}
    for a in reversed(list(layers)):  # a reader's dead rows first: they may leave a's units unread
        b = feeds.get(a)
        if b is None:
            continue
        units = layers[a].codes.shape[0]
        kept = layers[b].codes >= 0
        if b in dead:
            kept[dead[b]] = False
        if kept.dim() < 2 or kept[0].numel() % units or (kept.dim() > 2 and kept.shape[1] != units):
            continue  # b's input dimension is not a's units (a grouped conv, say): leave a as it is
        dead[a] = ~kept.reshape(kept.shape[0], units, -1).any(2).any(0)
    return {a: d for a, d in dead.items() if d.any()}


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
