"""A small residual CNN with batch norm: a model hanprune does not know, pruned by naming it in
params.yaml (README, "Your own model"). Any nn.Module works the same way: its nn.Conv2d and
nn.Linear weights are pruned, by module path (stem, block.conv1, block.conv2, head); batch norm
is kept whole."""
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    """Two 3x3 convolutions with batch norm, added to the block's input."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class SmallResNet(nn.Module):
    """stem conv -> batch norm -> max pool -> residual block -> 7x7 average pool -> linear head."""

    def __init__(self, in_channels: int = 1, channels: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.block = Residual(channels)
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.head = nn.Linear(channels * 7 * 7, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.stem(x))), 2)
        x = self.pool(self.block(x))
        return self.head(x.flatten(1))
