"""One epoch of this project's training loop (hanprune.train.fit) with a model's pretrain settings and
one of the plainest loop in torch, timed, printed as JSON with the rate of MKL's GEMM in the same
mode. The numeric mode (hanprune/runtime.py) is fixed when torch loads, so benchmarks/run.py measures
each mode's cost by running this once per mode, each in its own process.

    python benchmarks/epoch.py KEY --data DATA_ROOT --params PARAMS --threads N [--portable] [--images N]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hanprune import runtime  # noqa: E402


def gemm_flops(n: int, reps: int) -> float:
    """FLOP/s of a large square float32 matmul (2 n^3 FLOPs), median of reps, in this process's numeric mode."""
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def train_epoch(model, batches) -> float:
    """Seconds of one epoch of the plainest training loop over `batches`, its convolutions run as the
    process's numeric mode runs them (hanprune.kernels)."""
    import torch
    import torch.nn.functional as F
    from hanprune.kernels import kernels
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    t = time.perf_counter()
    with kernels(torch.device("cpu")):
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t


def in_memory_batches(x, y):
    """The plainest loop over tensors already in memory: a shuffled index, one gather per batch."""
    import torch
    return ((x[idx], y[idx]) for idx in torch.randperm(len(x)).split(64))


def one_epoch(key, cfg, x, y) -> float:
    """Seconds of one epoch with the pretrain settings `cfg` (batch size, optimiser, augmentation),
    validating on a single image so that nearly all of the time is training."""
    from hanprune.models import make
    from hanprune.train import fit
    return fit(make(key), cfg.model_copy(update={"epochs": 1}), (x, y), (x[:1], y[:1]))[0]["seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a key of params models")
    ap.add_argument("--data", required=True, help="data root (params data.name's directory under it)")
    ap.add_argument("--params", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--portable", action="store_true", help="in the portable numeric mode")
    ap.add_argument("--images", type=int, help="only the first N training images")
    args = ap.parse_args()
    runtime.configure(args.portable)  # before torch is imported
    from hanprune import config, data
    runtime.start("cpu", args.threads, args.portable, 0)
    params = config.load(args.params)
    x, y = data.load_split(data.verified(data.raw_dir(args.data, params.data.name), params.data.name), train=True)
    x, y = x[:args.images], y[:args.images]
    from hanprune.models import make
    seconds = one_epoch(args.model, params.models[args.model].pretrain, x, y)
    plain = train_epoch(make(args.model), in_memory_batches(x, y))
    print(json.dumps({"seconds": seconds, "plain_seconds": plain,
                      "gemm_gflops": gemm_flops(512 if args.images else 2048, 5) / 1e9}))


if __name__ == "__main__":
    main()
