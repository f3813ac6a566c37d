"""The whole params file at once, models and rules included: `python -m hanprune check`.

config.load checks what needs no model and no rule; each stage checks the part it runs (a stage
depends only on the code it executes). This puts the two together, so that one command finds every
problem before a pipeline run."""
from .config import ConfigError, Params, check_bits, rounds_of, suggest
from .models import ModelError, make, prunable_layers
from .rules import RULES, check_round, grid_of


def check(p: Params) -> None:
    """Raise ConfigError for the first problem of `p`: an architecture that cannot be built, bits
    that do not match the layers, a round's rule or values, a sensitivity grid."""
    for key, m in p.models.items():
        try:
            layers = list(prunable_layers(make(m.arch, m.kwargs)))
        except ModelError as e:
            raise ConfigError(f"{p.source}: models.{key}.arch: {e}") from None
        check_bits(p, key, layers)
        for it in rounds_of(p, key):
            check_round(f"{p.source}: prune.{key}-iter{it.iteration}", it, layers)
        used = sorted({it.rule for it in rounds_of(p, key)})
        if len(used) > 1:
            raise ConfigError(f"{p.source}: prune: the rounds of {key} use the rules {', '.join(used)}; use one (the "
                              "sensitivity scan, and a budget, are in the units of its values)")
        grid_of(RULES[used[0]], p.sensitivity, p.source)
    keys = list(dict.fromkeys(r.key for r in RULES.values()))
    for key in p.sensitivity:
        if key not in keys:
            raise ConfigError(f"{p.source}: sensitivity.{key}: unknown grid{suggest(key, keys)}; allowed: {', '.join(keys)}")
