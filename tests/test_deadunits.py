"""Dead units (hanprune/deadunits.py): which layer reads which from the fx graph, and dropping the
units no layer reads leaves the model's output the same bit for bit."""
import torch
import torch.nn.functional as F
from torch import nn

from examples.small_resnet import SmallResNet
from hanprune.deadunits import dead_units, drop_dead_units, readers
from hanprune.models import make, prunable_layers
from hanprune.quantize import QuantizedLayer, load_into


def quantized(model: nn.Module, keep: float, seed: int = 0) -> dict[str, QuantizedLayer]:
    """Each prunable layer's weights, a random `keep` of them kept, as 16-entry codebook layers."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in prunable_layers(model).items():
        codes = torch.randint(0, 16, m.weight.shape, generator=g)
        codes[torch.rand(m.weight.shape, generator=g) >= keep] = -1
        bias = None if m.bias is None else torch.randn(m.bias.shape, generator=g)
        layers[name] = QuantizedLayer(codes, torch.randn(16, generator=g), bias)
    return layers


def every_weight(model: nn.Module) -> dict[str, QuantizedLayer]:
    """Each prunable layer with every weight kept (code 0 of a one-entry codebook) and biases of 1."""
    return {name: QuantizedLayer(torch.zeros(m.weight.shape, dtype=torch.long), torch.ones(1), torch.ones(m.bias.shape))
            for name, m in prunable_layers(model).items()}


def test_the_built_in_models_feed_each_layer_to_the_next():
    """(reader, whether the path flattens): conv2's channels reach fc1 through x.flatten(1)."""
    assert readers(make("lenet_300_100")) == {"fc1": ("fc2", False), "fc2": ("fc3", False)}
    assert readers(make("lenet5")) == {"conv1": ("conv2", False), "conv2": ("fc1", True), "fc1": ("fc2", False),
                                       "fc2": ("fc3", False)}
    assert readers(make("lenet5_caffe")) == {"conv1": ("conv2", False), "conv2": ("fc1", True), "fc1": ("fc2", False)}


def test_a_layer_whose_output_is_also_added_or_read_twice_has_no_reader():
    """small_resnet: the stem's output goes to the block's first conv and to its residual sum, the
    block's second conv's to that sum: only block.conv1 -> block.conv2 (through batch norm and relu)."""
    assert readers(SmallResNet(channels=4)) == {"block.conv1": ("block.conv2", False)}

    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.b(h) + self.c(h)

    assert readers(TwoReaders()) == {}


def test_a_model_fx_cannot_trace_drops_nothing():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(self.a(x)) if x.sum() > 0 else self.b(-self.a(x))

    model = Branches()
    layers = quantized(model, 0.2)
    assert readers(model) == {} and drop_dead_units(model, layers) == (layers, 0)


def test_dropping_dead_units_keeps_every_output_bit_for_bit():
    """At 5% of the weights kept (2% in the residual model's small block) many units have no
    connection left into the next layer: their weights and biases go, and the logits stay the same,
    in every built-in model and the residual one."""
    for arch, kwargs, keep in [("lenet_300_100", {}, 0.05), ("lenet5", {}, 0.05), ("lenet5_caffe", {}, 0.05),
                               ("examples.small_resnet:SmallResNet", {"channels": 4}, 0.02)]:
        model = make(arch, kwargs).eval()
        layers = quantized(model, keep)
        dropped, n = drop_dead_units(model, layers)
        assert n > 0, arch
        x = torch.randn((32, 1, 28, 28), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            before, after = load_into(make(arch, kwargs).eval(), layers)(x), load_into(make(arch, kwargs).eval(), dropped)(x)
        assert before.numpy().tobytes() == after.numpy().tobytes(), arch
        removed = sum(int((layers[k].codes >= 0).sum() - (dropped[k].codes >= 0).sum()) for k in layers)
        assert removed > 0, arch


def test_a_unit_left_unread_by_a_dropped_unit_is_dropped_too():
    """fc3 reads nothing of fc2's unit 0, whose inputs are the only connections out of fc1's unit 7:
    fc2's unit 0 goes, and with it fc1's unit 7."""
    model = make("lenet_300_100")
    layers = every_weight(model)
    layers["fc3"].codes[:, 0] = -1
    layers["fc2"].codes[1:, 7] = -1
    dead = dead_units(layers, readers(model))
    assert dead.keys() == {"fc1", "fc2"}
    assert torch.nonzero(dead["fc2"]).flatten().tolist() == [0] and torch.nonzero(dead["fc1"]).flatten().tolist() == [7]
    dropped, n = drop_dead_units(model, layers)
    assert n == 2 and not (dropped["fc2"].codes[0] >= 0).any() and dropped["fc2"].bias[0] == 0
    assert not (dropped["fc1"].codes[7] >= 0).any() and dropped["fc1"].bias[7] == 0 and dropped["fc1"].bias[6] == 1
    assert {k: v.tolist() for k, v in dead_units(dict(reversed(layers.items())), readers(model)).items()} \
        == {k: v.tolist() for k, v in dead.items()}  # the layers' order plays no part


def test_a_linear_on_a_conv_s_last_dimension_reads_no_channel_as_a_unit():
    """A Linear applied to a conv output's width (no flatten) reads positions, not channels: with
    its input 0 pruned, no channel is dead (a channel-major reading would drop channel 0)."""
    class WidthLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x))).sum((1, 2))

    model = WidthLinear().eval()
    layers = every_weight(model)
    layers["fc"].codes[:, 0] = -1
    assert readers(model) == {"conv": ("fc", False)}
    assert dead_units(layers, readers(model)) == {} and drop_dead_units(model, layers)[1] == 0
