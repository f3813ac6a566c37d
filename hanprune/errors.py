"""The base of every error this project raises on purpose: bad params, data, checkpoints or files.
A stage prints these as one line; anything else is a bug and keeps its traceback."""
import re


class HanpruneError(Exception):
    pass


class DataError(HanpruneError):
    """A dataset that cannot be fetched, or whose files are not what they must be."""


# Advice that torch appends to its errors, for torch's own users: a project that relays the error
# (in one line, naming its own file) keeps the meaning and drops these. In particular the advice to
# load with weights_only=False: this project never executes a file's pickled code.
_TORCH_ADVICE = [
    r"\x1b\[[0-9;]*m",  # terminal bold
    r"\(Could this error message be improved\? If so, please report an enhancement request to PyTorch\.\)",
    r"This file can still be loaded, to do so you have two options, do those steps only if you trust "
    r"the source of the checkpoint\.",
    r"(\(1\) )?In PyTorch [\d.]+, we changed the default value of the `weights_only` argument in `torch\.load` "
    r"from `False` to `True`\.",
    r"Re-running `torch\.load` with `weights_only` set to `False` will likely succeed, but it can result in "
    r"arbitrary code execution\. Do it only if you got the file from a trusted source\.",
    r"(\(2\) )?Alternatively, to load with `weights_only=True` please check the recommended steps in the "
    r"following error message\.",
    r"Please use `torch\.serialization\.add_safe_globals\(\[[^\]]*\]\)` or the `torch\.serialization\."
    r"safe_globals\(\[[^\]]*\]\)` context manager to allowlist this global if you trust this class/function\.",
    r"Please file an issue with the following so that we can make `weights_only=True` compatible with your "
    r"use case:",
    r"Check the documentation of torch\.load to learn more about types accepted by default with "
    r"weights_only \S+\.",
]


def torch_text(error: BaseException | str) -> str:
    """The text of an error raised by torch in one line, without torch's advice to its own users
    (_TORCH_ADVICE): "Weights only load failed. WeightsUnpickler error: Unsupported global: GLOBAL
    getattr was not an allowed global by default." from torch's 10-line answer."""
    text = re.sub(_TORCH_ADVICE[0], "", str(error))
    text = " ".join(text.split())
    for advice in _TORCH_ADVICE[1:]:
        text = re.sub(r"\s*" + advice, "", text)
    return " ".join(text.split())
