"""The portable mode's convolutions: each 2-D convolution as one unfold (im2col) and one GEMM.

With oneDNN off (the portable mode, hanprune/runtime.py), ATen runs a CPU convolution forward in
NNPACK (`aten::_nnpack_spatial_convolution`), which blocks its work by the cache sizes it reads
from the CPU, and the backward in a loop over the images of the batch
(`aten::convolution_backward`: thousands of small `aten::sum`/`aten::fill_` calls). Written as
unfold + GEMM, autograd gives the backward as the GEMM's two transposes and a fold (col2im):
`aten::im2col`, `aten::addmm`/`aten::mm` (MKL's GEMM, pinned by MKL_CBWR=COMPATIBLE) and
`aten::col2im` (profiled with torch.profiler; benchmarks/RESULTS.md gives the times). im2col and
col2im are loops that add in a fixed order, whatever the CPU; the GEMM is one large call per layer
and step instead of one per image.

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


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """F.conv2d as F.unfold and one matrix product over all images and positions. The result has
    the channels-last strides of that product (a view: (n, out channels, h, w) in shape)."""
    n, _, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))  # (n, c*kh*kw, oh*ow)
    rows = cols.transpose(1, 2).reshape(n * oh * ow, -1)
    kernel = weight.reshape(out_channels, -1).t()
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
