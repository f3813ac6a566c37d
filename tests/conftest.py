"""Shared fixtures for the unit tests. Nothing here touches real MNIST or the network."""
import copy
import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `hanprune` and `tests.tiny` importable however pytest is started
    sys.path.insert(0, str(ROOT))

from hanprune import runtime  # noqa: E402

# A logging call that fails against the tests' local stores is a bug: raise it (hanprune/tracking.py).
# Set here, so that the stages the tests run as processes inherit it.
os.environ["HANPRUNE_STRICT_TRACKING"] = "1"

runtime.configure(True)  # params.yaml runs in the portable mode; its settings must precede torch's import
import torch  # noqa: E402

torch.set_num_threads(1)

PARAMS_FILE = ROOT / "params.yaml"


@pytest.fixture(autouse=True)
def _torch_state():
    """Every test starts from the same random state, so a freshly built model is the same in every
    run (an unseeded init draws an exact 0.0 about once in 60 LeNet-300-100s: "dense" would then
    keep 0.999996). A test (or a stage run in-process) that sets the thread count or turns oneDNN
    off leaves them as they were for the next test."""
    torch.manual_seed(0)
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn


@pytest.fixture(scope="session")
def _project_params() -> dict:
    return yaml.safe_load(PARAMS_FILE.read_text())


@pytest.fixture
def project_params(_project_params) -> dict:
    """A fresh deep copy of the project's params.yaml, to mutate."""
    return copy.deepcopy(_project_params)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory for running stages (tests.tiny.stage_project): the tiny data, a valid
    params.yaml, a dense lenet_300_100 and, at the outputs the stages would write, earlier files."""
    from tests.tiny import stage_project
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never reached: errors come first
    return stage_project(tmp_path)
