"""Sparse-kernel versions of a pruned model for the inference benchmark (benchmarks/run.py), each
computing the same function as the torch model it is built from, with scipy's public API only."""
import copy

import numpy as np
import scipy.sparse
import torch
from torch import nn

from hanprune.models import prunable_layers


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
    per-operator dispatch, so the ratio of the two is what sparsity alone buys at batch 1."""

    def __init__(self, model: nn.Module, sparse: bool):
        self.sparse = sparse
        self.layers = [(scipy.sparse.csr_matrix(l.weight.detach().numpy()) if sparse else l.weight.detach().numpy(),
                        l.bias.detach().numpy()[:, None]) for l in prunable_layers(model).values()]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x.numpy().reshape(len(x), -1).T  # features x batch
        for i, (w, b) in enumerate(self.layers):
            h = w @ h + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0)
        return torch.from_numpy(np.ascontiguousarray(h.T))


def with_sparse_linears(model: nn.Module, kind) -> nn.Module:
    """A copy of `model` whose Linear layers use a sparse kernel; conv layers stay dense (torch
    has no sparse convolution on the CPU; at these sizes im2col + sparse GEMM does not pay)."""
    model = copy.deepcopy(model)
    for name, layer in list(prunable_layers(model).items()):
        if isinstance(layer, nn.Linear):
            setattr(model, name, kind(layer))
    return model
