"""Model definitions and their cost accounting (hanprune.models, hanprune.measure)."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from hanprune import measure, models
from hanprune.models import MODELS, make, prunable_layers

MNIST_SHAPE = (1, 28, 28)


@pytest.mark.parametrize("key, expected", [
    ("lenet_300_100", 266_610),
    ("lenet5", 61_706),
    ("lenet5_caffe", 431_080),
])
def test_parameter_counts(key, expected):
    model = make(key)
    assert sum(p.numel() for p in model.parameters()) == expected
    # layer_stats accounts for every parameter (all are in prunable layers)
    stats = measure.layer_stats(model, MNIST_SHAPE)
    assert measure.totals(stats)["params"] == expected


@pytest.mark.parametrize("key, layers", [
    ("lenet_300_100", ["fc1", "fc2", "fc3"]),
    ("lenet5", ["conv1", "conv2", "fc1", "fc2", "fc3"]),
    ("lenet5_caffe", ["conv1", "conv2", "fc1", "fc2"]),
])
def test_prunable_layers_and_forward_shape(key, layers):
    model = make(key)
    assert list(prunable_layers(model)) == layers
    with torch.no_grad():
        out = model.eval()(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 10)


def test_make_returns_fresh_instances():
    a, b = make("lenet_300_100"), make("lenet_300_100")
    assert a is not b
    assert a.fc1.weight.data_ptr() != b.fc1.weight.data_ptr()


def test_make_unknown_arch_names_allowed_models():
    with pytest.raises(models.ModelError) as e:
        make("nope")
    msg = str(e.value)
    assert "'nope'" in msg
    for key in MODELS:
        assert key in msg
    assert "lenet_300_100, lenet5, lenet5_caffe" in msg


def test_flops_lenet_300_100_match_paper():
    stats = measure.layer_stats(make("lenet_300_100"), MNIST_SHAPE)
    assert stats["fc1"]["flops_dense"] == 2 * 784 * 300 == 470_400
    assert stats["fc2"]["flops_dense"] == 2 * 300 * 100 == 60_000
    assert stats["fc3"]["flops_dense"] == 2 * 100 * 10 == 2_000
    assert stats["fc1"]["weights"] == 235_200  # the paper's "235K"
    for s in stats.values():  # dense: nothing pruned
        assert s["flops_pruned"] == s["flops_dense"]
        assert s["kept"] == 1.0
    assert measure.totals(stats)["flops_dense"] == 532_400


def test_flops_lenet5_caffe_match_paper():
    stats = measure.layer_stats(make("lenet5_caffe"), MNIST_SHAPE)
    assert stats["conv1"]["weights"] == 500
    assert stats["conv1"]["flops_dense"] == 2 * 500 * 576 == 576_000       # 24x24 outputs
    assert stats["conv2"]["weights"] == 25_000
    assert stats["conv2"]["flops_dense"] == 2 * 25_000 * 64 == 3_200_000   # 8x8 outputs
    assert stats["fc1"]["weights"] == 400_000
    assert stats["fc1"]["flops_dense"] == 2 * 800 * 500 == 800_000
    assert stats["fc2"]["weights"] == 5_000
    assert stats["fc2"]["flops_dense"] == 2 * 500 * 10 == 10_000
    assert measure.totals(stats)["flops_dense"] == 4_586_000


def test_output_positions_lenet5_padding_counted():
    # conv1 is padded to keep 28x28, conv2 sees 14x14 -> 10x10
    assert measure.output_positions(make("lenet5"), MNIST_SHAPE) == {
        "conv1": 784, "conv2": 100, "fc1": 1, "fc2": 1, "fc3": 1}


def _half_zero_(layer: nn.Module) -> int:
    """Set all weights to 1 then zero exactly the first half; return the number kept."""
    with torch.no_grad():
        layer.weight.fill_(1.0)
        flat = layer.weight.view(-1)
        flat[: flat.numel() // 2] = 0.0
        layer.bias.fill_(0.5)
    return layer.weight.numel() - layer.weight.numel() // 2


def test_pruned_layer_stats_half_zero():
    model = make("lenet_300_100")
    fc1_before = measure.layer_stats(model, MNIST_SHAPE)["fc1"]
    nnz = _half_zero_(model.fc2)  # 100 x 300
    assert nnz == 15_000
    s = measure.layer_stats(model, MNIST_SHAPE)["fc2"]
    assert s["weights"] == 30_000
    assert s["weights_nonzero"] == 15_000
    assert s["kept"] == 0.5
    assert s["flops_dense"] == 60_000
    assert s["flops_pruned"] == 30_000 == s["flops_dense"] // 2
    assert s["params"] == 30_100
    assert s["nonzero"] == 15_100  # all 100 biases are non-zero
    assert s["bytes_dense"] == 4 * 30_100
    assert s["bytes_nonzero"] == 4 * 15_100
    rows, bias = 100, 100
    assert s["bytes_csr"] == (4 + 4) * 15_000 + 4 * (rows + 1) + 4 * bias == 120_804
    # the other layers are untouched
    assert measure.layer_stats(model, MNIST_SHAPE)["fc1"] == fc1_before


def test_pruned_conv_layer_stats_half_zero():
    model = make("lenet5_caffe")
    nnz = _half_zero_(model.conv2)  # 50 x 20 x 5 x 5
    s = measure.layer_stats(model, MNIST_SHAPE)["conv2"]
    assert nnz == 12_500
    assert s["kept"] == 0.5
    assert s["flops_pruned"] == 2 * 12_500 * 64 == s["flops_dense"] // 2
    assert s["bytes_csr"] == (4 + 4) * 12_500 + 4 * (50 + 1) + 4 * 50


def test_stats_of_masked_model_count_effective_weights():
    """With torch's pruning re-parametrisation attached, the stats see the masked weights."""
    model = make("lenet_300_100")
    mask = torch.zeros_like(model.fc3.weight)
    mask.view(-1)[::4] = 1.0  # keep a quarter: 250 of 1000
    prune.custom_from_mask(model.fc3, "weight", mask)
    s = measure.layer_stats(model, MNIST_SHAPE)["fc3"]
    assert s["weights"] == 1000
    assert s["weights_nonzero"] == 250
    assert s["kept"] == 0.25
    assert s["flops_pruned"] == 2 * 250


def test_totals_sum_layers():
    model = make("lenet_300_100")
    _half_zero_(model.fc1)
    stats = measure.layer_stats(model, MNIST_SHAPE)
    tot = measure.totals(stats)
    assert tot["weights"] == 266_200
    assert tot["weights_nonzero"] == 266_200 - 117_600
    assert tot["flops_pruned"] == 470_400 // 2 + 60_000 + 2_000
    assert tot["bytes_csr"] == sum(s["bytes_csr"] for s in stats.values())


USER_MODULE = '''from torch import nn


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(self.prepare(x))

    def prepare(self, x):
        raise ValueError("boom")
'''


def test_an_error_in_the_model_s_own_code_is_shown_with_its_frames(tmp_path, monkeypatch):
    """Not a shape message: the model's forward pass raised, and where in the model's code."""
    (tmp_path / "boomnet.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(models.ModelError) as e:
        models.check_fits(make("boomnet:Boom"), "mine", MNIST_SHAPE, 10)
    file = tmp_path / "boomnet.py"
    first, *frames = str(e.value).splitlines()
    assert first == ("model mine: its forward pass raised ValueError: boom, on a batch of 2 of the data's images "
                     "(C, H, W) = (1, 28, 28); in the model's code:")
    assert [line for line in frames if "^" not in line] == [  # Python 3.11 underlines the call with carets
        f'  File "{file}", line 10, in forward', "    return self.fc(self.prepare(x))",
        f'  File "{file}", line 13, in prepare', '    raise ValueError("boom")']


@pytest.mark.parametrize("key, shape, message", [
    ("lenet5", (3, 28, 28), "Given groups=1, weight of size [6, 1, 5, 5], expected input[2, 3, 28, 28] to have 1 "
                            "channels, but got 3 channels instead"),
    ("lenet_300_100", (1, 32, 32), "mat1 and mat2 shapes cannot be multiplied (2x1024 and 784x300)"),
    ("lenet5", (1, 32, 32), "mat1 and mat2 shapes cannot be multiplied (2x576 and 400x120)"),  # fc1, after the convs
])
def test_a_layer_that_does_not_take_the_data_s_images_gets_one_line(key, shape, message):
    with pytest.raises(models.ModelError) as e:
        models.check_fits(make(key), key, shape, 10)
    assert str(e.value) == f"model {key} does not take the data's images (C, H, W) = {shape}: RuntimeError: {message}"


def test_a_model_with_other_classes_than_the_data_s_gets_one_line():
    with pytest.raises(models.ModelError) as e:
        models.check_fits(make("lenet5"), "lenet5", MNIST_SHAPE, 4)
    assert str(e.value) == ("model lenet5 gives (2, 10) for a batch of 2 images; the data has 4 classes, so it must "
                            "give (2, 4)")
