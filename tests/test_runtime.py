"""The numeric mode's and the device's refusals (hanprune.runtime.start), and how a stage finds
run.portable before torch's first operation (stages/common.py: portable_requested)."""
import os
from pathlib import Path

import pytest
import torch
import yaml

from hanprune import runtime

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_runtime():
    """runtime.start sets the seed, the thread count and oneDNN: conftest's fixture restores the
    last two; the seed is re-set here."""
    yield
    torch.manual_seed(0)


def test_portable_mode_on_other_kernels_is_refused(monkeypatch, restore_runtime):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with pytest.raises(runtime.RuntimeConfigError) as e:
        runtime.start("cpu", 1, True, 0)
    assert str(e.value) == ("run.portable is true but torch runs its AVX512 kernels: portable mode needs a CPU with "
                            "AVX2 and runtime.configure(True) before torch's first operation (stages/common.run_stage does "
                            "it); "
                            "or set run.portable: false")


def test_portable_mode_without_its_settings_is_refused_and_names_them(monkeypatch, restore_runtime):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.delenv("MKL_CBWR", raising=False)
    with pytest.raises(runtime.RuntimeConfigError, match=r"torch runs its AVX2 kernels and MKL_CBWR=COMPATIBLE is "
                                                         r"not set: portable mode needs"):
        runtime.start("cpu", 1, True, 0)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert runtime.start("cpu", 1, True, 0) == torch.device("cpu")
    assert not torch.backends.mkldnn.enabled and torch.get_num_threads() == 1


def test_the_fast_mode_takes_any_kernels(monkeypatch, restore_runtime):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("MKL_CBWR", raising=False)
    assert runtime.start("cpu", 1, False, 0) == torch.device("cpu")


def test_cuda_without_a_cuda_device_is_refused_and_auto_takes_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(runtime.RuntimeConfigError, match="run.device is 'cuda' but no CUDA device is available; "
                                                         "use 'auto' or 'cpu'"):
        runtime.pick_device("cuda")
    assert runtime.pick_device("auto") == torch.device("cpu") == runtime.pick_device("cpu")


def test_configure_sets_the_portable_settings_only_when_asked(monkeypatch):
    for key in runtime.PORTABLE_ENV:
        monkeypatch.delenv(key, raising=False)
    runtime.configure(False)
    assert not any(k in os.environ for k in runtime.PORTABLE_ENV)
    runtime.configure(True)
    assert {k: os.environ[k] for k in runtime.PORTABLE_ENV} == runtime.PORTABLE_ENV


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "stages"))
    import common
    return common


PROBE = """
import hashlib, os, sys
if sys.argv[1] == "before":
    from hanprune import runtime; runtime.configure(True)
import torch
if sys.argv[1] == "after":
    from hanprune import runtime; runtime.configure(True)
torch.manual_seed(0); torch.set_num_threads(1)
a, b = torch.randn(257, 129), torch.randn(129, 65)
print(torch.backends.cpu.get_cpu_capability(), hashlib.md5((a @ b).numpy().tobytes()).hexdigest())
"""


def test_the_portable_settings_take_effect_when_set_after_torch_is_imported():
    """run_stage configures the mode after the stage script's imports (torch among them) and before
    main(): ATen and MKL read their settings at their first operation, not at import."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in runtime.PORTABLE_ENV}
    out = {when: subprocess.run([sys.executable, "-c", PROBE, when], capture_output=True, text=True, check=True,
                                cwd=ROOT, env=env).stdout for when in ("before", "after")}
    assert out["before"] == out["after"] and out["before"].startswith("AVX2 ")


def _params(path: Path, portable) -> str:
    path.write_text(yaml.safe_dump({"run": {"portable": portable}}))
    return str(path)


def test_portable_requested_reads_the_params_file_named_on_the_command_line(common, tmp_path, monkeypatch):
    on, off = _params(tmp_path / "on.yaml", True), _params(tmp_path / "off.yaml", False)
    assert common.portable_requested(["lenet5", "--params", on]) is True
    assert common.portable_requested(["lenet5", f"--params={on}", "--out", "x"]) is True
    assert common.portable_requested(["--params", off]) is False
    assert common.portable_requested(["--params", off, "--params", on]) is True  # the last one, as argparse takes it
    monkeypatch.chdir(tmp_path)
    assert common.portable_requested(["lenet5"]) is False  # no params.yaml here
    _params(tmp_path / "params.yaml", True)
    assert common.portable_requested(["lenet5", "--out", "x"]) is True  # the default file


@pytest.mark.parametrize("content", ["run: [", "run: {portable: yes please}", "run: {}", "[1, 2]", "run: {portable: 1}"])
def test_portable_requested_is_false_for_what_config_load_reports(common, tmp_path, content):
    path = tmp_path / "p.yaml"
    path.write_text(content)
    assert common.portable_requested(["--params", str(path)]) is False
    assert common.portable_requested(["--params"]) is False  # no value: the stage's parser says so
    assert common.portable_requested(["--params", str(tmp_path / "missing.yaml")]) is False


def test_the_project_s_params_ask_for_the_portable_mode(common):
    assert common.portable_requested(["--params", str(ROOT / "params.yaml")]) is True
