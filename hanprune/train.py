"""Training and evaluation on in-memory tensors: no DataLoader, no per-sample transforms."""
import math
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.sgd import sgd

from .errors import HanpruneError, torch_text
from .finite import nonfinite
from .kernels import kernels
from .models import prunable_layers


class TrainingError(HanpruneError):
    """Training that diverged: a loss or weights that are not finite (nan, inf)."""


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)  # summed on the device: one sync
    with kernels(x.device):
        for i in range(0, len(x), batch_size):
            correct += (model(in_layout(x[i:i + batch_size])).argmax(1) == y[i:i + batch_size]).sum()
    return correct.item() / len(x)


class SGD:
    """SGD with momentum (Nesterov optional) and L2 weight decay: the step of torch.optim.SGD(fused=True)
    through its functional form (torch.optim.sgd.sgd), the same kernel and bytes, without the
    torch.optim.Optimizer class, whose constructor imports torch._dynamo. The rate is given to each
    step: a Python float, or a tensor on the device, which a captured CUDA graph reads at every replay."""

    def __init__(self, params, cfg):
        self.params = list(params)
        self.momentum = cfg.momentum
        self.nesterov = cfg.nesterov and cfg.momentum > 0
        self.weight_decay = cfg.regularization.strength if cfg.regularization.kind == "l2" else 0.0
        self.buffers = None  # the momentum buffers, which the first step makes

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self, lr: float | torch.Tensor):
        params = [p for p in self.params if p.grad is not None]  # frozen ones (weight sharing) have none
        if self.buffers is None:
            self.buffers = [None] * len(params)
        sgd(params, [p.grad for p in params], self.buffers, fused=True, weight_decay=self.weight_decay,
            momentum=self.momentum, lr=lr, dampening=0.0, nesterov=self.nesterov, maximize=False)


def learning_rates(cfg, steps: int):
    """The rate of every step, in the float arithmetic of torch.optim.lr_scheduler's CosineAnnealingLR
    (its recursive form) and LambdaLR (a test holds them to the same bits). "inv" is Caffe's policy:
    lr * (1 + gamma * iter) ** -power."""
    lr = cfg.lr
    for i in range(steps):
        if cfg.schedule == "cosine" and i > 0:
            lr = (1 + math.cos(math.pi * i / steps)) / (1 + math.cos(math.pi * (i - 1) / steps)) * lr
        elif cfg.schedule == "inv":
            lr = cfg.lr * (1 + 1e-4 * i) ** -0.75
        yield lr


def step_count(cfg, images: int) -> int:
    """The SGD steps of training on `images` images for cfg.epochs (the last batch of an epoch may be short)."""
    return cfg.epochs * -(-images // cfg.batch_size)


def random_shift(x: torch.Tensor, shift: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Translate image i by (dy[i] - shift, dx[i] - shift) pixels, dy and dx in [0, 2 * shift]; the
    border pixels (MNIST's background) fill the uncovered edge."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, mode="replicate")
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (n, c, 2s+1, 2s+1, h, w), a view
    return windows[torch.arange(n, device=x.device), :, dy, dx]


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout of the model and its batches: channels-last, in which oneDNN's CPU convolutions
    and cuDNN's are faster for these small networks; the standard layout where oneDNN is off (the
    portable mode), in which ATen's own CPU convolutions are faster."""
    if device.type == "cpu" and not torch.backends.mkldnn.enabled:
        return torch.contiguous_format
    return torch.channels_last


def in_layout(x: torch.Tensor) -> torch.Tensor:
    """The image batch x in memory_format's layout. For channels-last, a copy: x.contiguous(memory_format=...)
    would leave a one-channel batch as it is (it counts as channels-last already), and then a
    convolution whose weight is in the standard strides (a plain model, or weight_orig * mask) runs
    in the slow standard layout."""
    layout = memory_format(x.device)
    if layout == torch.contiguous_format:
        return x.contiguous()
    return torch.empty_like(x, memory_format=layout).copy_(x)


def fit(model, cfg, train, val, test=None, device=torch.device("cpu"), log=None, cuda_graphs=True,
        label: str | None = None, lr_key: str | None = None, before_step=None) -> list[dict]:
    """Train `model` for cfg.epochs with minibatch SGD and return one record per epoch.

    train/val/test are (images, labels) tensors already on `device`. `log(record)` is called after
    every epoch. Pruning masks attached to the model keep pruned weights at zero throughout;
    `before_step(i)`, if given, is called before the i-th step (from 0, counted over all epochs): a
    gradual pruning schedule updates the masks there (rules.Gradual). On
    CUDA, the steps are replayed from a captured CUDA graph (CudaGraphStep) unless cuda_graphs is
    false (benchmarks/run.py times the eager loop so).

    The model and each batch are in memory_format(device)'s layout; the standard layout is
    restored on return, so checkpoints do not depend on it.

    Training that diverges (a step's loss, or the weights at the end, not finite) raises
    TrainingError naming the epoch, the step, the loss and the learning rate, prefixed with `label`
    (who trains: "prune lenet5-iter2"); `lr_key` is the params key of the rate to lower. The stages
    write only after fit returns, so a diverged run writes nothing."""
    model.to(memory_format=memory_format(device))
    try:
        with kernels(device):  # the portable mode's convolutions (hanprune/kernels.py)
            return _fit(model, cfg, train, val, test, device, log, cuda_graphs, _Diverged(label, lr_key), before_step)
    finally:
        model.to(memory_format=torch.contiguous_format)


def _fit(model, cfg, train, val, test, device, log, cuda_graphs, diverged, before_step) -> list[dict]:
    """The loop. Each epoch draws its batch order and shifts on the CPU (the same numbers on every
    device) and moves them to the device at once."""
    x, y = train
    n, size = len(x), cfg.batch_size
    full = n // size
    rates = learning_rates(cfg, step_count(cfg, n))
    optimizer = SGD(model.parameters(), cfg)
    l1 = cfg.regularization.strength if cfg.regularization.kind == "l1" else 0.0
    layers = list(prunable_layers(model).values())
    order = torch.Generator().manual_seed(cfg.seed)
    shifts = torch.Generator().manual_seed(cfg.seed + 1)
    total_loss = torch.zeros((), device=device)
    # The divergence check. On the CPU the loop reads each step's loss (no device to wait for: it
    # costs nothing measurable) and stops at the first one that is not finite. Elsewhere a read per
    # step would be a host sync per step, and a CUDA graph cannot capture one: each step writes its
    # loss into a device buffer at position `count` (elementwise ops only, captured with the step),
    # which the loop reads only when the epoch's training loss (already one sync per epoch) is not
    # finite: there a diverged run stops at the end of the epoch, still naming its first bad step.
    per_step = device.type in READ_EACH_STEP
    positions = None if per_step else torch.arange(-(-n // size), device=device)
    losses = None if per_step else torch.zeros(len(positions), device=device)
    count = None if per_step else torch.zeros((), dtype=torch.long, device=device)

    def step(batch, lr):
        """One SGD step on a batch: a (3, len) tensor of image indices and their shifts dy, dx."""
        idx, dy, dx = batch
        images = random_shift(x[idx], cfg.shift, dy, dx) if cfg.shift else x[idx]
        loss = F.cross_entropy(model(in_layout(images)), y[idx])
        total_loss.add_(loss.detach() * len(idx))
        if losses is not None:
            losses.copy_(torch.where(positions == count, loss.detach(), losses))
            count.add_(1)
        if l1:
            loss = loss + l1 * sum(m.weight.abs().sum() for m in layers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(lr)
        return loss.detach()

    if cuda_graphs and device.type == "cuda" and full > WARMUP_STEPS:
        step = CudaGraphStep(step, size, device)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start = time.perf_counter()
        total_loss.zero_()
        if count is not None:
            count.zero_()
        perm = torch.randperm(n, generator=order)
        # Batch i's shifts are the next 2 * len(batch) draws: its dy, then its dx.
        offsets = (torch.randint(0, 2 * cfg.shift + 1, (2 * n,), generator=shifts) if cfg.shift
                   else torch.zeros(2 * n, dtype=torch.long))
        perm, offsets = perm.to(device), offsets.to(device)
        batches = list(torch.cat([perm[:full * size].view(full, 1, size),
                                  offsets[:2 * full * size].view(full, 2, size)], 1))
        if full * size < n:  # the last, smaller batch
            batches.append(torch.cat([perm[full * size:].view(1, -1), offsets[2 * full * size:].view(2, -1)]))
        lrs = [next(rates) for _ in batches]
        for i, batch in enumerate(_progress(batches, f"epoch {epoch}/{cfg.epochs}")):
            if before_step:
                before_step((epoch - 1) * len(batches) + i)
            loss = step(batch, lrs[i])
            if per_step and not math.isfinite(loss := loss.item()):
                diverged.loss(epoch, i, len(batches), loss, lrs[i])
        train_loss = total_loss.item() / n
        if not math.isfinite(train_loss):
            diverged.epoch(epoch, train_loss, None if losses is None else losses[:len(batches)].cpu(), lrs)
        record = {"epoch": epoch, "train_loss": train_loss, "val_accuracy": accuracy(model, *val)}
        if test is not None:
            record["test_accuracy"] = accuracy(model, *test)
        record["seconds"] = time.perf_counter() - start  # the epoch's evaluations included
        history.append(record)
        if log:
            log(record)
    optimizer.zero_grad()  # let go of gradients that live in the graph's memory
    diverged.weights(model, cfg.epochs, len(batches), lrs[-1])
    return history


class _Diverged:
    """The TrainingError of a diverged fit, in one line."""

    def __init__(self, label: str | None, lr_key: str | None):
        self.prefix = f"{label}: " if label else ""
        self.advice = "try a smaller learning rate" + (f" ({lr_key})" if lr_key else "")

    def _raise(self, what: str, lr: float):
        raise TrainingError(f"{self.prefix}training diverged: {what} (learning rate {lr:.4g}); {self.advice}")

    def loss(self, epoch: int, i: int, steps: int, loss: float, lr: float):
        self._raise(f"the loss is {loss} at epoch {epoch}, step {i + 1} of {steps}", lr)

    def epoch(self, epoch: int, mean: float, losses: torch.Tensor | None, lrs: list[float]):
        """The epoch's training loss is not finite: its first step whose loss is not (from `losses`,
        the steps' losses, where the loop did not read each), else (every step's finite, their sum
        overflowed) the epoch's."""
        bad = [] if losses is None else (~torch.isfinite(losses)).nonzero().flatten().tolist()
        if bad:
            self.loss(epoch, bad[0], len(losses), losses[bad[0]].item(), lrs[bad[0]])
        self._raise(f"the training loss of epoch {epoch} is {mean} (its steps' losses sum past float32)", lrs[-1])

    def weights(self, model, epoch: int, steps: int, lr: float):
        """After the last step, which no loss follows to show it: the weights must be finite."""
        if bad := nonfinite({name.removesuffix("_orig"): p for name, p in model.named_parameters()}):
            self._raise(f"after the last step (epoch {epoch}, step {steps} of {steps}), {bad}", lr)


READ_EACH_STEP = {"cpu"}  # devices on which fit reads every step's loss (a test empties it: the buffer's path)
WARMUP_STEPS = 3  # eager steps before a CUDA graph is captured (lazy initialisation, workspaces)


class CudaGraphStep:
    """A training step, step(batch, lr), on CUDA, replayed from a captured CUDA graph: one launch per
    step and no host sync, where eager PyTorch spends a LeNet step launching small kernels. The
    graph's static inputs are a full batch (one (3, batch size) tensor) and the learning rate (a
    device tensor, which the optimizer reads at every replay). The first WARMUP_STEPS steps run
    eagerly, as torch's CUDA graph notes ask; capture follows. Eager steps and capture share one
    side stream, so autograd's gradient accumulators (kept alive between steps by the masked
    weights of torch's pruning) always meet gradients from their own stream. A smaller batch (an
    epoch's last) runs eagerly; so does every step if capture fails (say, a user's model syncs with
    the host), with a warning: slower, the same maths."""

    def __init__(self, step, size: int, device):
        self.step = step
        self.batch = torch.zeros(3, size, dtype=torch.long, device=device)
        self.lr = torch.zeros((), device=device)
        self.graph, self.warm, self.failed = None, 0, False
        self.stream = torch.cuda.Stream(device)

    def __call__(self, batch: torch.Tensor, lr: float):
        self.lr.fill_(lr)
        if batch.shape != self.batch.shape:  # the smaller last batch
            self._eager(batch)
            return
        if self.graph is None and not self.failed and self.warm == WARMUP_STEPS:
            self._capture()
        if self.graph is not None:
            self.batch.copy_(batch)
            self.graph.replay()
        else:
            self._eager(batch)
            self.warm += 1

    def _eager(self, batch: torch.Tensor):
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.step(batch, self.lr)
        torch.cuda.current_stream().wait_stream(self.stream)

    def _capture(self):
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self.step(self.batch, self.lr)
            self.graph = graph
        except RuntimeError as e:
            self.failed = True
            warnings.warn(f"training eagerly: the training step could not be captured as a CUDA graph "
                          f"({type(e).__name__}: {torch_text(e)[:200]})")


def _progress(iterable, desc):
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, leave=False, file=sys.stderr)
    return iterable
