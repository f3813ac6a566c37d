"""Which round goes on to weight sharing and evaluation, chosen on validation accuracy only.

A round is as good as the dense model when its validation accuracy is below the dense model's by
no more than the validation split's noise: `noise` binomial standard errors of the dense model's
accuracy a on n validation images, tolerance(a, n, noise) = noise * sqrt(a (1 - a) / n). With
noise 2 and 5,000 images at a = 0.9926 (0.74% error), that is 0.24 points. A round's figure is one
draw of that noise, so a rule tighter than it picks rounds by chance, not by quality."""
import math

from .errors import HanpruneError


def tolerance(val_dense: float, n: int, noise: float) -> float:
    """noise standard errors of a binomial accuracy val_dense measured on n images."""
    return noise * math.sqrt(val_dense * (1 - val_dense) / n)


def select_round(rounds: list[dict], val_dense: float, max_drop: float,
                 max_error: float | None = None) -> tuple[dict, bool]:
    """The most compressed round whose validation accuracy after retraining is at most max_drop
    below the dense model's (and whose validation error is at most max_error, if given), and True;
    if no round is, the least compressed one, and False. rounds: the checkpoints' history records
    (iteration, val_retrained, compression); the earlier round wins a tie."""
    held = [r for r in rounds if val_dense - r["val_retrained"] <= max_drop + 1e-9
            and (max_error is None or 1 - r["val_retrained"] <= max_error + 1e-9)]
    if held:
        return max(held, key=lambda r: (r["compression"], -r["iteration"])), True
    return min(rounds, key=lambda r: (r["compression"], r["iteration"])), False


class ChanceLevelError(HanpruneError):
    """A model that goes on (select, quantize, evaluate) predicts no better than chance."""


CHANCE_MARGIN = 0.05  # a model whose accuracy is at most 1 / classes + this is at chance level


def classes_of(model) -> int:
    """The number of classes a model tells apart: the outputs of its last Linear or Conv2d layer
    (check_fits held it to the data's classes when the dense model was trained)."""
    from .models import prunable_layers
    return list(prunable_layers(model).values())[-1].weight.shape[0]


def refuse_chance_level(what: str, accuracy: float, classes: int, advice: str) -> None:
    """ChanceLevelError when `accuracy` (a validation accuracy) is at chance level for `classes`
    classes: at most 1 / classes + CHANCE_MARGIN (0.15 for ten). Such a model learned nothing, or
    lost it: no stage may take it as a result."""
    limit = 1 / classes + CHANCE_MARGIN
    if accuracy <= limit:
        raise ChanceLevelError(f"{what}: validation accuracy {accuracy:.4f} is at chance level ({classes} classes: "
                               f"at most 1/{classes} + {CHANCE_MARGIN:g} = {limit:.4f}); {advice}; nothing written")
