"""hanprune.kernels: the portable mode's convolution against torch's, values and gradients, in float64."""
import pytest
import torch
import torch.nn.functional as F

from hanprune import kernels

GEOMETRIES = [  # (input shape, weight shape, conv2d keywords)
    ((2, 1, 28, 28), (6, 1, 5, 5), {}),
    ((3, 4, 11, 9), (5, 4, 3, 2), {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)}),
    ((2, 3, 8, 8), (4, 3, 3, 3), {"stride": 2, "padding": 1}),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("x_shape,w_shape,kwargs", GEOMETRIES)
def test_conv2d_equals_torch_in_value_and_gradient(x_shape, w_shape, kwargs, channels_last, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(w_shape, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(w_shape[0], generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, w) + ((b,) if bias else ())
    want = F.conv2d(x, w, b, **kwargs)
    got = kernels.conv2d(x, w, b, **kwargs)
    torch.testing.assert_close(got, want)
    weights = torch.randn(want.shape, generator=g, dtype=torch.float64)  # a loss whose gradient is not uniform
    for a, e in zip(torch.autograd.grad((got * weights).sum(), inputs), torch.autograd.grad((want * weights).sum(), inputs)):
        torch.testing.assert_close(a, e)


def test_the_mode_runs_plain_convolutions_and_leaves_the_rest_to_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "conv2d", lambda *a, **k: calls.append(k) or torch.zeros(()))
    x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 2, 3, 3)
    with kernels.PortableConvolutions():
        F.conv2d(x, w[:, :1].repeat(1, 4, 1, 1), padding=1)
        grouped = F.conv2d(x, w, groups=2)  # groups != 1: torch's own
        same = F.conv2d(x, w[:, :1].repeat(1, 4, 1, 1), padding="same")  # string padding: torch's own
    assert calls == [{"padding": 1}]
    assert grouped.shape == (1, 4, 4, 4) and same.shape == (1, 4, 6, 6)
