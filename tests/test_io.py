"""Outputs are written atomically: a failure while writing (disk full, a kill) leaves the old file."""
import errno
import os
import urllib.request
from pathlib import Path

import pytest
import torch

from hanprune import datasets, io, sources
from hanprune.errors import DataError


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out" / "m.json"
    io.write_json(target, {"a": 1})
    io.write_json(target, {"a": 2})
    assert target.read_text().strip().endswith("}") and '"a": 2' in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == ["m.json"]


def test_disk_full_while_saving_keeps_old_output(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    io.save_torch(target, {"w": torch.ones(3)})
    old = target.read_bytes()

    def full(self, data):
        self.open("wb").write(data[: len(data) // 2])  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match="No space left on device"):
        io.save_torch(target, {"w": torch.zeros(1000)})
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_names_the_file_and_the_bytes_it_needed(tmp_path, monkeypatch, error):
    """What the OS raises on a full disk names no file (issue 29.6): the error names the target,
    not the temporary file, and how many bytes were being written."""
    target = tmp_path / "compressed.bin"
    target.write_bytes(b"old")

    def full(self, data):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError) as e:
        io.write_bytes(target, bytes(70000))
    monkeypatch.undo()
    assert e.value.errno == error and e.value.filename == str(target)
    assert str(e.value) == f"[Errno {error}] {os.strerror(error)} (writing 70000 bytes): '{target}'"
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["compressed.bin"]


def test_an_error_that_names_its_file_is_raised_as_it_is(tmp_path, monkeypatch):
    def denied(self, data):
        raise PermissionError(errno.EACCES, "Permission denied", "/elsewhere")

    monkeypatch.setattr(Path, "write_bytes", denied)
    with pytest.raises(PermissionError) as e:
        io.write_bytes(tmp_path / "x", b"1")
    assert str(e.value) == "[Errno 13] Permission denied: '/elsewhere'"


def test_torch_save_bytes_do_not_depend_on_the_file_name(tmp_path):
    obj = {"w": torch.arange(10.0)}
    io.save_torch(tmp_path / "a.pt", obj)
    io.save_torch(tmp_path / "b.pt", obj)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_unreachable_torchvision_mirrors_fail_fast_naming_what_was_tried(monkeypatch):
    timeouts = []

    def offline(url, timeout):
        timeouts.append(timeout)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        sources.fetch(datasets.BUILT_IN["mnist"], "torchvision")
    assert timeouts and max(timeouts) <= 10  # bounded: never a hang
    for mirror in datasets.BUILT_IN["mnist"].mirrors:
        assert f"{mirror}train-images-idx3-ubyte.gz" in str(e.value)
    assert "network is unreachable" in str(e.value)


def test_write_csv_writes_the_bytes_the_stages_f_strings_wrote(tmp_path):
    """The CSVs the stages write (plots/) are DVC outputs: the csv module must give the bytes of the
    f-strings it replaced, \\n line endings, numbers formatted by the caller, '' and ints as they are."""
    epochs = [{"epoch": 1, "train_loss": 2.302585093, "val_accuracy": 0.1135, "s": 0.25, "val": None},
              {"epoch": 12, "train_loss": 0.0000004, "val_accuracy": 1.0, "s": 2, "val": 0.9876543}]
    io.write_csv(tmp_path / "new.csv", ["epoch", "train_loss", "val_accuracy", "s", "val"],
                 [[e["epoch"], f"{e['train_loss']:.6f}", f"{e['val_accuracy']:.6f}", e["s"], e["val"] or ""]
                  for e in epochs])
    old = "epoch,train_loss,val_accuracy,s,val\n" + "".join(
        f"{e['epoch']},{e['train_loss']:.6f},{e['val_accuracy']:.6f},{e['s']},{e['val'] or ''}\n" for e in epochs)
    assert (tmp_path / "new.csv").read_bytes() == old.encode()
    assert [p.name for p in tmp_path.iterdir()] == ["new.csv"]  # written atomically: no temporary file left
