"""Every stage on CUDA (`pytest -m cuda`; skipped without a CUDA device): the tiny pipeline through
every stage kind, the same bytes from two runs, and checkpoints moving between the CPU and CUDA.
The stages run as `dvc repro` would run them (their dvc.yaml commands), without DVC or MLflow, so
this also runs on a GPU machine that has neither."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hanprune import data, datasets, rules, sources
from hanprune.train import fit
from tests.tiny import TINY, stage_commands, tiny_params, write_tiny_mnist

ROOT = Path(__file__).resolve().parents[1]
KEY = "lenet5"  # a conv model: convolutions, pooling, weight sharing of conv layers
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def project(tmp: Path, device: str) -> Path:
    md5 = write_tiny_mnist(tmp / "source")
    spec = datasets.spec(TINY, md5)
    data.write_raw(sources.fetch(spec, "local", tmp / "source")[1], tmp / "data", spec)  # as the download stage does
    p = tiny_params(ROOT / "params.yaml", tmp / "source", md5, {KEY: 1})
    p["run"]["device"] = device
    (tmp / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return tmp


def run(tmp: Path, *cmds: list[str], device: str | None = None):
    if device:
        p = yaml.safe_load((tmp / "params.yaml").read_text())
        p["run"]["device"] = device
        (tmp / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # no store: one warning per stage
    for cmd in cmds:
        proc = subprocess.run([sys.executable, str(ROOT / "stages" / cmd[0]), *cmd[1:]], cwd=tmp, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd[0]} on {device}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def digests(tmp: Path) -> dict[str, str]:
    return {str(f.relative_to(tmp)): hashlib.md5(f.read_bytes()).hexdigest()
            for f in sorted((tmp / "models").rglob("*")) if f.is_file()}


def test_every_stage_kind_runs_on_cuda(tmp_path):
    """The whole tiny pipeline on CUDA: the models learn, and the compressed file decodes (on the
    CPU) to a model that scores what evaluate measured on the GPU, up to an image."""
    import json
    from hanprune.encoding import read_compressed
    from hanprune.train import accuracy
    tmp = project(tmp_path, "cuda")
    run(tmp, *stage_commands(KEY, 1))
    assert (tmp / "reports" / "REPORT.md").read_text().startswith(f"# Pruning report: {TINY}")
    metrics = json.loads((tmp / f"metrics/{KEY}.json").read_text())
    assert metrics["test_dense"] > 0.5 and metrics["test_pruned"] > 0.5
    _, decoded = read_compressed(tmp / f"models/{KEY}/compressed.bin", KEY)
    x, y = data.load_split(data.verified(data.raw_dir(tmp / "data", TINY), TINY), train=False)
    assert metrics["test_compressed"] == pytest.approx(accuracy(decoded, x, y), abs=1.5 / len(y))


def test_two_cuda_runs_give_the_same_bytes(tmp_path):
    first, second = project(tmp_path / "a", "cuda"), project(tmp_path / "b", "cuda")
    for tmp in (first, second):
        run(tmp, *stage_commands(KEY, 1)[:6])  # pretrain, sensitivity, schedule, prune, select, quantize
    assert digests(first) == digests(second)


@pytest.mark.parametrize("first,then", [("cpu", "cuda"), ("cuda", "cpu")])
def test_a_checkpoint_continues_on_the_other_device(tmp_path, first, then):
    """Pretrained on one device, pruned and evaluated on the other: round 1's masks are the
    thresholds on the dense checkpoint's weights, and evaluate's dense accuracy is what the dense
    checkpoint scores here on the CPU (up to an image whose argmax the device's last bits flip)."""
    import json
    from hanprune import pruning
    from hanprune.train import accuracy
    tmp = project(tmp_path, first)
    run(tmp, *stage_commands(KEY, 1)[:2], device=first)  # pretrain, sensitivity
    run(tmp, *stage_commands(KEY, 1)[2:], device=then)  # prune onward
    assert (tmp / "reports" / "REPORT.md").exists()
    dense, ckpt = pruning.load_checkpoint(tmp / f"models/{KEY}/dense.pt", KEY)
    _, pruned = pruning.load_checkpoint(tmp / f"models/{KEY}/rounds/iter1.pt", KEY)
    s = json.loads((tmp / f"metrics/schedule/{KEY}-iter1.json").read_text())["s"]
    assert set(pruned["masks"]) == set(s)
    for name, value in s.items():
        weight = ckpt["state_dict"][f"{name}.weight"]
        assert torch.equal(pruned["masks"][name], weight.abs() >= value * pruned["dense_std"][name]), name
    assert pruned["dense_std"] == ckpt["dense_std"]
    p = yaml.safe_load((tmp / "params.yaml").read_text())
    splits = data.Splits(data.verified(data.raw_dir(tmp / "data", TINY), TINY), p["data"]["val_size"], p["data"]["val_seed"])
    metrics = json.loads((tmp / f"metrics/{KEY}.json").read_text())
    assert metrics["test_dense"] == pytest.approx(accuracy(dense, *splits.test), abs=1.5 / len(splits.test[1]))
    assert metrics["test_dense"] > 0.5  # it learned: chance is 0.1


@pytest.fixture
def cuda_runtime():
    """runtime.start on CUDA (deterministic kernels, float32 convolutions), undone afterwards."""
    from hanprune import runtime
    device = runtime.start("cuda", 0, False, 0)
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.allow_tf32
    yield device
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.allow_tf32 = True


@pytest.mark.parametrize("key,kind", [("lenet_300_100", "dense"), ("lenet5", "pruned"), ("lenet5", "shared")])
def test_the_cuda_graph_trains_as_the_eager_loop_does(cuda_runtime, key, kind):
    """The captured step (static batch and rate, masks, weight sharing's codebooks) follows the same
    trajectory as the eager loop: capture succeeds (no fallback warning) and two epochs end at the
    same weights up to the last bits (the rate is a tensor in one, a float in the other)."""
    import warnings
    from hanprune import pruning, quantize
    from hanprune.config import Training
    from hanprune.models import make, prunable_layers
    device = cuda_runtime
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64 * 12 + 17, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (64 * 12 + 17,), generator=g).to(device)
    cfg = Training(seed=0, epochs=2, batch_size=64, lr=0.05, momentum=0.9, schedule="cosine",
                   regularization={"kind": "l2", "strength": 0.0001}, shift=2)
    torch.manual_seed(0)
    start = make(key)
    if kind != "dense":
        rules.prune_round(start, "std", {n: 0.5 for n in prunable_layers(start)}, pruning.weight_std(start))
    states = []
    for graphs in (True, False):
        model = make(key)
        if kind == "pruned":  # as the prune stage trains it: masks attached
            pruning.attach_masks(model, pruning.masks_of(start))
            model.load_state_dict(start.state_dict())
        else:  # as pretrain and quantize train it: plain weights, then (quantize) shared ones
            model.load_state_dict(pruning.plain_state_dict(start))
        if kind == "shared":
            quantize.share_weights(model, {n: 4 for n in prunable_layers(model)}, pruning.masks_of(start))
        model.to(device)
        before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fit(model, cfg, (x, y), (x[:100], y[:100]), None, device, cuda_graphs=graphs)
        states.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
    for name, value in states[0].items():
        assert torch.allclose(value.float(), states[1][name].float(), atol=1e-5, rtol=0), name
    assert any(not torch.equal(v, before[k]) for k, v in states[1].items())  # it trained


def test_one_object_runs_the_step_from_its_graph_or_eagerly(cuda_runtime):
    """CudaGraphStep: eager warm-up, then the captured graph for full batches, a smaller batch
    eagerly; a step that cannot be captured (it syncs with the host) runs eagerly from then on,
    with one warning. Either way every call runs the step exactly once, with its batch and rate."""
    import warnings
    from hanprune.train import WARMUP_STEPS, CudaGraphStep
    device = cuda_runtime
    calls = [torch.full((3, 4), k, device=device) for k in range(WARMUP_STEPS + 3)] + [torch.ones(3, 2, device=device)]
    expected = sum(0.5 * float(batch[0].sum()) for batch in calls)
    for syncs in (False, True):
        total = torch.zeros((), device=device)

        def step(batch, lr):
            total.add_(batch[0].sum() * lr)
            if syncs:
                total.item()  # not allowed while the stream is captured

        graphed = CudaGraphStep(step, 4, device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for batch in calls:
                graphed(batch.long(), 0.5)
        torch.cuda.synchronize()
        assert (graphed.graph is None) == syncs and graphed.failed == syncs
        assert [str(w.message).split(" (")[0] for w in caught] == (
            ["training eagerly: the training step could not be captured as a CUDA graph"] if syncs else [])
        assert total.item() == expected


def test_codebook_gradient_on_cuda_is_indexing_s_and_repeatable(cuda_runtime):
    """Weight sharing's codebook gradient on CUDA (the one-hot product): indexing's gradient up to
    rounding, and the same bits every time."""
    from hanprune import quantize
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (300, 784), generator=g).cuda()
    grad, codebook = torch.randn(300, 784, generator=g).cuda(), torch.randn(64, generator=g).cuda()
    members = torch.nn.functional.one_hot(codes.flatten(), 64).float()
    grads = []
    for _ in range(3):
        c = codebook.clone().requires_grad_()
        quantize._Lookup.apply(c, codes, members).backward(grad)
        grads.append(c.grad.cpu())
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    reference = codebook.clone().requires_grad_()
    reference[codes].backward(grad)
    assert torch.allclose(grads[0], reference.grad.cpu(), atol=1e-3)
