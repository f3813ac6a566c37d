"""The plain storage files behind the Deep Compression table (hanprune.storage)."""
import numpy as np
import pytest
import torch

from hanprune import measure, pruning, rules, storage
from hanprune.models import make


def pruned(key: str):
    torch.manual_seed(0)
    model = make(key)
    layers = {"fc1", "conv2"} & set(pruning.weight_std(model))
    rules.prune_round(model, "std", {name: 1.0 for name in layers}, pruning.weight_std(model))
    return model


@pytest.mark.parametrize("key", ["lenet_300_100", "lenet5_caffe"])
def test_file_sizes_are_the_counts_measure_reports(key):
    model = pruned(key)
    total = measure.totals(measure.layer_stats(model, (1, 28, 28)))
    assert len(storage.dense_bytes(model)) == total["params"] * 4
    assert len(storage.values_bytes(model)) == total["bytes_nonzero"]
    assert len(storage.csr_bytes(model)) == total["bytes_csr"]
    assert total["bytes_csr"] < total["bytes_dense"]


@pytest.mark.parametrize("key", ["lenet_300_100", "lenet5_caffe"])
def test_dense_and_csr_files_load_back_the_same_weights(key):
    """Equal values; a pruned weight can be -0.0 (mask times a negative weight), which CSR
    stores as an absent 0.0."""
    model = pruned(key)
    expected = pruning.plain_state_dict(model)
    for data, load in [(storage.dense_bytes(model), storage.load_dense), (storage.csr_bytes(model), storage.load_csr)]:
        back = load(data, make(key)).state_dict()
        assert set(back) == set(expected)
        for name, t in expected.items():
            assert torch.equal(back[name], t), name


def test_csr_of_a_layer_with_empty_rows():
    model = make("lenet_300_100")
    with torch.no_grad():
        for layer in (model.fc1, model.fc2, model.fc3):
            layer.weight.zero_()
        model.fc2.weight[3, 7] = 1.5
        model.fc2.weight[99, 0] = -2.0
    back = storage.load_csr(storage.csr_bytes(model), make("lenet_300_100"))
    assert torch.equal(back.fc2.weight, model.fc2.weight) and int(back.fc1.weight.count_nonzero()) == 0


@pytest.mark.parametrize("load, write", [(storage.load_dense, storage.dense_bytes),
                                         (storage.load_csr, storage.csr_bytes)])
def test_files_of_another_size_are_refused(load, write):
    data = write(pruned("lenet_300_100"))
    with pytest.raises(storage.StorageError, match="too short"):
        load(data[:-1], make("lenet_300_100"))
    with pytest.raises(storage.StorageError, match="bytes left over"):
        load(data + b"\0" * 4, make("lenet_300_100"))
    with pytest.raises(storage.StorageError):
        load(data, make("lenet5_caffe"))


def test_corrupt_row_pointers_and_column_indices_are_refused():
    data = bytearray(storage.csr_bytes(pruned("lenet_300_100")))
    bad = bytearray(data)
    bad[4:8] = np.int32(-5).tobytes()  # fc1's second row pointer
    with pytest.raises(storage.StorageError, match="row pointers"):
        storage.load_csr(bytes(bad), make("lenet_300_100"))
    first_col = 4 * 301
    bad = bytearray(data)
    bad[first_col:first_col + 4] = np.int32(784).tobytes()
    with pytest.raises(storage.StorageError, match="column index outside 0..783"):
        storage.load_csr(bytes(bad), make("lenet_300_100"))
