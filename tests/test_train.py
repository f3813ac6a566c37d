"""The training loop's pieces that the pipeline's tiny runs never isolate (hanprune.train): accuracy
over several batches, fit against a plain loop (the last, smaller batch included), the SGD step with
the rate as a 0-dim tensor (what a captured CUDA graph gives it) and weight sharing's one-hot
codebook gradient (CUDA's path), the last two computed on the CPU."""
import math

import pytest
import torch
import torch.nn.functional as F

from hanprune import pruning, quantize, rules
from hanprune.config import Training
from hanprune.models import make
from hanprune.train import SGD, accuracy, fit, learning_rates, random_shift


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_accuracy_over_several_batches_is_the_direct_count():
    """Every test split of the suite is smaller than accuracy's batch of 1000: here 7 batches, the
    last of 2 images."""
    model = make("lenet_300_100").eval()
    x, y = _data(50, 0)
    with torch.no_grad():
        direct = (model(x).argmax(1) == y).sum().item() / len(y)
    assert 0.05 < direct < 0.5  # an untrained model: a count that a lost or repeated batch would change
    assert accuracy(model, x, y, batch_size=8) == accuracy(model, x, y, batch_size=7) == direct


def _cfg(**change):
    return Training(**{"seed": 3, "epochs": 2, "batch_size": 16, "lr": 0.05, "momentum": 0.9, "schedule": "cosine",
                       "regularization": {"kind": "l2", "strength": 0.001}, "shift": 2, **change})


def _plain_loop(model, cfg, x, y):
    """What fit is meant to do, written plainly: each epoch's order and shifts drawn at once,
    batches in order (the last one smaller), torch.optim.SGD at learning_rates' rate."""
    n, size = len(x), cfg.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.regularization.strength, fused=True)
    rates = learning_rates(cfg, cfg.epochs * math.ceil(n / size))
    order, shifts = torch.Generator().manual_seed(cfg.seed), torch.Generator().manual_seed(cfg.seed + 1)
    sizes = []
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=order)
        offsets = torch.randint(0, 2 * cfg.shift + 1, (2 * n,), generator=shifts)
        for start in range(0, n, size):
            idx = perm[start:start + size]
            b = len(idx)
            dy, dx = offsets[2 * start:2 * start + b], offsets[2 * start + b:2 * start + 2 * b]
            loss = F.cross_entropy(model(random_shift(x[idx], cfg.shift, dy, dx)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.param_groups[0]["lr"] = next(rates)
            opt.step()
            sizes.append(b)
    return sizes


def test_fit_is_the_plain_loop_to_the_bit_including_the_last_smaller_batch():
    """fit's step (the function a CUDA graph captures) run eagerly on the CPU: 16 * 6 + 5 images, so
    each epoch ends with a batch of 5; a pruned model, as the prune stage trains it."""
    cfg = _cfg()
    x, y = _data(16 * 6 + 5, 1)
    start = make("lenet_300_100")
    rules.prune_round(start, "std", {"fc1": 1.0, "fc2": 0.5}, pruning.weight_std(start))
    models = []
    for _ in range(2):
        m = make("lenet_300_100")
        pruning.attach_masks(m, pruning.masks_of(start))
        m.load_state_dict(start.state_dict())
        models.append(m)
    history = fit(models[0], cfg, (x, y), (x[:40], y[:40]))
    sizes = _plain_loop(models[1], cfg, x, y)
    assert sizes == ([16] * 6 + [5]) * 2
    ours, theirs = pruning.plain_state_dict(models[0]), pruning.plain_state_dict(models[1])
    for name in ours:
        assert ours[name].numpy().tobytes() == theirs[name].numpy().tobytes(), name
    assert not torch.equal(ours["fc3.weight"], pruning.plain_state_dict(start)["fc3.weight"])  # it trained
    assert history[-1]["val_accuracy"] == accuracy(models[1], x[:40], y[:40])


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_step_with_a_0_dim_tensor_rate_gives_the_float_s_bytes(nesterov):
    """A captured CUDA graph hands the optimizer the rate as a 0-dim float32 tensor (CudaGraphStep.lr),
    eager steps a Python float: 30 steps of a cosine schedule give the same bytes either way."""
    cfg = _cfg(nesterov=nesterov)
    models = [make("lenet_300_100") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [SGD(m.parameters(), cfg) for m in models]
    rate = torch.zeros(())  # float32, as CudaGraphStep makes it
    x = torch.randn(8, 784, generator=torch.Generator().manual_seed(4))
    for step, lr in enumerate(learning_rates(cfg, 30)):
        for m in models:
            m.zero_grad(set_to_none=True)
            m(x * (step % 5)).square().mean().backward()
        optimizers[0].step(lr)
        rate.fill_(lr)
        optimizers[1].step(rate)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert a.detach().numpy().tobytes() == b.detach().numpy().tobytes()


def test_one_hot_codebook_gradient_is_indexing_s_on_the_cpu():
    """Weight sharing's CUDA path (the product with the codes' one-hot matrix, SharedWeight._members)
    computed on the CPU: indexing's gradient and the CPU path's (bincount) up to rounding, and
    exactly for gradients that are small integers (every sum exact)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (30, 40), generator=g)
    codebook = torch.randn(16, generator=g)
    members = F.one_hot(codes.flatten(), 16).float()
    for grad in (torch.randn(30, 40, generator=g), torch.randint(-3, 4, (30, 40), generator=g).float()):
        got = {}
        for path, m in (("one-hot", members), ("bincount", None)):
            c = codebook.clone().requires_grad_()
            out = quantize._Lookup.apply(c, codes, m)
            assert torch.equal(out, codebook[codes])
            out.backward(grad)
            got[path] = c.grad
        reference = codebook.clone().requires_grad_()
        reference[codes].backward(grad)
        exact = bool((grad == grad.round()).all())
        for path, value in got.items():
            if exact:
                assert torch.equal(value, reference.grad), path
            else:
                assert torch.allclose(value, reference.grad, atol=1e-5), path
