"""Which tensor of a model or a file holds non-finite values (nan, inf): what a training run that
diverged leaves behind. Loading a checkpoint (pruning.load_checkpoint) or a compressed file
(encoding.read_compressed) refuses such weights, naming the first tensor that holds them."""
import torch


def nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """None when every floating-point tensor of `tensors` is finite; else a description of the
    first one (in the dict's order) that is not: its name, how many of its values are nan or inf,
    and the index of the first."""
    for name, t in tensors.items():
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            continue
        bad = ~torch.isfinite(t.detach())
        if bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0]) if t.dim() else ()
            nans, count = int(t.isnan().sum()), int(bad.sum())
            kinds = "nan" if nans == count else "inf" if nans == 0 else "nan and inf"
            where = f", the first at [{', '.join(map(str, first))}]" if first else ""
            return f"{name} holds {count} non-finite values ({kinds}) of {t.numel()}{where}"
    return None
