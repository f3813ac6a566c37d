"""benchmarks/results.json and benchmarks/RESULTS.md: folding measured figures in (from a run of
benchmarks/run.py, monitor.py's stages.json, or two benchmarks/pipeline.py workdirs from a GPU
machine) and rendering RESULTS.md from results.json. Reads and writes files only."""
import hashlib
import json
import platform
from pathlib import Path

from tabulate import tabulate

from hanprune import io


def update(out, change) -> str:
    """Apply change() to results.json in `out` (an empty one if there is none), write it and
    RESULTS.md again; return RESULTS.md's text."""
    path = Path(out) / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    change(results)
    io.write_json(path, results)
    text = render(results)
    io.write_text(Path(out) / "RESULTS.md", text)
    return text


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), which every figure names; the one place it is read."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def stage_figures(path: Path) -> dict:
    """What monitor.py measured of the full `dvc repro`: time, peak RSS and fixed cost per stage.
    stage_fixed_seconds is the largest fixed cost of a stage that trains (process start to first
    epoch, plus last epoch to exit); a stage without epochs is all work and start-up, and the
    shortest of those (stage_min_seconds) bounds what starting a stage costs."""
    run = json.loads(path.read_text())
    stages = run["stages"]
    training = [v["fixed_seconds"] for v in stages.values() if v.get("training_seconds")]
    return {"full_repro_seconds": run["wall_seconds"], "full_repro_command": run["command"], "full_repro_cpu": run.get("cpu"),
            "stage_seconds": {k: v["seconds"] for k, v in stages.items()},
            "stage_peak_rss_mb": {k: v["peak_rss_mb"] for k, v in stages.items()},
            "stage_fixed": {k: v["fixed_seconds"] for k, v in stages.items() if "fixed_seconds" in v},
            **({"stage_fixed_seconds": max(training)} if training else {}),
            "stage_min_seconds": min(v["seconds"] for v in stages.values())}


def tree_digests(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.md5(f.read_bytes()).hexdigest()
            for d in ("models", "metrics", "plots", "reports") for f in sorted((root / d).rglob("*")) if f.is_file()}


def pipeline_figures(a: Path, b: Path) -> dict:
    """Two workdirs of benchmarks/pipeline.py on the GPU: run A's time, stage by stage (and run B's),
    its headline metrics, and whether the files both runs wrote hold the same bytes."""
    timings = {name: json.loads((d / "timings.json").read_text()) for name, d in (("a", a), ("b", b))}
    digests_a, digests_b = tree_digests(a), tree_digests(b)
    both = sorted(digests_a.keys() & digests_b.keys())
    fixed = [t["fixed_seconds"] for t in timings["a"]["stages"].values()]
    return {"pipeline_seconds": timings["a"]["seconds"], "pipeline_complete": timings["a"].get("complete", True),
            "stages": timings["a"]["stages"], "stage_fixed_seconds": max(fixed),
            "run_b": {"seconds": timings["b"]["seconds"], "complete": timings["b"].get("complete", True),
                      "stages": timings["b"]["stages"]},
            "bit_identical": all(digests_a[k] == digests_b[k] for k in both), "files_compared": len(both),
            "files_differing": [k for k in both if digests_a[k] != digests_b[k]],
            "files_of_one_run_only": len(digests_a.keys() ^ digests_b.keys()),
            "metrics": {f.stem: json.loads(f.read_text()) for f in sorted((a / "metrics").glob("*.json"))}}


# --- RESULTS.md -----------------------------------------------------------------------------------

def table(rows, headers, floatfmt="g") -> str:
    """A GitHub Markdown table; floatfmt, one for all columns or one per column, formats the numbers."""
    return tabulate(rows, headers=headers, tablefmt="github", floatfmt=floatfmt)


def render(r: dict) -> str:
    """RESULTS.md: the CPU figures where results.json has them, then the GPU's."""
    sections = [cpu_training, numeric_modes, inference, pipeline] if "machine" in r else []
    sections += [gpu] if "gpu" in r else []
    return "\n".join(line for section in sections for line in section(r))


def cpu_training(r: dict) -> list[str]:
    m = r["machine"]
    return [
        "# Benchmark results", "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads; GEMM {r['gemm_gflops']:.1f} "
        f"GFLOP/s ({r['gemm_n']}x{r['gemm_n']} float32 matmul). Produced by `python benchmarks/run.py` on {r['date']}.",
        "", "## Training, one epoch at batch 64 (60,000 images)", "",
        "This project: `hanprune.train.fit` with the model's pretrain settings, including the random-shift "
        "augmentation, which the baseline does not do. Plain in-memory loop: the same model and optimiser on "
        "tensors in memory, shuffled, one gather per batch, nothing else: the floor for any loop in torch "
        "here. Bound: training FLOPs (3x the forward FLOPs) / GEMM rate.", "",
        table([[k, t["seconds_per_epoch"], t["plain_loop_seconds_per_epoch"], t["baseline_seconds_per_epoch"],
                f"{t['speedup_vs_baseline']:.1f}x", t["bound_seconds_per_epoch"], t["fraction_of_bound"]]
               for k, t in r["train"].items()],
              ["model", "this project (s)", "plain in-memory loop (s)", "torchvision DataLoader baseline (s)",
               "speed-up", "hardware bound (s)", "fraction of bound"], ".2f"), ""]


def numeric_modes(r: dict) -> list[str]:
    return [
        "## The portable numeric mode's cost", "",
        "One epoch of the same loop, each in its own process: the fast mode (torch's defaults: AVX-512 "
        "kernels where the CPU has them, oneDNN convolutions) against `run.portable: true` (AVX2 kernels, "
        "MKL's reproducible mode, oneDNN off, convolutions as a channels-last im2col and one GEMM: hanprune/kernels.py), "
        "which gives the same bytes on any x86-64 CPU with AVX2 (hanprune/runtime.py). GEMM: the rate of a "
        "square float32 matmul in the same process, in that mode: MKL_CBWR=COMPATIBLE, the one branch "
        "documented to give the same results on Intel and other CPUs, is what bounds the portable mode. "
        "Loop / plain: the project's loop (with its random shift) against the plain in-memory loop, in each "
        "mode (targets: cost at most +30%, loop at most 1.2x the plain loop).", "",
        table([[k, n["fast_seconds_per_epoch"], n["portable_seconds_per_epoch"], f"{100 * n['portable_cost']:+.0f}%",
                f"{n['fast_loop_over_plain']:.2f}x", f"{n['portable_loop_over_plain']:.2f}x",
                f"{n['fast_gemm_gflops']:.0f}", f"{n['portable_gemm_gflops']:.0f}"]
               for k, n in r["numerics"].items()],
              ["model", "fast mode (s)", "portable mode (s)", "cost", "loop / plain, fast", "loop / plain, portable",
               "GEMM fast (GFLOP/s)", "GEMM portable (GFLOP/s)"], ".2f"), ""]


VARIANTS = ("dense", "masked", "torch_csr", "scipy_csr", "numpy_dense", "numpy_scipy_csr")


def inference(r: dict) -> list[str]:
    rows = []
    for k, inf in r["inference"].items():
        for v in (v for v in VARIANTS if v in inf):
            b1 = inf[v]["batch1"]
            rows.append([k, v, f"{b1['median_ms']:.3f} / {b1['p95_ms']:.3f}", f"{inf[v]['batch1000_images_per_s']:.0f}"])
        rows.append([k, "**sparse vs dense**",
                     f"**{inf['batch1_speedup_sparse_vs_dense']:.2f}x** ({inf['best_sparse_batch1']})",
                     f"**{inf['batch1000_speedup_sparse_vs_dense']:.2f}x** ({inf['best_sparse_batch1000']})"])
        rows.append([k, "same engine, batch 1",
                     ", ".join(f"{n} {x:.2f}x" for n, x in inf["batch1_speedup_same_engine"].items()), ""])
    return [
        "## Inference, dense vs final pruned model", "",
        "Batch 1: median / p95 latency per image. Batch 1000: images per second. `torch_csr` and `scipy_csr` "
        "replace the Linear layers of the torch model with sparse kernels; convolutions stay dense. For "
        "lenet_300_100, `numpy_dense` and `numpy_scipy_csr` run the whole network in numpy (dense arrays with "
        "BLAS, or scipy CSR; for one image the CSR product is scipy's compiled `csr_matvec`), without torch's "
        "per-operator overhead. **sparse vs dense** compares the fastest sparse "
        "variant with dense torch, what a user switching would see; **same engine** compares each sparse "
        "variant with the dense model in its own engine, which is what sparsity alone buys.", "",
        table(rows, ["model", "variant", "batch 1 ms (median / p95)", "batch 1000 images/s"]), "",
        "Weight memory (KB): dense float32 vs CSR (float32 values, int32 indices and row pointers).", "",
        table([[k, inf["weights_bytes_dense"] / 1000, inf["weights_bytes_csr"] / 1000] for k, inf in r["inference"].items()],
              ["model", "dense", "CSR"], ".1f"), ""]


def pipeline(r: dict) -> list[str]:
    if "pipeline" not in r:
        return []
    pl = r["pipeline"]
    lines = ["## Pipeline", "", f"`dvc repro` with nothing stale: {pl['noop_repro_seconds']:.2f} s (median; target ≤ 5 s).", ""]
    if "stage_seconds" in pl:
        lines += [
            "The full `dvc repro` of the committed run"
            + (f" on the {pl['full_repro_cpu']}" if pl.get("full_repro_cpu") else "")
            + f", measured by `benchmarks/monitor.py` (`{pl['full_repro_command']}`"
            + ("; the first invocation ran every stage, the next ones re-ran what a params change made stale, and each "
               "stage's row is its last run" if " + " in pl["full_repro_command"] else "") + "): "
            f"{pl['full_repro_seconds']:.0f} s in all (target < 20 min), peak RSS of the largest stage "
            f"{max(pl['stage_peak_rss_mb'].values()):.0f} MB (target ≤ 2 GB). A stage's fixed cost is "
            "its time from process start to exit less its epochs: starting Python, imports, data, the "
            "evaluations and writing around the epochs, waiting for MLflow's worker. The largest of a "
            f"stage that trains: {pl.get('stage_fixed_seconds', float('nan')):.1f} s (target ≤ 2.5 s). "
            "A stage without epochs is all fixed cost by that measure, its work included; the "
            f"shortest took {pl.get('stage_min_seconds', float('nan')):.1f} s.", "",
            table([[k, s, pl.get("stage_fixed", {}).get(k), pl["stage_peak_rss_mb"][k]] for k, s in pl["stage_seconds"].items()],
                  ["stage", "seconds", "fixed (s)", "peak RSS (MB)"], ("", ".1f", ".1f", ".0f")), ""]
    return lines


def gpu(r: dict) -> list[str]:
    g = r["gpu"]
    cpu = r.get("train", {})
    lines = [
        "## GPU", "",
        f"{g['device']}, torch {g['torch']}, measured on that GPU on {g['date']} with the code and pipeline "
        f"of that date (kept when benchmarks/run.py re-measures the CPU figures) by `benchmarks/run.py "
        f"--device cuda` (which `benchmarks/gpu_check.sh` runs). float32 GEMM (8192², TF32 off): "
        f"{g['gemm_tflops']:.1f} TFLOP/s.", "",
        "One epoch of `hanprune.train.fit` (60,000 images, batch 64, the model's pretrain settings) with "
        "the full-batch step captured as a CUDA graph (median of epochs 2 on; epoch 1 holds the capture), "
        "without it (eager), and on the 2-core CPU above (fast mode).", "",
        table([[k, t["epoch_seconds"], t["eager_epoch_seconds"], t["first_epoch_seconds"],
                cpu[k]["seconds_per_epoch"] if k in cpu else None, f"{100 * t['fraction_of_gemm_rate']:.2f}%"]
               for k, t in g["train"].items()],
              ["model", "CUDA graph (s)", "eager (s)", "first epoch (s)", "CPU (s)", "of GEMM rate"],
              ("", ".3f", ".2f", ".2f", ".2f")), ""]
    if "pipeline_seconds" in g:
        b = g["run_b"]
        lines += [
            f"The whole pipeline run by `benchmarks/pipeline.py` without DVC or MLflow (run A): "
            f"{len(g['stages'])} stages in {g['pipeline_seconds']:.0f} s{'' if g['pipeline_complete'] else ' (cut short)'}; "
            f"the largest fixed cost of a stage (process start to exit, less its epochs) {g['stage_fixed_seconds']:.1f} s. "
            f"Run B: {len(b['stages'])} stages in {b['seconds']:.0f} s{'' if b['complete'] else ' (cut short)'}. "
            f"Of the {g['files_compared']} files of models/, metrics/, plots/ and reports/ compared between "
            f"the two runs (those both wrote and were kept), "
            + ("all hold the same bytes" if g["bit_identical"] else f"{len(g['files_differing'])} differ") + ".", "",
            table([[k, v["seconds"], v["training_seconds"], v["fixed_seconds"],
                    *((b["stages"][k]["seconds"], b["stages"][k]["fixed_seconds"]) if k in b["stages"] else (None, None))]
                   for k, v in g["stages"].items()],
                  ["stage", "A (s)", "A epochs (s)", "A fixed (s)", "B (s)", "B fixed (s)"], ".1f"), ""]
    return lines
