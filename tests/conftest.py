"""Shared fixtures for the unit tests. Nothing here touches real MNIST or the network."""
import copy
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `hanprune` and `tests.tiny` importable however pytest is started
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(1)

PARAMS_FILE = ROOT / "params.yaml"


@pytest.fixture(scope="session")
def _project_params() -> dict:
    return yaml.safe_load(PARAMS_FILE.read_text())


@pytest.fixture
def project_params(_project_params) -> dict:
    """A fresh deep copy of the project's params.yaml, to mutate."""
    return copy.deepcopy(_project_params)
