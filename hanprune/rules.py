"""The pruning rules a round may use, and the mechanism they share.

A rule is one class: the name of its values in a round (`prune.<model>-iter<k>`) and in the
sensitivity grid (`key`), whether it takes a value per layer or one for all layers, the type of a
value, its default sensitivity grid, how a budget's scale scales a value, and `masks`, which
computes the masks of a round from the layers' surviving weights. Like torch.nn.utils.prune, the
rule only computes masks: applying them (torch's custom_from_mask, weight = weight_orig * mask),
refusing a round that would empty a layer, the sensitivity scan and the budget are shared here.

- std: |w| < s × std of the dense layer, s per layer (Han et al. 2015): an absolute threshold, so a
  later round needs a larger s to prune more.
- quantile: the fraction q of the layer's weights with the smallest |w|, q per layer, counted over
  the whole layer: q is the layer's pruned fraction after the round (the reference
  implementation's percentile rule).
- global: one magnitude threshold over all prunable layers at once, set so that the fraction q of
  all their weights is pruned after the round; one q.

Adding a rule: a subclass of Rule and one line in RULES (tests/test_rules.py shows one).
"""
import copy
import math
from typing import Annotated

import torch
from pydantic import Field, TypeAdapter, ValidationError
from torch import nn
from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

from .config import ConfigError, suggest
from .errors import HanpruneError
from .models import prunable_layers
from .pruning import PruningError, attach_masks, weight_std


class Rule:
    """A pruning rule. Subclasses set the class attributes and compute masks."""
    key: str                    # the name of its values in a round and in the sensitivity grid
    per_layer: bool             # a value per layer (a dict), or one value for all layers
    value: object               # the type of one value, with its bounds (pydantic)
    grid: list[float]           # the sensitivity scan's default values (must hold 0, the dense model)

    def masks(self, weights: dict[str, torch.Tensor], alive: dict[str, torch.Tensor], values,
              dense_std: dict[str, float]) -> dict[str, torch.Tensor]:
        """The masks after this round (1 keeps a weight) of the layers it prunes, from each layer's
        current weights and its current mask `alive` (all ones for a layer not yet pruned). A mask
        must keep no weight that `alive` dropped."""
        raise NotImplementedError

    def scale(self, value: float, factor: float) -> float:
        """A value times a budget's scale (a ramp over the rounds)."""
        raise NotImplementedError

    def allowed(self, survivors: torch.Tensor, dense_std: float) -> str:
        """What value would keep a weight of a layer whose surviving weights are `survivors`."""
        return f"a smaller {self.key}"


class Std(Rule):
    """Han et al. 2015: prune |w| < s × the dense layer's weight std."""
    key, per_layer = "s", True
    value = Annotated[float, Field(ge=0)]
    grid = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5]

    def masks(self, weights, alive, values, dense_std):
        for s in values.values():
            if not s >= 0:
                raise ValueError(f"s must be >= 0, got {s}")
        return {name: alive[name] * (weights[name].abs() >= s * dense_std[name]).to(alive[name].dtype)
                for name, s in values.items()}

    def scale(self, value, factor):
        return round(value * factor, 6)  # a threshold scales linearly

    def allowed(self, survivors, dense_std):
        largest = survivors.abs().max().item() if survivors.numel() else 0.0
        return f"s <= {math.floor(largest / dense_std * 1000) / 1000:g} (largest |w| {largest:.4g})"


def _smallest(weights: torch.Tensor, alive: torch.Tensor, q: float) -> torch.Tensor:
    """`alive` less the smallest surviving |w| until q × numel (rounded half up) are pruned in all.
    Ties in |w| are broken by position (the earlier flat index goes first): the same mask on every run."""
    mask = alive.clone(memory_format=torch.contiguous_format)  # view(-1) below: the logical order
    survivors = alive.flatten().nonzero().squeeze(1)
    more = math.floor(q * alive.numel() + 0.5) - (alive.numel() - survivors.numel())
    if more > 0:
        order = weights.flatten()[survivors].abs().argsort(stable=True)
        mask.view(-1)[survivors[order[:more]]] = 0
    return mask


class Quantile(Rule):
    """The fraction q of each layer's weights pruned after the round, smallest |w| first."""
    key, per_layer = "q", True
    value = Annotated[float, Field(ge=0, lt=1)]
    grid = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98]

    def masks(self, weights, alive, values, dense_std):
        return {name: _smallest(weights[name], alive[name], q) for name, q in values.items()}

    def scale(self, value, factor):
        """A pruned fraction scales as repeated pruning: the kept fraction 1 - q to the power factor
        (factor 2 prunes q of the survivors once more), rounded to 6 decimals and below 1."""
        return min(round(1 - (1 - value) ** factor, 6), 0.999999)


class Global(Quantile):
    """Quantile over all prunable layers' weights together: one threshold for all layers."""
    per_layer = False

    def masks(self, weights, alive, q, dense_std):
        names = list(weights)
        flat = _smallest(torch.cat([weights[n].flatten() for n in names]),
                         torch.cat([alive[n].flatten() for n in names]), q)
        return dict(zip(names, (part.view_as(alive[n]) for n, part in
                                zip(names, flat.split([alive[n].numel() for n in names])))))


RULES: dict[str, Rule] = {"std": Std(), "quantile": Quantile(), "global": Global()}
ALL = "all"  # the layer name of a one-value rule's scan rows: every prunable layer at once


def values_of(rule: Rule, given: dict):
    """The rule's values as a round gives them (the round's keys besides its own): a dict per
    layer, or one value (None when not given); pydantic checks their type and bounds."""
    raw = given.get(rule.key, {} if rule.per_layer else None)
    kind = dict[str, rule.value] if rule.per_layer else rule.value | None
    return TypeAdapter(kind).validate_python(raw)


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}


def check_round(where: str, it, layers: list[str] | None):
    """A round's rule, and its values against the rule's type and the model's layers, where given
    (`where` names the round in errors: prune.<model>-iter<k>). Returns (rule, values)."""
    if it.rule not in RULES:
        raise ConfigError(f"{where}.rule: unknown rule {it.rule!r}{suggest(it.rule, RULES)}; "
                          f"allowed: {', '.join(RULES)}")
    rule = RULES[it.rule]
    allowed = [*type(it).model_fields, rule.key]
    for extra in it.model_extra:
        if extra != rule.key:
            takes = f"; rule {it.rule} takes {rule.key}" if any(r.key == extra for r in RULES.values()) else ""
            raise ConfigError(f"{where}.{extra}: unknown key{suggest(extra, allowed)}{takes}; "
                              f"allowed: {', '.join(allowed)}")
    try:
        values = values_of(rule, it.model_extra)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in (rule.key, *err["loc"]))
        if err["type"] in _BOUNDS:
            bound = next(iter(err["ctx"].values()))
            raise ConfigError(f"{where}.{loc}: must be {_BOUNDS[err['type']]} {bound:g}, got {err['input']}") from None
        raise ConfigError(f"{where}.{loc}: {err['msg']} (got {err['input']!r})") from None
    if (not values if rule.per_layer else values is None) and it.budget is None:
        raise ConfigError(f"{where}: give {rule.key} ({'per layer' if rule.per_layer else 'one value'}) "
                          f"or a budget ({{max_drop: ..., scale: ...}})")
    if it.gradual is not None and (problem := _not_gradual(it.rule)):
        raise ConfigError(f"{where}.gradual: {problem}")
    for layer in values if rule.per_layer and layers is not None else []:
        if layer not in layers:
            raise ConfigError(f"{where}.{rule.key}.{layer}: no such layer in {it.model}; layers: "
                              f"{', '.join(layers)}" + suggest(layer, layers))
    return rule, values


def grid_of(rule: Rule, sensitivity: dict[str, list[float]], source: str = "params.yaml") -> list[float]:
    """The scan's grid: params' sensitivity.<key> (of the file `source`) where given, else the rule's own."""
    grid = sensitivity.get(rule.key, rule.grid)
    if 0 not in grid:
        raise ConfigError(f"{source}: sensitivity.{rule.key}: must hold 0 (the dense model, from which the scan's "
                          "accuracy drops are measured)")
    return grid


def _current(layers: dict[str, nn.Module]):
    """Each layer's effective weights and its mask (ones where it has none), detached."""
    alive = {n: m.weight_mask.detach() if hasattr(m, "weight_mask") else torch.ones_like(m.weight.detach())
             for n, m in layers.items()}
    # weight_orig * mask, not the weight attribute, which torch recomputes only at the next forward
    weights = {n: m.weight_orig.detach() * alive[n] if hasattr(m, "weight_orig") else m.weight.detach()
               for n, m in layers.items()}
    return weights, alive


def _checked_masks(model: nn.Module, r: Rule, values, dense_std: dict[str, float], rule_name: str):
    """The rule's masks for `values` on the model's current weights; PruningError (model untouched)
    where they would leave a layer with no weights."""
    weights, alive = _current(prunable_layers(model))
    masks = r.masks(weights, alive, values, dense_std)
    emptied = [name for name, mask in masks.items() if not mask.any()]
    if emptied:
        name = emptied[0]
        where, value = (f"{r.key}.{name}", values[name]) if r.per_layer else (r.key, values)
        survivors = weights[name][alive[name].bool()]
        raise PruningError(f"{where} = {value:g} removes every weight of {', '.join(emptied)} (rule {rule_name}); "
                           f"allowed: {r.allowed(survivors, dense_std.get(name, 1.0))}")
    return masks


def prune_round(model: nn.Module, rule: str | Rule, values, dense_std: dict[str, float]) -> None:
    """One prune round by `rule` (a name in RULES, or a Rule) with its values (per layer, or one).
    Refuses (PruningError, model untouched) values that would leave a layer with no weights."""
    r = RULES[rule] if isinstance(rule, str) else rule
    attach_masks(model, _checked_masks(model, r, values, dense_std, rule if isinstance(rule, str) else type(rule).__name__))


def _not_gradual(rule: str) -> str | None:
    """Why `rule` cannot prune gradually, or None."""
    if RULES[rule].key != "q":
        return (f"rule {rule} has no pruned fraction to ramp; allowed with gradual: "
                + ", ".join(n for n, r in RULES.items() if r.key == "q"))


class Gradual:
    """Gradual magnitude pruning (Zhu & Gupta 2017) inside one training run, for a rule whose values
    are pruned fractions (quantile, global). Called before every training step (train.fit's
    `before_step`): at steps every, 2 every, ... up to the ramp's end, each layer's (or, for global,
    all layers') pruned fraction is set by torch's cubic curve, torch.ao.pruning.CubicSL's
    sparsity_compute_fn, from the fraction the round starts at to the round's value, and the masks
    are recomputed from the current weights (a weight once pruned stays pruned). The masks are
    updated in place, so a captured CUDA graph reads them. Values that would empty a layer are
    refused (PruningError) before training."""

    def __init__(self, model: nn.Module, rule: str, values, dense_std: dict[str, float], steps: int, cfg):
        self.rule, self.name, self.values, self.dense_std = RULES[rule], rule, values, dense_std
        if problem := _not_gradual(rule):
            raise ConfigError(f"gradual: {problem}")
        self.model = model
        ramp = min(math.floor(cfg.ramp * steps), steps - 1)  # the last update comes before the last step
        self.updates = ramp // cfg.every
        if self.updates < 1:
            raise ConfigError(f"gradual.every: {cfg.every} steps is more than the ramp's {ramp} "
                              f"(ramp {cfg.ramp:g} of {steps} steps); allowed: every <= {ramp}")
        self.every = cfg.every
        _checked_masks(model, self.rule, values, dense_std, rule)  # the end point must not empty a layer
        layers = prunable_layers(model)
        alive = _current(layers)[1]
        attach_masks(model, {n: alive[n] for n, m in layers.items() if not hasattr(m, "weight_mask")})
        pruned = {n: 1 - a.sum().item() / a.numel() for n, a in alive.items()}
        self.start = ({n: pruned[n] for n in values} if self.rule.per_layer else
                      1 - sum(a.sum().item() for a in alive.values()) / sum(a.numel() for a in alive.values()))

    def at(self, update: int):
        """The values at the update-th of `updates` mask updates (0: where the round starts)."""
        def curve(s_0, s_f):  # a layer already past its value stays where it is (nothing regrows)
            return CubicSL.sparsity_compute_fn(min(s_0, s_f), s_f, update, 0, 1, self.updates)
        if self.rule.per_layer:
            return {n: curve(self.start[n], q) for n, q in self.values.items()}
        return curve(self.start, self.values)

    def __call__(self, step: int):
        update, rest = divmod(step, self.every)
        if rest or not 1 <= update <= self.updates:
            return
        masks = _checked_masks(self.model, self.rule, self.at(update), self.dense_std, self.name)
        layers = prunable_layers(self.model)
        with torch.no_grad():
            for name, mask in masks.items():
                layers[name].weight_mask.copy_(mask)


def scan(model: nn.Module, rule: str | Rule, grid: list[float], score) -> list[dict]:
    """The paper's Figure 6 in the rule's units: prune one layer at a time (for a one-value rule:
    all layers at once, layer ALL) at each grid value, no retraining, and score the model. Returns
    rows of layer, value (under the rule's key: s or q), kept fraction of what was pruned and the score."""
    r = RULES[rule] if isinstance(rule, str) else rule
    std = weight_std(model)
    names = list(prunable_layers(model))
    groups = {name: [name] for name in names} if r.per_layer else {ALL: names}
    rows = []
    for label, group in groups.items():
        for value in grid:
            pruned = copy.deepcopy(model)
            layers = prunable_layers(pruned)
            weights, alive = _current({n: layers[n] for n in group})
            masks = r.masks(weights, alive, {label: value} if r.per_layer else value, std)  # may empty a layer
            attach_masks(pruned, masks)
            kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())  # exact
            rows.append({"layer": label, r.key: value, "kept": kept, "score": score(pruned)})
    return rows


class ScheduleError(HanpruneError):
    pass


def from_budget(scan_rows: list[dict], rule: str | Rule, max_drop: float, scale: float) -> dict[str, float]:
    """Per scanned layer (or ALL): the largest grid value up to which every grid value's validation
    accuracy is at most max_drop below the accuracy at value 0 (the dense model), scaled by the
    rule's own scale. scan_rows: dicts with layer, the rule's key (s or q), val_accuracy (as in the CSV)."""
    r = RULES[rule] if isinstance(rule, str) else rule
    key, chosen = r.key, {}
    for layer in dict.fromkeys(row["layer"] for row in scan_rows):
        points = sorted((float(row[key]), float(row["val_accuracy"])) for row in scan_rows if row["layer"] == layer)
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


def round_values(rule: str | Rule, given, budget, scan_rows: list[dict]):
    """A round's values: those given in params, and for a budget (an object with max_drop and
    scale) the scan's choice for every layer they leave out. Returns (values, the layers the
    budget set)."""
    if budget is None:
        return given, []
    r = RULES[rule] if isinstance(rule, str) else rule
    chosen = from_budget(scan_rows, r, budget.max_drop, budget.scale)
    if not r.per_layer:
        return (given, []) if given is not None else (chosen[ALL], [ALL])
    return {**chosen, **given}, [layer for layer in chosen if layer not in given]
