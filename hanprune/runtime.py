"""The one owner of a process's numeric mode, device and seeds.

configure(portable) must run before torch's first operation: ATen reads ATEN_CPU_CAPABILITY at its
first dispatch and MKL reads MKL_CBWR at its first call, not at `import torch` (checked: set after the
import, both take effect; start() verifies the capability). start(...) then picks the device, seeds
and fixes the thread count, once per process.

Portable mode gives the same bytes on any x86-64 CPU with AVX2, of either vendor, at a fixed thread
count (README, "Reproducibility", and docs/numerics.md for what was measured on which CPU):
- ATen's own vectorised kernels (sums, losses, SGD, im2col) are compiled for AVX2 and AVX-512 and
  differ in their bits: ATEN_CPU_CAPABILITY=avx2 pins the AVX2 ones, whatever the vendor;
- MKL's GEMM kernels differ by CPU: MKL_CBWR=COMPATIBLE pins the one code path that oneMKL documents
  to give the same results on Intel and non-Intel CPUs alike, for a fixed thread count (its AVX2
  branch does so on Intel CPUs only: on others MKL takes another one);
- oneDNN promises run-to-run determinism on one platform only, and its convolutions choose their
  blocking from the CPU's cache sizes; without it ATen would run them in NNPACK, which blocks by
  the cache sizes too. So in portable mode oneDNN is off and every convolution runs as
  hanprune.kernels writes it: a channels-last im2col (aten::copy_), one GEMM forward (aten::addmm)
  and two backward (aten::mm), both MKL's COMPATIBLE branch, and strided adds (aten::add_), the
  kernels torch.profiler names in a portable training step.
"""
import os

from .errors import HanpruneError

PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}


class RuntimeConfigError(HanpruneError):
    pass


def configure(portable: bool) -> None:
    """Set the portable mode's library settings in the environment (before torch's first operation)."""
    if portable:
        os.environ.update(PORTABLE_ENV)


def pick_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeConfigError("run.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def start(device: str, threads: int, portable: bool, seed: int):
    """Pick the device, check the numeric mode, seed and fix the thread count; return the device.
    On CUDA also force deterministic kernels (cuBLAS needs its workspace setting for that) and
    full float32 convolutions. The CPU kernels used here are deterministic for a fixed thread count
    without the flag."""
    import torch
    dev = pick_device(device)
    if portable:
        capability = torch.backends.cpu.get_cpu_capability()
        unset = {k: v for k, v in PORTABLE_ENV.items() if os.environ.get(k) != v}
        if capability != "AVX2" or unset:
            raise RuntimeConfigError(
                f"run.portable is true but torch runs its {capability} kernels"
                + (f" and {', '.join(f'{k}={v}' for k, v in unset.items())} is not set" if unset else "")
                + ": portable mode needs a CPU with AVX2 and runtime.configure(True) before torch's "
                  "first operation (stages/common.run_stage does it); or set run.portable: false")
        torch.backends.mkldnn.enabled = False
    torch.manual_seed(seed)
    torch.set_num_threads(threads or os.cpu_count())
    if dev.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # The public switch also sets torch.compile's flag, importing torch._inductor and
        # torch._dynamo: 0.78 s at each CUDA stage's start (measured on the 2-core Xeon, torch 2.14.1),
        # the price of not calling the private switch directly.
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.allow_tf32 = False  # float32 convolutions, as on the CPU (TF32 is cuDNN's default)
    return dev
