"""The portable mode's convolutions: each 2-D convolution as one im2col and one GEMM.

With oneDNN off (the portable mode, hanprune/runtime.py), ATen runs a CPU convolution forward in
NNPACK (`aten::_nnpack_spatial_convolution`), which blocks its work by the cache sizes it reads
from the CPU, and the backward in a loop over the images of the batch
(`aten::convolution_backward`: thousands of small `aten::sum`/`aten::fill_` calls). Here the
image is laid out channels-last, its windows are copied into one row per output position
(`aten::copy_` of a strided view) and multiplied by the kernel in one GEMM per layer and step
(`aten::addmm`; the backward's two GEMMs are `aten::mm`: MKL's, pinned by MKL_CBWR=COMPATIBLE), and
the backward adds each window offset's gradient back into the image (`aten::add_`, kh * kw of them,
in a fixed order), all named by torch.profiler. The copies and adds are exact or elementwise, the
same on any CPU; only the GEMMs sum, in MKL's reproducible branch.

The layout is what makes it fast: an earlier version (F.unfold, channels-first rows, F.fold in the
backward) spent 36% of a lenet5_caffe step in transposing copies. With this one, 75% of the step is
the GEMMs, and MKL's COMPATIBLE branch is what bounds the mode: on a 2-core Intel Xeon (model 167)
it ran these GEMMs at 26-70 GFLOP/s against 103-219 with its default branch (benchmarks/RESULTS.md).

PortableConvolutions is a torch function mode: inside it, every torch.conv2d (which nn.Conv2d and
F.conv2d call) with a 4-D input, integer padding and one group runs so; anything else runs as torch
would. train.fit and train.accuracy enter it in the portable mode on the CPU (kernels(device)).
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class _Windows(torch.autograd.Function):
    """The im2col of an image batch in channels-last order: xp (n, h, w, c), already padded, to rows
    (n * oh * ow, kh * kw * c), one per output position, by one copy of a strided view. The backward
    adds each of the kh * kw window offsets' gradients into the image's, in a fixed order: kh * kw
    strided ATen adds instead of autograd's general as_strided backward."""

    @staticmethod
    def forward(ctx, xp, kh, kw, oh, ow, sh, sw, dh, dw):
        n, _, _, c = xp.shape
        s_n, s_h, s_w, s_c = xp.stride()
        windows = xp.as_strided((n, oh, ow, kh, kw, c), (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c))
        ctx.geometry = xp.shape, (kh, kw, oh, ow, sh, sw, dh, dw)
        return windows.reshape(n * oh * ow, kh * kw * c)

    @staticmethod
    def backward(ctx, grad_rows):
        shape, (kh, kw, oh, ow, sh, sw, dh, dw) = ctx.geometry
        grad_rows = grad_rows.view(shape[0], oh, ow, kh, kw, shape[3])
        grad = grad_rows.new_zeros(shape)
        for i in range(kh):
            for j in range(kw):
                grad[:, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw] += grad_rows[:, :, :, i, j]
        return grad, *[None] * 8


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """F.conv2d as one im2col in channels-last order (_Windows) and one matrix product over all
    images and positions. The result is (n, out channels, h, w) in shape with channels-last strides,
    which the next layer's im2col reads without a copy."""
    n, _, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph)).contiguous()
    rows = _Windows.apply(xp, kh, kw, oh, ow, sh, sw, dh, dw)
    kernel = weight.permute(0, 2, 3, 1).reshape(out_channels, -1).t()
    out = rows @ kernel if bias is None else torch.addmm(bias, rows, kernel)
    return out.view(n, oh, ow, out_channels).permute(0, 3, 1, 2)


def _as_gemm(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> bool:
    return (isinstance(x, torch.Tensor) and x.dim() == 4 and weight.dim() == 4 and groups == 1
            and not isinstance(padding, str))


class PortableConvolutions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d and _as_gemm(*args, **kwargs):
            return conv2d(*args, **kwargs)
        return func(*args, **kwargs)


def kernels(device: torch.device):
    """The context the training loop and the evaluation run in: PortableConvolutions in the portable
    mode (oneDNN off, runtime.start) on the CPU, else nothing."""
    if device.type == "cpu" and not torch.backends.mkldnn.enabled:
        return PortableConvolutions()
    return contextlib.nullcontext()
