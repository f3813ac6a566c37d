"""Issue 40: training that diverges stops at once with one clear line; a checkpoint or compressed
file with non-finite weights is refused where it is loaded, naming the file and the tensor; a model
at chance level is no result of select, quantize or evaluate; errors relayed from torch lose
torch's advice to its own users. Stages run in this process on the tiny data (tests.tiny.run_stage,
the project fixture of test_stage_errors), and leave their earlier outputs as they were."""
import pickle
import re

import pytest
import torch

from hanprune import __main__ as cli
from hanprune import encoding, io, pruning, train
from hanprune.config import Training
from hanprune.errors import torch_text
from hanprune.models import make
from hanprune.selection import ChanceLevelError, refuse_chance_level
from tests import tiny
from tests.test_stage_errors import _set, _write_compressed
from tests.tiny import OLD, PRUNE, edit_params

OUTPUTS = ("out.pt", "metrics.json", "plot.csv")  # the project fixture's files of an earlier run


def _state(project) -> dict:
    """Bytes and modification time of the earlier run's outputs, and the files beside them."""
    return {name: ((project / name).read_bytes(), (project / name).stat().st_mtime_ns) for name in OUTPUTS} | \
        {"files": sorted(p.name for p in project.iterdir())}


def _run(capsys, script, *args) -> tuple[int, str, str]:
    code = tiny.run_stage(script, *args)
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    """The one `error: ` line (a stage that reached MLflow may print its warning beside it)."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert all(line.startswith(("error:", "warning:")) for line in err.splitlines()), err
    return errors[0]


# -- training that diverges --------------------------------------------------------------------

def _data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _cfg(**change):
    return Training(**{"seed": 1, "epochs": 2, "batch_size": 16, "lr": 1e6, "momentum": 0.9, "schedule": "cosine",
                       "regularization": {"kind": "l2", "strength": 1e-4}, "shift": 2, **change})


DIVERGED = (r"^prune x-iter1: training diverged: the loss is (nan|inf) at epoch 1, step (\d+) of 13 "
            r"\(learning rate ([0-9.e+]+)\); try a smaller learning rate \(prune\.x-iter1\.lr\)$")


def _fit_counting_steps(monkeypatch, cfg, x, y):
    """fit's TrainingError, the SGD steps it took and the epochs it logged."""
    steps, logged = [], []
    real = train.SGD.step
    monkeypatch.setattr(train.SGD, "step", lambda self, lr: (steps.append(lr), real(self, lr)))
    with pytest.raises(train.TrainingError) as e:
        train.fit(make("lenet_300_100"), cfg, (x, y), (x[:50], y[:50]), log=logged.append,
                  label="prune x-iter1", lr_key="prune.x-iter1.lr")
    return str(e.value), steps, logged


def test_fit_stops_at_the_first_non_finite_loss_naming_epoch_step_loss_and_rate(monkeypatch):
    """On the CPU every step's loss is read: the step that gave the first non-finite one is the last
    step taken, no epoch is logged, and the message names that step's rate."""
    x, y = _data()
    message, steps, logged = _fit_counting_steps(monkeypatch, _cfg(), x, y)
    match = re.match(DIVERGED, message)
    assert match, message
    step = int(match[2])
    assert 1 < step < 13 and len(steps) == step  # it diverged within the epoch, and stopped there
    assert float(match[3]) == pytest.approx(steps[-1], rel=1e-3) and steps[-1] > 1e5  # the rate of that step
    assert logged == []  # no epoch record: nothing to write


def test_on_devices_read_once_per_epoch_the_first_bad_step_is_still_named(monkeypatch):
    """The path of CUDA (no host sync per step: the losses go to a device buffer, read at the epoch's
    end), run on the CPU: the same step and loss as reading each step, the epoch finished, no
    second epoch."""
    x, y = _data()
    per_step, _, _ = _fit_counting_steps(monkeypatch, _cfg(), x, y)
    monkeypatch.setattr(train, "READ_EACH_STEP", set())
    message, steps, logged = _fit_counting_steps(monkeypatch, _cfg(), x, y)
    assert message == per_step
    assert len(steps) == 13 and logged == []  # the rest of epoch 1, then the stop


def test_weights_that_the_last_step_makes_non_finite_are_caught_too():
    """One step whose loss is finite (an untrained model, bright images: logits near 1e10) and whose
    update is not (gradients near 1e10 at a rate of 1e30): no loss follows to show it, the weights
    after fit are checked."""
    x, y = _data(16)
    x = x * 1e10
    with pytest.raises(train.TrainingError, match=r"^training diverged: after the last step \(epoch 1, step 1 of 1\), "
                                                  r"fc\d\.(weight|bias) holds \d+ non-finite values .*\(learning rate "
                                                  r"1e\+30\); try a smaller learning rate$"):
        train.fit(make("lenet_300_100"), _cfg(epochs=1, lr=1e30, shift=0), (x, y), (x, y))


def test_a_finite_run_is_unchanged():
    x, y = _data()
    history = train.fit(make("lenet_300_100"), _cfg(epochs=1, lr=0.01), (x, y), (x[:50], y[:50]))
    assert len(history) == 1 and 0 < history[0]["train_loss"] < 10


def test_a_diverging_round_exits_1_with_one_error_line_and_writes_nothing(project, capsys):
    edit_params(project, _set(["prune", "lenet_300_100-iter1", "lr"], 1e6))
    before = _state(project)
    code, out, err = _run(capsys, *PRUNE)
    line = _error_line(err)
    assert code == 1
    assert re.match(r"^error: prune lenet_300_100-iter1: training diverged: the loss is (nan|inf) at epoch 1, "
                    r"step \d+ of 16 \(learning rate [0-9.e+]+\); try a smaller learning rate "
                    r"\(prune\.lenet_300_100-iter1\.lr\)$", line), line
    assert " epoch 1: " not in out  # stopped within the first epoch
    assert _state(project) == before


# -- non-finite weights in files ---------------------------------------------------------------

def _nan_row(project, name="start.pt"):
    ckpt = torch.load(project / "models/lenet_300_100/dense.pt", weights_only=True)
    ckpt["state_dict"]["fc2.weight"][3] = float("nan")
    io.save_torch(project / name, ckpt)
    return project / name


def test_a_start_checkpoint_with_a_nan_row_is_refused_naming_file_and_tensor(project, capsys):
    _nan_row(project)
    before = _state(project)
    args = list(PRUNE)
    args[args.index("--start") + 1] = "start.pt"
    code, out, err = _run(capsys, *args)
    assert code == 1 and err == ("error: start.pt: refused: fc2.weight holds 300 non-finite values (nan) of 30000, the "
                                 "first at [3, 0]; the training that wrote it diverged (or the file was altered)\n")
    assert out == "" and _state(project) == before


def test_load_checkpoint_names_the_first_tensor_in_order(project):
    ckpt = torch.load(_nan_row(project), weights_only=True)
    ckpt["state_dict"]["fc1.bias"][7] = float("inf")
    io.save_torch(project / "both.pt", ckpt)
    with pytest.raises(pruning.CheckpointError, match=r"both.pt: refused: fc1.bias holds 1 non-finite values \(inf\) "
                                                      r"of 300, the first at \[7\];"):
        pruning.load_checkpoint(project / "both.pt", "lenet_300_100")


def test_decode_refuses_a_file_whose_decoded_weights_are_not_finite(tmp_path, capsys):
    model = make("lenet_300_100")
    layers = {name: encoding.QuantizedLayer(torch.zeros(m.weight.shape, dtype=torch.int64),
                                            torch.tensor([float("nan") if name == "fc2" else 0.5]), m.bias.detach())
              for name, m in [("fc1", model.fc1), ("fc2", model.fc2), ("fc3", model.fc3)]}
    (tmp_path / "c.bin").write_bytes(encoding.encode("lenet_300_100", "lenet_300_100", {}, layers))
    with pytest.raises(SystemExit) as e:
        cli.main(["decode", str(tmp_path / "c.bin"), "--out", str(tmp_path / "out.pt")])
    assert e.value.code == 1 and not (tmp_path / "out.pt").exists()
    assert capsys.readouterr().err == (f"error: {tmp_path / 'c.bin'}: refused: its decoded fc2.weight holds 30000 "
                                       "non-finite values (nan) of 30000, the first at [0, 0]; the training that made "
                                       "it diverged (or the file was altered)\n")


# -- chance level ------------------------------------------------------------------------------

def test_chance_level_rule():
    refuse_chance_level("m", 0.1501, 10, "x")  # above 1/10 + 0.05
    refuse_chance_level("m", 0.31, 4, "x")
    for accuracy, classes in [(0.15, 10), (0.0, 10), (0.1, 10), (0.30, 4), (0.55, 2)]:
        with pytest.raises(ChanceLevelError, match=rf"^m: validation accuracy {accuracy:.4f} is at chance level "
                                                   rf"\({classes} classes: at most 1/{classes} \+ 0.05 = "):
            refuse_chance_level("m", accuracy, classes, "x")


def _round(val):
    return {"iteration": 1, "val_before": 0.9, "val_pruned": 0.5, "val_retrained": val, "params_nonzero": 1,
            "compression": 2.0, "kept": {"fc1": 0.5, "fc2": 0.5, "fc3": 0.5}}


def _rounds(project, val):
    model = make("lenet_300_100")
    io.save_torch(project / "rounds/iter1.pt", pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model,
                                                                  pruning.weight_std(model), [_round(val)]))


def test_select_refuses_a_round_at_chance_level(project, capsys):
    _rounds(project, 0.12)
    before = _state(project)
    code, out, err = _run(capsys, "select_round", "lenet_300_100", "--rounds", "rounds", "--out", "out.pt",
                          "--metrics", "metrics.json")
    assert code == 1 and err == ("error: select lenet_300_100: round 1 (rounds/iter1.pt): validation accuracy 0.1200 "
                                 "is at chance level (10 classes: at most 1/10 + 0.05 = 0.1500); lower models."
                                 "lenet_300_100.select.noise, prune less or retrain slower; nothing written\n")
    assert _state(project) == before


def test_evaluate_refuses_a_pruned_model_at_chance_level_and_registers_nothing(project, capsys):
    _rounds(project, 0.11)
    _write_compressed(project / "compressed.bin", make("lenet_300_100"))
    before = _state(project)
    code, out, err = _run(capsys, "evaluate", "lenet_300_100", "--dense", "models/lenet_300_100/dense.pt",
                          "--pruned", "rounds/iter1.pt", "--compressed", "compressed.bin", "--storage", "storage",
                          "--rounds", "rounds", "--selection", "selection.json", "--metrics", "metrics.json",
                          "--plots", "plots")
    assert code == 1 and _error_line(err).startswith("error: evaluate lenet_300_100: rounds/iter1.pt: validation "
                                                     "accuracy 0.1100 is at chance level (10 classes")
    assert _state(project) == before and not (project / "mlflow.db").exists()


def test_quantize_refuses_a_weight_shared_model_at_chance_level(project, capsys):
    """A model that answers one class whatever the image (a bias of 1000) stays so through weight
    sharing and a short fine-tuning (class 0: 10 of the tiny data's 100 validation images)."""
    model = make("lenet_300_100")
    with torch.no_grad():
        model.fc3.bias[0] += 1000.0
    io.save_torch(project / "pruned.pt", pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model,
                                                            pruning.weight_std(model), [_round(0.9)]))
    before = _state(project)
    code, out, err = _run(capsys, "quantize", "lenet_300_100", "--data", "data", "--pruned", "pruned.pt",
                          "--out", "out.pt", "--metrics", "metrics.json")
    line = _error_line(err)
    assert code == 1 and re.match(r"^error: quantize lenet_300_100: the weight-shared model \(val 0\.\d+ before\): "
                                  r"validation accuracy 0\.\d+ is at chance level \(10 classes: at most 1/10 \+ 0.05 = "
                                  r"0\.1500\); give models\.lenet_300_100\.quantize\.bits more bits or fine-tune "
                                  r"slower; nothing written$", line), line
    assert _state(project) == before


# -- torch's advice ----------------------------------------------------------------------------

def test_torch_text_keeps_the_meaning_and_drops_the_advice(tmp_path):
    blob = tmp_path / "m.pt"
    torch.save({"layer": torch.nn.Linear(2, 2)}, blob)
    with pytest.raises(pickle.UnpicklingError) as e:
        torch.load(blob, weights_only=True)
    raw = str(e.value)
    assert "weights_only` set to `False`" in raw and "add_safe_globals" in raw  # what torch says
    assert torch_text(e.value) == ("Weights only load failed. WeightsUnpickler error: Unsupported global: GLOBAL "
                                   "torch.nn.modules.linear.Linear was not an allowed global by default.")
    assert torch_text("Expected t.is_cpu() to be true, but got false.  (Could this error message be improved?  If "
                      "so, please report an enhancement request to PyTorch.)") == \
        "Expected t.is_cpu() to be true, but got false."
    assert torch_text("size mismatch for fc1.weight:\n\tcopying a param") == \
        "size mismatch for fc1.weight: copying a param"  # one line


def test_a_checkpoint_error_relayed_from_torch_loses_its_advice(tmp_path, monkeypatch):
    from torch.serialization import UNSAFE_MESSAGE
    (tmp_path / "x.pt").write_bytes(b"x")
    for raised, expected in [
        (RuntimeError("Expected !size_bytes_is_heap_allocated_ to be true, but got false.  (Could this error "
                      "message be improved?  If so, please report an enhancement request to PyTorch.)"),
         "x.pt: not a readable checkpoint (RuntimeError: Expected !size_bytes_is_heap_allocated_ to be true, but got "
         "false.)"),
        (pickle.UnpicklingError(f"Weights only load failed. {UNSAFE_MESSAGE}\nPlease file an issue with the following "
                                "so that we can make `weights_only=True` compatible with your use case: "
                                "WeightsUnpickler error: \n\nUnsupported operand 149"),
         "x.pt: refused unread: it holds objects that a checkpoint of this project never holds (Weights only load "
         "failed. WeightsUnpickler error: Unsupported operand 149); checkpoints come from the pretrain, prune and "
         "quantize stages")]:
        def load(*args, **kwargs):
            raise raised
        monkeypatch.setattr(torch, "load", load)
        with pytest.raises(pruning.CheckpointError) as e:
            pruning.load_checkpoint(tmp_path / "x.pt")
        assert str(e.value) == f"{tmp_path}/{expected}"
