"""Which round goes on to weight sharing and evaluation, chosen on validation accuracy only."""


def select_round(rounds: list[dict], val_dense: float, max_drop: float) -> tuple[dict, bool]:
    """The most compressed round whose validation accuracy after retraining is at most max_drop
    below the dense model's, and True; if no round is, the least compressed one, and False.
    rounds: the checkpoints' history records (iteration, val_retrained, compression); the earlier
    round wins a tie."""
    held = [r for r in rounds if val_dense - r["val_retrained"] <= max_drop + 1e-9]
    if held:
        return max(held, key=lambda r: (r["compression"], -r["iteration"])), True
    return min(rounds, key=lambda r: (r["compression"], r["iteration"])), False
