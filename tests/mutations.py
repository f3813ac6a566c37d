"""Mutation check of the test suite: each mutation is a regression that matters, applied as an exact
text replacement to one file of a scratch copy of the project; the tests chosen for it must fail.

    python tests/mutations.py [--only N ...] [--out tests/mutations.txt]

The scratch copy is a fresh git repository (tests/test_dag.py asks git which files are tracked) in a
temporary directory; each mutation's tests run there (`python -m pytest <tests> -x -q`), so they
import the scratch copy's code. Prints, per mutation, the first test that failed, or MISSED."""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", "__pycache__", ".venv", "mlruns", "mlflow.db*", ".pytest_cache", ".hypothesis")

# (what, file, [(old, new), ...], tests)
MUTATIONS = [
    ("pruning with one std over the whole model instead of per layer, in the prune stage", "stages/prune.py",
     [('prune_round(model, it.rule, values, ckpt["dense_std"])',
       'prune_round(model, it.rule, values, dict.fromkeys(ckpt["dense_std"], '
       'sum(ckpt["dense_std"].values()) / len(ckpt["dense_std"])))')],
     ["tests/test_stages.py::test_prune_thresholds_come_from_the_checkpoint_s_dense_std_per_layer_and_the_history_grows"]),
    ("pruned weights regrow during retraining (the mask is not applied in the forward pass)", "hanprune/train.py",
     [("    layers = list(prunable_layers(model).values())\n",
       "    layers = list(prunable_layers(model).values())\n"
       "    for m in layers:\n"
       "        for hook in m._forward_pre_hooks.values():\n"
       "            if hasattr(hook, 'apply_mask'):\n"
       "                hook.apply_mask = lambda module, name=hook._tensor_name: getattr(module, name + '_orig') * 1.0\n")],
     ["tests/test_pruning.py"]),
    ("conv FLOPs counted without the output's spatial size", "hanprune/measure.py",
     [("positions[name] = output[0, 0].numel() if isinstance(module, nn.Conv2d) else 1", "positions[name] = 1")],
     ["tests/test_models.py"]),
    ("Huffman decoding one bit off in the last byte", "hanprune/encoding.py",
     [("    del stream[n_bits:]\n", "    del stream[n_bits - 1:]\n")],
     ["tests/test_encoding.py"]),
    ("evaluate's test_pruned computed on the validation split", "stages/evaluate.py",
     [("pruned_acc = accuracy(pruned.to(device), *splits.test)", "pruned_acc = accuracy(pruned.to(device), *splits.val)")],
     ["tests/test_stages.py::test_evaluate_scores_the_test_split_and_counts_from_the_checkpoints"]),
    ("a dvc.yaml stage missing one code dep (evaluate without hanprune/measure.py)", "dvc.yaml",
     [("        - hanprune/measure.py\n        - hanprune/models.py\n        - hanprune/pruning.py\n"
       "        - hanprune/quantize.py\n",
       "        - hanprune/models.py\n        - hanprune/pruning.py\n        - hanprune/quantize.py\n")],
     ["tests/test_dag.py"]),
    ("the MLflow worker dropping every second metric", "hanprune/tracking.py",
     [("def _call(method: str, args: tuple, kwargs: dict):\n",
       "def _call(method: str, args: tuple, kwargs: dict):\n"
       "    if method == 'metrics':\n"
       "        _worker.metric_calls = getattr(_worker, 'metric_calls', 0) + 1\n"
       "        if _worker.metric_calls % 2 == 0:\n"
       "            return\n")],
     ["tests/test_tracking.py"]),
    ("the compressed file's codebooks and biases written as float16 even where that loses bits", "hanprune/encoding.py",
     [("if np.array_equal(values.astype(t).astype(np.float32), values, equal_nan=True)]", "if True]")],
     ["tests/test_encoding.py"]),
    ("the compressed file's filler symbol decoded at the end of the code table instead of at its rank",
     "hanprune/encoding.py",
     [("    return [*range(rank), k, *range(rank, k)][:n]\n", "    return [*range(k), k][:n]\n")],
     ["tests/test_encoding.py"]),
    ("a unit dropped as dead while some reader still has a connection from it", "hanprune/deadunits.py",
     [(".any(2).any(0)", ".any(2).all(0)")],
     ["tests/test_deadunits.py"]),
    ("the compressed file's unit bias taking a -0.0 bias of a unit not in use for +0.0", "hanprune/encoding.py",
     [("nonzero = bias.view(np.uint32) != 0", "nonzero = bias != 0")],
     ["tests/test_encoding.py"]),
    ("decode's Shannon bound in nats instead of bits", "hanprune/__main__.py",
     [("np.log2(counts.sum() / counts)", "np.log(counts.sum() / counts)")],
     ["tests/test_quantize.py"]),
    ("the frontier naming a round a run does not have by each of its keys", "studies/frontier.py",
     [("gone = sorted(then.keys() - now.keys())", "gone = []")],
     ["tests/test_frontier.py"]),
]


def scratch_copy(where: Path) -> Path:
    copy = where / "project"
    shutil.copytree(ROOT, copy, ignore=IGNORE)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=m", "-c", "user.email=m@m", "commit", "-qm", "scratch"]):
        subprocess.run(cmd, cwd=copy, check=True, capture_output=True)
    return copy


def apply(copy: Path, path: str, replacements) -> str:
    target = copy / path
    original = text = target.read_text()
    for old, new in replacements:
        if text.count(old) != 1:
            raise SystemExit(f"mutation of {path}: {old!r} occurs {text.count(old)} times, expected once")
        text = text.replace(old, new)
    target.write_text(text)
    return original


def first_failure(output: str) -> str | None:
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return found and found[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", type=int, nargs="*", help="mutation numbers (1-based) to run; default all")
    ap.add_argument("--out", type=Path, help="also write the report here")
    args = ap.parse_args()
    lines, missed = [], 0
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        copy = scratch_copy(Path(tmp))
        for number, (what, path, replacements, tests) in enumerate(MUTATIONS, start=1):
            if args.only and number not in args.only:
                continue
            original = apply(copy, path, replacements)
            try:
                proc = subprocess.run([sys.executable, "-m", "pytest", *tests, "-x", "-q", "-p", "no:cacheprovider",
                                       "-o", "addopts=", "-rfE"], cwd=copy, capture_output=True, text=True)
            finally:
                (copy / path).write_text(original)
            failed = first_failure(proc.stdout)
            summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
            if proc.returncode == 0 or not failed:
                missed += 1
                line = f"{number}. {what} [{path}]: MISSED by {' '.join(tests)} ({summary})"
            else:
                line = f"{number}. {what} [{path}]: caught by {failed} ({summary})"
            print(line, flush=True)
            lines.append(line)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
