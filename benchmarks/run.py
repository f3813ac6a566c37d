"""Benchmarks: training throughput against a plain torchvision baseline and the hardware bound,
dense vs pruned inference (masked and real sparse kernels), and pipeline overhead.

    python benchmarks/run.py                 # full run on real MNIST, writes results.json and RESULTS.md
    python benchmarks/run.py --quick ...     # one repetition of everything (the smoke test uses this)
    python benchmarks/run.py --render-only   # RESULTS.md again from results.json

This process runs in the fast numeric mode; the portable mode's cost is measured by benchmarks/epoch.py,
one epoch in each mode in a process of its own. The sparse kernels are in benchmarks/sparse_kernels.py;
benchmarks/results.py folds figures into results.json and renders RESULTS.md.

Everything is compared within one run on one machine: these machines are shared and noisy.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import results  # noqa: E402  (benchmarks/, the script's directory)
from epoch import gemm_flops, in_memory_batches, one_epoch, train_epoch  # noqa: E402
from hanprune import config, data, measure, runtime  # noqa: E402
from hanprune.models import make, prunable_layers  # noqa: E402
from hanprune.pruning import load_checkpoint, plain_state_dict  # noqa: E402
from hanprune.train import fit  # noqa: E402
from sparse_kernels import NumpyMLP, ScipyLinear, SparseLinear, with_sparse_linears  # noqa: E402


def baseline_batches(dataset: data.Dataset):
    """The usual way: torchvision dataset, per-sample transforms, a DataLoader."""
    from torchvision import datasets, transforms

    class IDX(datasets.MNIST):  # torchvision's MNIST reader, pointed at the dataset's directory
        raw_folder = str(dataset.raw)

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(dataset.mean, dataset.std)])
    ds = IDX(dataset.raw, train=True, download=False, transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)


def bench_training(key, cfg, dataset, x, y, reps, baseline_reps, flops_per_second, limit=None):
    torch.manual_seed(0)
    if limit:
        x, y = x[:limit], y[:limit]
    project = statistics.median(one_epoch(key, cfg, x, y) for _ in range(reps))
    plain = statistics.median(train_epoch(make(key), in_memory_batches(x, y)) for _ in range(reps))
    baseline_loader = baseline_batches(dataset)
    if limit:
        baseline_loader = [b for _, b in zip(range(limit // 64), baseline_loader)]
    baseline = statistics.median(train_epoch(make(key), baseline_loader) for _ in range(baseline_reps))
    forward = measure.totals(measure.layer_stats(make(key), tuple(x.shape[1:])))["flops_dense"]
    bound = 3 * forward * len(x) / flops_per_second  # forward + backward (2x forward) per image
    return {"seconds_per_epoch": project, "plain_loop_seconds_per_epoch": plain, "baseline_seconds_per_epoch": baseline,
            "speedup_vs_baseline": baseline / project, "bound_seconds_per_epoch": bound,
            "fraction_of_bound": bound / project, "images": len(x)}


def bench_numerics(key, args, reps) -> dict:
    """Seconds per epoch of the project's loop and of the plain loop in the fast and the portable mode,
    each mode in a child process (median of reps): what run.portable costs, what the project's loop
    costs over the plain one in each mode, and the rate of MKL's GEMM in each mode (epoch.py)."""
    def epoch(mode: list[str]) -> float:
        cmd = [sys.executable, str(Path(__file__).with_name("epoch.py")), key, "--data", args.data,
               "--params", args.params, "--threads", str(args.threads), *mode, *(["--images", "2000"] if args.quick else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    fast, portable = ([epoch(mode) for _ in range(reps)] for mode in ([], ["--portable"]))
    median = {k: [statistics.median(r[k] for r in runs) for runs in (fast, portable)]
              for k in ("seconds", "plain_seconds", "gemm_gflops")}
    (fast_s, portable_s), (fast_plain, portable_plain) = median["seconds"], median["plain_seconds"]
    return {"fast_seconds_per_epoch": fast_s, "portable_seconds_per_epoch": portable_s, "portable_cost": portable_s / fast_s - 1,
            "fast_loop_over_plain": fast_s / fast_plain, "portable_loop_over_plain": portable_s / portable_plain,
            "fast_gemm_gflops": median["gemm_gflops"][0], "portable_gemm_gflops": median["gemm_gflops"][1]}


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
    plain = make(key).eval()
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
    graphed = [e["seconds"] for e in fit(make(key).to(device), cfg, (x, y), (x[:1], y[:1]), None, device)]
    eager = fit(make(key).to(device), cfg.model_copy(update={"epochs": 1}), (x, y), (x[:1], y[:1]), None,
                device, cuda_graphs=False)[0]["seconds"]
    seconds = statistics.median(graphed[1:])
    flops = 3 * measure.totals(measure.layer_stats(make(key).to(device), tuple(x.shape[1:])))["flops_dense"] * len(x)
    return {"epoch_seconds": seconds, "first_epoch_seconds": graphed[0], "eager_epoch_seconds": eager,
            "fraction_of_gemm_rate": flops / seconds / flops_per_second, "images": len(x)}


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
        gpu.update(results.pipeline_figures(*(Path(p) for p in args.pipeline_runs)))
    return gpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data"), help="data root (params data.name's directory under it)")
    ap.add_argument("--models", nargs="+", default=["lenet_300_100", "lenet5", "lenet5_caffe"])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="the params of the run whose models/<m>/selected.pt are measured")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="one repetition, 200 latency calls, 2,000 images")
    ap.add_argument("--no-pipeline", action="store_true", help="skip the dvc timings")
    ap.add_argument("--out", default=str(ROOT / "benchmarks"), help="directory for results.json and RESULTS.md")
    ap.add_argument("--stages", default=str(ROOT / "benchmarks" / "stages.json"),
                    help="per-stage time and peak RSS of the full run, from monitor.py")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: only the GPU figures, added to results.json under `gpu` (CPU figures kept)")
    ap.add_argument("--pipeline-runs", nargs=2, metavar=("A", "B"),
                    help="with --device cuda: two workdirs of benchmarks/pipeline.py to time and compare")
    ap.add_argument("--fold-stages", action="store_true",
                    help="only fold --stages (monitor.py's) into results.json and write RESULTS.md again")
    ap.add_argument("--gpu-pipeline", nargs=2, metavar=("A", "B"),
                    help="only fold two pipeline.py workdirs fetched from a GPU machine into results.json `gpu`")
    ap.add_argument("--render-only", action="store_true", help="only write RESULTS.md again from results.json")
    args = ap.parse_args()
    if args.render_only:
        return print(results.update(args.out, lambda r: None))
    if args.fold_stages:
        return print(results.update(args.out, lambda r: r["pipeline"].update(results.stage_figures(Path(args.stages)))))
    if args.gpu_pipeline:
        return print(results.update(args.out, lambda r: r["gpu"].update(results.pipeline_figures(*map(Path, args.gpu_pipeline)))))
    runtime.start(args.device, args.threads, False, 0)
    reps, calls, limit = (1, 200, 2000) if args.quick else (3, 1000, None)
    params = config.load(args.params)
    args.dataset = data.verified(data.raw_dir(args.data, params.data.name), params.data.name)
    if args.device == "cuda":
        return print(results.update(args.out, lambda r: r.update(gpu=bench_cuda(args, params))))
    x, y = data.load_split(args.dataset, train=True)
    test_x, _ = data.load_split(args.dataset, train=False)
    flops = gemm_flops(512 if args.quick else 2048, reps=3 if args.quick else 10)
    cpu = {"machine": {"cpu": results.cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()},
           "date": time.strftime("%Y-%m-%d"), "gemm_n": 512 if args.quick else 2048,
           "gemm_gflops": flops / 1e9, "train": {}, "numerics": {}, "inference": {}}
    for key in args.models:
        print(f"training {key} ...", flush=True)
        cpu["train"][key] = bench_training(key, params.models[key].pretrain, args.dataset, x, y, reps, 1, flops, limit)
        print(f"numeric modes {key} ...", flush=True)
        cpu["numerics"][key] = bench_numerics(key, args, reps)
        project = Path(args.params).parent
        final = f"models/{key}/selected.pt"  # the round stage select chose
        print(f"inference {key} ({final}) ...", flush=True)
        cpu["inference"][key] = bench_inference(key, project / f"models/{key}/dense.pt", project / final,
                                                test_x, calls, reps)
    if not args.no_pipeline:
        cpu["pipeline"] = bench_pipeline(reps)
        if Path(args.stages).exists():  # written by monitor.py around the full `dvc repro` of the committed run
            cpu["pipeline"].update(results.stage_figures(Path(args.stages)))
    cpu["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def replace_cpu_figures(r: dict):  # the GPU's, measured on another machine, are kept
        gpu = r.pop("gpu", None)
        r.clear()
        r.update(cpu, **({"gpu": gpu} if gpu else {}))
    print(results.update(args.out, replace_cpu_figures))


if __name__ == "__main__":
    main()
