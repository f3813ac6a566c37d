"""The pruning rules a round may use, and the sensitivity scan in each rule's units.

A rule is a torch.nn.utils.prune.BasePruningMethod that only computes a mask (applying it,
keeping pruned weights at zero and combining rounds' masks is torch's), with the schema of its
params in a round (`prune.<model>-iter<k>`). RULES maps a round's `rule:` to both:

- std: |w| < s × std of the dense layer, s per layer (Han et al. 2015; pruning.StdThreshold).
- quantile: the fraction q of the layer's weights with the smallest |w|, q per layer, counted over
  the whole layer: q is the layer's pruned fraction after the round (the reference
  implementation's percentile rule), so a later round needs a larger q to prune more.
- global: one magnitude threshold over all prunable layers at once, set so that the fraction q of
  all their weights is pruned after the round; one q.

Adding a rule: its mask class, its schema (one field: the values, named as the sensitivity grid
that holds them), a function that applies it to a model's layers, how a budget's scale scales its
values (_times for a threshold, _compounded for a fraction), and one line in RULES.
"""
import copy
import math
from dataclasses import dataclass
from typing import Annotated, Callable

from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils import prune

from .errors import HanpruneError
from .models import prunable_layers


class PruningError(HanpruneError):
    pass


class StdThreshold(prune.BasePruningMethod):
    """Remove weights with |w| < s * std, where std is the standard deviation of the layer's
    weights in the dense, pretrained model (so s is an absolute threshold across rounds: a round
    with a larger s prunes more). Chained after an earlier mask, torch's PruningContainer passes
    only the surviving entries here; pruned weights stay pruned."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, s: float, std: float):
        if not s >= 0:
            raise ValueError(f"s must be >= 0, got {s}")
        self.threshold = s * std

    def compute_mask(self, t, default_mask):
        return default_mask * (t.abs() >= self.threshold).to(default_mask.dtype)


def weight_std(model: nn.Module) -> dict[str, float]:
    return {name: m.weight.detach().std().item() for name, m in prunable_layers(model).items()}


def prune_by_std(model: nn.Module, s: dict[str, float], std: dict[str, float]) -> None:
    """One prune round. Refuses (PruningError, model untouched) an s that would leave a layer
    with no weights at all: retraining a dead network would only waste the epochs."""
    layers = prunable_layers(model)
    for name, value in s.items():
        m = layers[name]
        w = m.weight_orig[m.weight_mask.bool()] if hasattr(m, "weight_mask") else m.weight  # the survivors
        largest = w.detach().abs().max().item() if w.numel() else 0.0
        if value * std[name] > largest:
            allowed = math.floor(largest / std[name] * 1000) / 1000
            raise PruningError(f"s.{name} = {value:g} removes every remaining weight of {name} (threshold "
                               f"{value * std[name]:.4g} > largest |w| {largest:.4g}); allowed: s <= {allowed:g}")
    for name, value in s.items():
        StdThreshold.apply(layers[name], "weight", s=value, std=std[name])


ALL = "all"  # the layer name of the global rule's scan rows: every prunable layer at once


class Quantile(prune.BasePruningMethod):
    """Prune the smallest |w| until q × total (rounded half up) of the layer's `total` weights are pruned.
    Chained after an earlier mask, torch passes only the survivors: the pruned count includes the
    earlier rounds', so q is the total pruned fraction. Ties in |w| are broken by position (the
    earlier flat index goes first), so the mask is the same on every run."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, q: float, total: int):
        if not 0 <= q <= 1:
            raise ValueError(f"q must be in 0..1, got {q}")
        self.q, self.total = q, total

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        alive = default_mask.flatten().nonzero().squeeze(1)
        more = math.floor(self.q * self.total + 0.5) - (self.total - alive.numel())
        if more > 0:
            order = t.flatten()[alive].abs().argsort(stable=True)
            mask.view(-1)[alive[order[:more]]] = 0
        return mask


class GlobalMagnitude(Quantile):
    """Quantile over the concatenation of every prunable layer's weights (torch's
    prune.global_unstructured hands it that vector): one threshold for all layers."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Fraction = Annotated[float, Field(ge=0, lt=1)]


class StdParams(Strict):
    s: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict,
                                                         description="per layer: prune |w| < s × dense std")


class QuantileParams(Strict):
    q: dict[str, Fraction] = Field(default_factory=dict, description="per layer: pruned fraction after the round")


class GlobalParams(Strict):
    q: Fraction | None = Field(None, description="pruned fraction of all prunable weights after the round")


def _std(layers: dict[str, nn.Module], s: dict[str, float], std: dict[str, float]) -> None:
    for name, value in s.items():
        StdThreshold.apply(layers[name], "weight", s=value, std=std[name])


def _quantile(layers: dict[str, nn.Module], q: dict[str, float], std: dict[str, float]) -> None:
    for name, value in q.items():
        Quantile.apply(layers[name], "weight", q=value, total=layers[name].weight.numel())


def _global(layers: dict[str, nn.Module], q: float, std: dict[str, float]) -> None:
    prune.global_unstructured([(m, "weight") for m in layers.values()], GlobalMagnitude, q=q,
                              total=sum(m.weight.numel() for m in layers.values()))


def _times(value: float, factor: float) -> float:
    """A threshold (s) scales linearly (rounded to 6 decimals)."""
    return round(value * factor, 6)


def _compounded(value: float, factor: float) -> float:
    """A pruned fraction (q) scales as repeated pruning: the kept fraction 1 - q to the power
    factor, so factor 2 prunes q of the survivors once more; rounded to 6 decimals and below 1."""
    return min(round(1 - (1 - value) ** factor, 6), 0.999999)


@dataclass(frozen=True)
class Rule:
    method: type[prune.BasePruningMethod]
    schema: type[Strict]  # one field: the values, named as the sensitivity grid (s, q)
    apply: Callable       # (layers, values, dense std) -> None; may empty a layer
    scale: Callable       # (value, a budget's scale) -> value

    @property
    def key(self) -> str:
        return next(iter(self.schema.model_fields))

    @property
    def per_layer(self) -> bool:
        return getattr(self.schema.model_fields[self.key].annotation, "__origin__", None) is dict


RULES = {
    "std": Rule(StdThreshold, StdParams, _std, _times),
    "quantile": Rule(Quantile, QuantileParams, _quantile, _compounded),
    "global": Rule(GlobalMagnitude, GlobalParams, _global, _compounded),
}


def prune_round(model: nn.Module, rule: str, values, dense_std: dict[str, float]) -> None:
    """One prune round by `rule` with its values (per layer, or one for global). Refuses
    (PruningError, model untouched) values that would leave a layer with no weights at all."""
    if rule == "std":  # its own check names the largest s that keeps a weight
        return prune_by_std(model, values, dense_std)
    r = RULES[rule]
    trial = _shadow(prunable_layers(model))
    r.apply(trial, values, dense_std)
    emptied = [name for name, m in trial.items() if hasattr(m, "weight_mask") and not m.weight_mask.any()]
    if emptied:
        where = f"{r.key}.{emptied[0]}" if r.per_layer else r.key
        value = values[emptied[0]] if r.per_layer else values
        raise PruningError(f"{where} = {value:g} removes every weight of {', '.join(emptied)} (rule {rule}); "
                           f"allowed: a smaller {r.key}")
    r.apply(prunable_layers(model), values, dense_std)


def _shadow(layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Stand-ins holding a copy of each layer's weight and mask, to try a rule on (a pruned model
    cannot be deep-copied: its weight is computed from weight_orig and the mask)."""
    out = {}
    for name, m in layers.items():
        holder = nn.Module()
        holder.weight = nn.Parameter(m.weight.detach().clone())  # what torch's apply ranks
        if hasattr(m, "weight_mask"):
            prune.custom_from_mask(holder, "weight", m.weight_mask.detach().clone())
        out[name] = holder
    return out


def scan(model: nn.Module, rule: str, grid: list[float], score) -> list[dict]:
    """The paper's Figure 6 in the rule's units: prune one layer at a time (for global: all layers
    at once, layer ALL) at each grid value, no retraining, and score the model. Returns rows of
    layer, value (under the rule's key: s or q), kept fraction of what was pruned and the score."""
    r = RULES[rule]
    std = weight_std(model)
    groups = {name: [name] for name in prunable_layers(model)} if r.per_layer else {ALL: list(prunable_layers(model))}
    rows = []
    for label, names in groups.items():
        for value in grid:
            pruned = copy.deepcopy(model)
            layers = prunable_layers(pruned)
            r.apply(layers, {names[0]: value} if r.per_layer else value, std)  # may empty a layer
            if r.per_layer:
                kept = layers[names[0]].weight_mask.mean().item()
            else:
                kept = sum(layers[n].weight_mask.sum().item() for n in names) / sum(layers[n].weight.numel() for n in names)
            rows.append({"layer": label, r.key: value, "kept": kept, "score": score(pruned)})
    return rows


class ScheduleError(HanpruneError):
    pass


def from_budget(scan_rows: list[dict], rule: str, max_drop: float, scale: float) -> dict[str, float]:
    """Per scanned layer (or ALL): the largest grid value up to which every grid value's validation
    accuracy is at most max_drop below the accuracy at value 0 (the dense model), scaled by the
    rule's own scale (s times scale; q compounded: 1 - (1 - q) ** scale).
    scan_rows: dicts with layer, the rule's key (s or q), val_accuracy (as in the CSV)."""
    r = RULES[rule]
    key, chosen = r.key, {}
    for layer in dict.fromkeys(r["layer"] for r in scan_rows):
        points = sorted((float(r[key]), float(r["val_accuracy"])) for r in scan_rows if r["layer"] == layer)
        dense = dict(points).get(0.0)
        if dense is None:
            raise ScheduleError(f"the scan of {layer} has no {key} = 0 (the dense model's accuracy)")
        best = 0.0
        for value, acc in points:
            if dense - acc > max_drop + 1e-9:
                break
            best = value
        chosen[layer] = r.scale(best, scale)
    return chosen


def round_values(rule: str, given, budget, scan_rows: list[dict]):
    """A round's values: those given in params, and for a budget (an object with max_drop and
    scale) the scan's choice for every layer they leave out. Returns (values, the layers the
    budget set)."""
    if budget is None:
        return given, []
    r = RULES[rule]
    chosen = from_budget(scan_rows, rule, budget.max_drop, budget.scale)
    if not r.per_layer:
        return (given, []) if given is not None else (chosen[ALL], [ALL])
    return {**chosen, **given}, [layer for layer in chosen if layer not in given]
