"""Benchmarks: training throughput against a plain torchvision baseline and the hardware bound,
dense vs pruned inference (masked and real sparse kernels), and pipeline overhead.

    python benchmarks/run.py                 # full run on real MNIST, writes results.json and RESULTS.md
    python benchmarks/run.py --quick ...     # one repetition of everything (the smoke test uses this)

The numeric mode (hanprune/runtime.py) is fixed when torch loads: this process runs in the fast mode,
and the portable mode's cost is measured in child processes, one epoch each (--epoch KEY [--portable]).

Everything is compared within one run on one machine: these machines are shared and noisy.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hanprune import runtime  # noqa: E402

runtime.configure("--portable" in sys.argv)
import numpy as np  # noqa: E402
import scipy.sparse  # noqa: E402
from scipy.sparse import _sparsetools  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from hanprune import config, data, io, measure  # noqa: E402
from hanprune.models import make as build, prunable_layers  # noqa: E402
from hanprune.pruning import load_checkpoint, plain_state_dict  # noqa: E402
from hanprune.train import fit  # noqa: E402


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def gemm_flops(n: int, reps: int) -> float:
    """FLOP/s of a large square float32 matmul (2 n^3 FLOPs), median of reps."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def train_epoch(model, batches) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    t = time.perf_counter()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def baseline_batches(dataset: data.Dataset):
    """The usual way: torchvision dataset, per-sample transforms, a DataLoader."""
    from torchvision import datasets, transforms

    class IDX(datasets.MNIST):  # torchvision's MNIST reader, pointed at the dataset's directory
        raw_folder = str(dataset.raw)

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(dataset.mean, dataset.std)])
    ds = IDX(dataset.raw, train=True, download=False, transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)


def in_memory_batches(x, y):
    """The plainest loop over tensors already in memory: a shuffled index, one gather per batch."""
    return ((x[idx], y[idx]) for idx in torch.randperm(len(x)).split(64))


def project_epoch(key, cfg, x, y) -> float:
    """One epoch of the project's own loop, hanprune.train.fit, with the model's pretrain settings
    (batch size, optimiser, augmentation), validating on a single image so that nearly all of the
    time is training."""
    cfg = cfg.model_copy(update={"epochs": 1})
    return fit(build(key), cfg, (x, y), (x[:1], y[:1]))[0]["seconds"]


def bench_training(key, cfg, dataset, x, y, reps, baseline_reps, flops_per_second, limit=None):
    torch.manual_seed(0)
    if limit:
        x, y = x[:limit], y[:limit]
    project = statistics.median(project_epoch(key, cfg, x, y) for _ in range(reps))
    plain = statistics.median(train_epoch(build(key), in_memory_batches(x, y)) for _ in range(reps))
    baseline_loader = baseline_batches(dataset)
    if limit:
        baseline_loader = [b for _, b in zip(range(limit // 64), baseline_loader)]
    baseline = statistics.median(train_epoch(build(key), baseline_loader) for _ in range(baseline_reps))
    forward = measure.totals(measure.layer_stats(build(key), tuple(x.shape[1:])))["flops_dense"]
    bound = 3 * forward * len(x) / flops_per_second  # forward + backward (2x forward) per image
    return {"seconds_per_epoch": project, "plain_loop_seconds_per_epoch": plain, "baseline_seconds_per_epoch": baseline,
            "speedup_vs_baseline": baseline / project, "bound_seconds_per_epoch": bound,
            "fraction_of_bound": bound / project, "images": len(x)}


def bench_numerics(key, args, reps) -> dict:
    """Seconds per epoch of the project's loop in the fast and the portable mode, each in a child
    process (median of reps): what run.portable costs."""
    def epoch(mode: list[str]) -> float:
        cmd = [sys.executable, __file__, "--epoch", key, "--data", args.data, "--params", args.params,
               "--threads", str(args.threads), *mode, *(["--quick"] if args.quick else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    fast = statistics.median(epoch([]) for _ in range(reps))
    portable = statistics.median(epoch(["--portable"]) for _ in range(reps))
    return {"fast_seconds_per_epoch": fast, "portable_seconds_per_epoch": portable, "portable_cost": portable / fast - 1}


class SparseLinear(nn.Module):
    """y = x W^T + b with W in torch's CSR layout: only the non-zero weights are stored and used."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = linear.bias.detach()

    def forward(self, x):
        return torch.sparse.mm(self.weight, x.t()).t() + self.bias


class ScipyLinear(nn.Module):
    """The same with scipy.sparse CSR (numpy in, numpy out, wrapped as tensors)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = scipy.sparse.csr_matrix(linear.weight.detach().numpy())
        self.bias = linear.bias.detach().numpy()

    def forward(self, x):
        return torch.from_numpy(np.asarray(self.weight @ x.numpy().T).T + self.bias)


class NumpyMLP:
    """The whole forward of lenet_300_100 (Linear layers, ReLU between them) in numpy, with the
    weights as dense arrays (BLAS) or as scipy CSR matrices: one engine for both, without torch's
    per-operator dispatch, so the ratio of the two is what sparsity alone buys at batch 1. For one
    image the CSR product calls scipy's compiled `csr_matvec` directly: `csr @ column` runs the
    multi-vector kernel, 3x slower for one column, after about 10 us of Python-level checks."""

    def __init__(self, model: nn.Module, sparse: bool):
        self.sparse = sparse
        self.layers = [(scipy.sparse.csr_matrix(l.weight.detach().numpy()) if sparse else l.weight.detach().numpy(),
                        l.bias.detach().numpy()[:, None]) for l in prunable_layers(model).values()]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x.numpy().reshape(len(x), -1).T  # features x batch
        for i, (w, b) in enumerate(self.layers):
            if self.sparse and h.shape[1] == 1:
                out = b.copy()  # y = b + W h, accumulated into a copy of the bias
                _sparsetools.csr_matvec(*w.shape, w.indptr, w.indices, w.data, h.ravel(), out.ravel())
                h = out
            else:
                h = w @ h + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0)
        return torch.from_numpy(np.ascontiguousarray(h.T))


def with_sparse_linears(model: nn.Module, kind) -> nn.Module:
    """A copy of `model` whose Linear layers use a sparse kernel; conv layers stay dense (torch
    has no sparse convolution on the CPU; at these sizes im2col + sparse GEMM does not pay)."""
    import copy
    model = copy.deepcopy(model)
    for name, layer in list(prunable_layers(model).items()):
        if isinstance(layer, nn.Linear):
            setattr(model, name, kind(layer))
    return model


def latency(model, images, calls):
    times = []
    with torch.no_grad():
        for i in range(calls):
            x = images[i % len(images)].unsqueeze(0)
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    times.sort()
    return {"median_ms": 1000 * times[len(times) // 2], "p95_ms": 1000 * times[int(0.95 * (len(times) - 1))]}


def throughput(model, images, reps):
    with torch.no_grad():
        model(images[:1000])
        t = statistics.median(_timed(model, images[:1000]) for _ in range(reps))
    return 1000 / t


def _timed(model, x):
    t = time.perf_counter()
    model(x)
    return time.perf_counter() - t


def bench_inference(key, dense_path, pruned_path, images, calls, reps):
    masked, _ = load_checkpoint(pruned_path, key)
    masked.eval()
    dense, _ = load_checkpoint(dense_path, key)
    dense.eval()
    plain = build(key).eval()
    plain.load_state_dict(plain_state_dict(masked))
    variants = {"dense": dense, "masked": masked,
                "torch_csr": with_sparse_linears(plain, SparseLinear),
                "scipy_csr": with_sparse_linears(plain, ScipyLinear)}
    sparse = ["torch_csr", "scipy_csr"]
    if all(isinstance(l, nn.Linear) for l in prunable_layers(plain).values()):
        variants.update(numpy_dense=NumpyMLP(dense, sparse=False), numpy_scipy_csr=NumpyMLP(plain, sparse=True))
        sparse.append("numpy_scipy_csr")
    with torch.no_grad():  # every variant computes the same function as its torch model
        for name, m in variants.items():
            ref = (dense if name.endswith("dense") else masked)(images[:100])
            assert torch.allclose(m(images[:100]).float(), ref, atol=1e-4), name
    out = {name: {"batch1": latency(m, images, calls), "batch1000_images_per_s": throughput(m, images, reps)}
           for name, m in variants.items()}
    best1 = min(sparse, key=lambda n: out[n]["batch1"]["median_ms"])
    best1000 = max(sparse, key=lambda n: out[n]["batch1000_images_per_s"])
    # each sparse kernel against the dense model in the same engine (numpy for numpy_*, else torch)
    dense_of = {n: "numpy_dense" if n.startswith("numpy_") else "dense" for n in sparse}
    stats = measure.totals(measure.layer_stats(plain, tuple(images.shape[1:])))
    out.update({
        "best_sparse_batch1": best1, "best_sparse_batch1000": best1000,
        "batch1_speedup_sparse_vs_dense": out["dense"]["batch1"]["median_ms"] / out[best1]["batch1"]["median_ms"],
        "batch1000_speedup_sparse_vs_dense": out[best1000]["batch1000_images_per_s"] / out["dense"]["batch1000_images_per_s"],
        "batch1_speedup_same_engine": {n: out[dense_of[n]]["batch1"]["median_ms"] / out[n]["batch1"]["median_ms"]
                                       for n in sparse},
        "weights_bytes_dense": stats["bytes_dense"], "weights_bytes_csr": stats["bytes_csr"],
    })
    return out


def bench_pipeline(reps):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        proc = subprocess.run(["dvc", "repro"], cwd=ROOT, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if "Running stage" in proc.stdout:
            raise SystemExit("benchmarks: the pipeline is not up to date; run `dvc repro` first")
    return {"noop_repro_seconds": statistics.median(times)}


def cuda_gemm_flops(device, n: int = 8192, reps: int = 10) -> float:
    """FLOP/s of a float32 matmul on the GPU (TF32 off, as in training), median of reps, timed with
    CUDA events, on random data."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * n ** 3 / statistics.median(times)


def bench_cuda_training(key, cfg, x, y, flops_per_second, epochs: int) -> dict:
    """Seconds per epoch of hanprune.train.fit on the GPU with the model's pretrain settings: the
    median over epochs 2.. (epoch 1 includes the CUDA graph's warm-up and capture), and one epoch
    of the same loop without the graph (eager)."""
    cfg = cfg.model_copy(update={"epochs": epochs})
    device = x.device
    graphed = [e["seconds"] for e in fit(build(key).to(device), cfg, (x, y), (x[:1], y[:1]), None, device)]
    eager = fit(build(key).to(device), cfg.model_copy(update={"epochs": 1}), (x, y), (x[:1], y[:1]), None,
                device, cuda_graphs=False)[0]["seconds"]
    seconds = statistics.median(graphed[1:])
    flops = 3 * measure.totals(measure.layer_stats(build(key).to(device), tuple(x.shape[1:])))["flops_dense"] * len(x)
    return {"epoch_seconds": seconds, "first_epoch_seconds": graphed[0], "eager_epoch_seconds": eager,
            "fraction_of_gemm_rate": flops / seconds / flops_per_second, "images": len(x)}


def tree_digests(root: Path) -> dict[str, str]:
    import hashlib
    return {str(f.relative_to(root)): hashlib.md5(f.read_bytes()).hexdigest()
            for d in ("models", "metrics", "plots", "reports") for f in sorted((root / d).rglob("*")) if f.is_file()}


def bench_cuda(args, params) -> dict:
    """The GPU figures (results.json `gpu`): device, GEMM rate and training epochs, and with
    --pipeline-runs A B, what pipeline_figures finds in two runs of benchmarks/pipeline.py."""
    device = torch.device("cuda")
    x, y = (t.to(device) for t in data.load_split(args.dataset, train=True))
    flops = cuda_gemm_flops(device)
    gpu = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "gemm_tflops": flops / 1e12, "train": {}}
    for key in args.models:
        print(f"cuda training {key} ...", flush=True)
        gpu["train"][key] = bench_cuda_training(key, params.models[key].pretrain, x, y, flops, 2 if args.quick else 4)
    if args.pipeline_runs:
        gpu.update(pipeline_figures(*(Path(p) for p in args.pipeline_runs)))
    return gpu


def pipeline_figures(a: Path, b: Path) -> dict:
    """Two workdirs of benchmarks/pipeline.py on the GPU: run A's time, stage by stage (and run B's),
    its headline metrics, and whether the files both runs wrote hold the same bytes. Reads files
    only, so it also folds in runs fetched from a GPU machine (--gpu-pipeline)."""
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


def stage_figures(path: Path) -> dict:
    """What monitor.py measured of the full `dvc repro`: time, peak RSS and fixed cost per stage.
    stage_fixed_seconds is the largest fixed cost of a stage that trains (process start to first
    epoch, plus last epoch to exit); a stage without epochs is all work and start-up, and the
    shortest of those (stage_min_seconds) bounds what starting a stage costs."""
    run = json.loads(path.read_text())
    stages = run["stages"]
    training = [v["fixed_seconds"] for v in stages.values() if v.get("training_seconds")]
    return {"full_repro_seconds": run["wall_seconds"], "full_repro_command": run["command"],
            "stage_seconds": {k: v["seconds"] for k, v in stages.items()},
            "stage_peak_rss_mb": {k: v["peak_rss_mb"] for k, v in stages.items()},
            "stage_fixed": {k: v["fixed_seconds"] for k, v in stages.items() if "fixed_seconds" in v},
            **({"stage_fixed_seconds": max(training)} if training else {}),
            "stage_min_seconds": min(v["seconds"] for v in stages.values())}


def update_results(out: str, change) -> None:
    """Apply change() to results.json in `out` (an empty one if there is none), write it and
    RESULTS.md again, and print the GPU section if there is one."""
    path = Path(out) / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    change(results)
    io.write_json(path, results)
    io.write_text(Path(out) / "RESULTS.md", render(results) if "machine" in results else "\n".join(render_gpu(results)))
    if "gpu" in results:
        print("\n".join(render_gpu(results)))


def render(r: dict) -> str:
    from tabulate import tabulate
    m = r["machine"]
    lines = ["# Benchmark results", "",
             f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads; "
             f"GEMM {r['gemm_gflops']:.1f} GFLOP/s ({r['gemm_n']}x{r['gemm_n']} float32 matmul). "
             f"Produced by `python benchmarks/run.py` on {r['date']}.", "",
             "## Training, one epoch at batch 64 (60,000 images)", "",
             "This project: `hanprune.train.fit` with the model's pretrain settings, including the random-shift "
             "augmentation, which the baseline does not do. Plain in-memory loop: the same model and optimiser on "
             "tensors in memory, shuffled, one gather per batch, nothing else: the floor for any loop in torch "
             "here. Bound: training FLOPs (3x the forward FLOPs) / GEMM rate.", ""]
    rows = [[k, f"{t['seconds_per_epoch']:.2f}", f"{t['plain_loop_seconds_per_epoch']:.2f}",
             f"{t['baseline_seconds_per_epoch']:.2f}", f"{t['speedup_vs_baseline']:.1f}x",
             f"{t['bound_seconds_per_epoch']:.2f}", f"{t['fraction_of_bound']:.2f}"]
            for k, t in r["train"].items()]
    lines += [tabulate(rows, headers=["model", "this project (s)", "plain in-memory loop (s)",
                                      "torchvision DataLoader baseline (s)", "speed-up", "hardware bound (s)",
                                      "fraction of bound"], tablefmt="github"), "",
              "## The portable numeric mode's cost", "",
              "One epoch of the same loop, each in its own process: the fast mode (torch's defaults: AVX-512 "
              "kernels where the CPU has them, oneDNN convolutions) against `run.portable: true` (AVX2 kernels, "
              "MKL's reproducible mode, ATen's own convolutions), which gives the same bytes on any x86-64 CPU "
              "with AVX2 (hanprune/runtime.py).", "",
              tabulate([[k, f"{n['fast_seconds_per_epoch']:.2f}", f"{n['portable_seconds_per_epoch']:.2f}",
                         f"{100 * n['portable_cost']:+.0f}%"] for k, n in r["numerics"].items()],
                       headers=["model", "fast mode (s)", "portable mode (s)", "cost"], tablefmt="github"), "",
              "## Inference, dense vs final pruned model", "",
              "Batch 1: median / p95 latency per image. Batch 1000: images per second. `torch_csr` and `scipy_csr` "
              "replace the Linear layers of the torch model with sparse kernels; convolutions stay dense. For "
              "lenet_300_100, `numpy_dense` and `numpy_scipy_csr` run the whole network in numpy (dense arrays with "
              "BLAS, or scipy CSR; for one image scipy's compiled `csr_matvec` is called directly), without torch's "
              "per-operator overhead. **sparse vs dense** compares the fastest sparse "
              "variant with dense torch, what a user switching would see; **same engine** compares each sparse "
              "variant with the dense model in its own engine, which is what sparsity alone buys.", ""]
    rows = []
    for k, inf in r["inference"].items():
        for v in ("dense", "masked", "torch_csr", "scipy_csr", "numpy_dense", "numpy_scipy_csr"):
            if v in inf:
                b1 = inf[v]["batch1"]
                rows.append([k, v, f"{b1['median_ms']:.3f} / {b1['p95_ms']:.3f}", f"{inf[v]['batch1000_images_per_s']:.0f}"])
        rows.append([k, "**sparse vs dense**", f"**{inf['batch1_speedup_sparse_vs_dense']:.2f}x** ({inf['best_sparse_batch1']})",
                     f"**{inf['batch1000_speedup_sparse_vs_dense']:.2f}x** ({inf['best_sparse_batch1000']})"])
        rows.append([k, "same engine, batch 1", ", ".join(f"{n} {x:.2f}x" for n, x in inf["batch1_speedup_same_engine"].items()), ""])
    lines += [tabulate(rows, headers=["model", "variant", "batch 1 ms (median / p95)", "batch 1000 images/s"],
                       tablefmt="github"), ""]
    rows = [[k, f"{inf['weights_bytes_dense'] / 1000:.1f}", f"{inf['weights_bytes_csr'] / 1000:.1f}"]
            for k, inf in r["inference"].items()]
    lines += ["Weight memory (KB): dense float32 vs CSR (float32 values, int32 indices and row pointers).", "",
              tabulate(rows, headers=["model", "dense", "CSR"], tablefmt="github"), ""]
    if "pipeline" in r:
        pl = r["pipeline"]
        lines += ["## Pipeline", "", f"`dvc repro` with nothing stale: {pl['noop_repro_seconds']:.2f} s (median; target ≤ 5 s).", ""]
        if "stage_seconds" in pl:
            lines += [f"The full `dvc repro` of the committed run, measured by `benchmarks/monitor.py` "
                      f"(`{pl['full_repro_command']}`): "
                      f"{pl['full_repro_seconds']:.0f} s in all (target < 20 min), peak RSS of the largest stage "
                      f"{max(pl['stage_peak_rss_mb'].values()):.0f} MB (target ≤ 2 GB). A stage's fixed cost is "
                      "its time from process start to exit less its epochs: starting Python, imports, data, the "
                      "evaluations and writing around the epochs, waiting for MLflow's worker. The largest of a "
                      f"stage that trains: {pl.get('stage_fixed_seconds', float('nan')):.1f} s (target ≤ 2.5 s). "
                      "A stage without epochs is all fixed cost by that measure, its work included; the "
                      f"shortest took {pl.get('stage_min_seconds', float('nan')):.1f} s.", "",
                      tabulate([[k, f"{pl['stage_seconds'][k]:.1f}", f"{pl.get('stage_fixed', {}).get(k, float('nan')):.1f}",
                                 f"{pl['stage_peak_rss_mb'][k]:.0f}"] for k in pl["stage_seconds"]],
                               headers=["stage", "seconds", "fixed (s)", "peak RSS (MB)"], tablefmt="github"), ""]
    if "gpu" in r:
        lines += render_gpu(r)
    return "\n".join(lines)


def render_gpu(r: dict) -> list[str]:
    from tabulate import tabulate
    g = r["gpu"]
    lines = ["## GPU", "",
             f"{g['device']}, torch {g['torch']}, measured on that GPU on {g['date']} by `benchmarks/run.py "
             f"--device cuda` (which `benchmarks/gpu_check.sh` runs). float32 GEMM (8192², TF32 off): "
             f"{g['gemm_tflops']:.1f} TFLOP/s.", "",
             "One epoch of `hanprune.train.fit` (60,000 images, batch 64, the model's pretrain settings) with "
             "the full-batch step captured as a CUDA graph (median of epochs 2 on; epoch 1 holds the capture), "
             "without it (eager), and on the 2-core CPU above (fast mode).", ""]
    rows = [[k, f"{t['epoch_seconds']:.3f}", f"{t['eager_epoch_seconds']:.2f}", f"{t['first_epoch_seconds']:.2f}",
             f"{r['train'][k]['seconds_per_epoch']:.2f}" if k in r.get("train", {}) else "",
             f"{100 * t['fraction_of_gemm_rate']:.2f}%"] for k, t in g["train"].items()]
    lines += [tabulate(rows, headers=["model", "CUDA graph (s)", "eager (s)", "first epoch (s)", "CPU (s)",
                                      "of GEMM rate"], tablefmt="github", disable_numparse=True), ""]
    if "pipeline_seconds" in g:
        done = "" if g["pipeline_complete"] else " (cut short)"
        b = g["run_b"]
        lines += [f"The whole pipeline run by `benchmarks/pipeline.py` without DVC or MLflow (run A): "
                  f"{len(g['stages'])} stages in {g['pipeline_seconds']:.0f} s{done}; the largest fixed cost of a "
                  f"stage (process start to exit, less its epochs) {g['stage_fixed_seconds']:.1f} s. Run B: "
                  f"{len(b['stages'])} stages in {b['seconds']:.0f} s" + ("" if b["complete"] else " (cut short)")
                  + f". Of the {g['files_compared']} files of models/, metrics/, plots/ and reports/ compared between "
                  f"the two runs (those both wrote and were kept), " + ("all hold the same bytes" if g["bit_identical"] else
                                     f"{len(g['files_differing'])} differ") + ".", "",
                  tabulate([[k, f"{v['seconds']:.1f}", f"{v['training_seconds']:.1f}", f"{v['fixed_seconds']:.1f}",
                             *((f"{b['stages'][k]['seconds']:.1f}", f"{b['stages'][k]['fixed_seconds']:.1f}")
                               if k in b["stages"] else ("", ""))] for k, v in g["stages"].items()],
                           headers=["stage", "A (s)", "A epochs (s)", "A fixed (s)", "B (s)", "B fixed (s)"],
                           tablefmt="github", disable_numparse=True), ""]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data"), help="data root (params data.name's directory under it)")
    ap.add_argument("--models", nargs="+", default=["lenet_300_100", "lenet5", "lenet5_caffe"])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="its models.<m>.final names the pruned checkpoints")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="one repetition, 200 latency calls, 2,000 images")
    ap.add_argument("--no-pipeline", action="store_true", help="skip the dvc timings")
    ap.add_argument("--out", default=str(ROOT / "benchmarks"), help="directory for results.json and RESULTS.md")
    ap.add_argument("--stages", default=str(ROOT / "benchmarks" / "stages.json"),
                    help="per-stage time and peak RSS of the full run, from monitor.py")
    ap.add_argument("--epoch", metavar="KEY", help="only time one epoch of KEY's training and print it as JSON")
    ap.add_argument("--portable", action="store_true", help="with --epoch: in the portable numeric mode")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: only the GPU figures, added to results.json under `gpu` (CPU figures kept)")
    ap.add_argument("--pipeline-runs", nargs=2, metavar=("A", "B"),
                    help="with --device cuda: two workdirs of benchmarks/pipeline.py to time and compare")
    ap.add_argument("--fold-stages", action="store_true",
                    help="only fold --stages (monitor.py's) into results.json and write RESULTS.md again")
    ap.add_argument("--gpu-pipeline", nargs=2, metavar=("A", "B"),
                    help="only fold two pipeline.py workdirs fetched from a GPU machine into results.json `gpu`")
    args = ap.parse_args()
    if args.fold_stages:
        return update_results(args.out, lambda r: r["pipeline"].update(stage_figures(Path(args.stages))))
    if args.gpu_pipeline:
        return update_results(args.out, lambda r: r["gpu"].update(pipeline_figures(*map(Path, args.gpu_pipeline))))
    runtime.start(args.device, args.threads, args.portable, 0)
    reps, calls, limit = (1, 200, 2000) if args.quick else (3, 1000, None)
    params = config.load(args.params)
    args.dataset = data.verified(data.raw_dir(args.data, params.data.name), params.data.name)
    if args.device == "cuda":
        return update_results(args.out, lambda r: r.update(gpu=bench_cuda(args, params)))
    x, y = data.load_split(args.dataset, train=True)
    if args.epoch:
        n = limit or len(x)
        print(json.dumps({"seconds": project_epoch(args.epoch, params.models[args.epoch].pretrain, x[:n], y[:n])}))
        return
    test_x, _ = data.load_split(args.dataset, train=False)
    flops = gemm_flops(512 if args.quick else 2048, reps=3 if args.quick else 10)
    results = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()},
               "date": time.strftime("%Y-%m-%d"), "gemm_n": 512 if args.quick else 2048,
               "gemm_gflops": flops / 1e9, "train": {}, "numerics": {}, "inference": {}}
    for key in args.models:
        print(f"training {key} ...", flush=True)
        results["train"][key] = bench_training(key, params.models[key].pretrain, args.dataset, x, y, reps, 1, flops, limit)
        print(f"numeric modes {key} ...", flush=True)
        results["numerics"][key] = bench_numerics(key, args, reps)
        project = Path(args.params).parent
        final = params.models[key].final
        print(f"inference {key} ({final}) ...", flush=True)
        results["inference"][key] = bench_inference(key, project / f"models/{key}/dense.pt", project / final,
                                                    test_x, calls, reps)
    if not args.no_pipeline:
        results["pipeline"] = bench_pipeline(reps)
        if Path(args.stages).exists():  # written by monitor.py around the full `dvc repro` of the committed run
            results["pipeline"].update(stage_figures(Path(args.stages)))
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    previous = Path(args.out) / "results.json"
    if previous.exists() and "gpu" in json.loads(previous.read_text()):  # measured on a GPU machine: kept
        results["gpu"] = json.loads(previous.read_text())["gpu"]
    io.write_json(Path(args.out) / "results.json", results)
    io.write_text(Path(args.out) / "RESULTS.md", render(results))
    print(render(results))


if __name__ == "__main__":
    main()
