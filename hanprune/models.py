"""The three MNIST networks. One definition each; pruning is a mask attached
from outside (see pruning.py), never a separate class."""
from torch import nn
import torch.nn.functional as F


class LeNet300100(nn.Module):
    """784-300-100-10 multilayer perceptron (Han et al. 2015, Table 2)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x):
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Classic LeNet-5 as in the reference implementation: 6/16 conv, average pooling, 120/84/10 fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)   # 28x28 -> 28x28
        self.conv2 = nn.Conv2d(6, 16, 5)             # 14x14 -> 10x10
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5Caffe(nn.Module):
    """The paper's LeNet-5 (Caffe): conv 20/50 with max pooling, fc 500/10 (Han et al. 2015, Table 3)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)    # 28x28 -> 24x24
        self.conv2 = nn.Conv2d(20, 50, 5)   # 12x12 -> 8x8
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


MODELS = {
    "lenet_300_100": LeNet300100,
    "lenet5": LeNet5,
    "lenet5_caffe": LeNet5Caffe,
}


def build(key: str) -> nn.Module:
    if key not in MODELS:
        raise ValueError(f"unknown model {key!r}; allowed: {', '.join(MODELS)}")
    return MODELS[key]()


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights are pruned: every Linear and Conv2d, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


INPUT_SHAPE = (1, 28, 28)
