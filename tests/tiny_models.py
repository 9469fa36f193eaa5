"""Small models built in code, shared by the tests (needs torch: import it only from tests that use torch)."""
import torch
import torch.nn as nn

from robustpart.spec import InputSpec

TINY_SPEC = InputSpec(shape=(3, 8, 8), mean=(0.5,), std=(0.25,), num_classes=5)

# torchvision models the graph and shard tests trace by name
NAMED_MODELS = ["vgg16", "vgg16_bn", "alexnet", "resnet18", "resnet50", "mobilenet_v2",
                "mobilenet_v3_small", "convnext_tiny", "efficientnet_b0"]


class TinyNet(nn.Module):
    """conv-bn-relu-pool, a residual block, a depthwise conv, a grouped conv, flatten, two linears."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.res = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.res_bn = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 12, 1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.grouped = nn.Conv2d(12, 6, 3, padding=1, groups=3)
        self.fc1 = nn.Linear(6 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.stem(x))))
        x = torch.relu(x + self.res_bn(self.res(x)))
        x = torch.relu(self.dw(torch.relu(self.expand(x))))
        x = self.grouped(x)
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


class HeadNet(nn.Module):
    """Two conv units, then a head (global mean + softmax over the channels of the last unit)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x):
        return torch.softmax(self.b(torch.relu(self.a(x))).mean((2, 3)), dim=1)


class ChainNet(nn.Module):
    """Four blocks: conv-relu | a linear 1x1 conv | conv-relu-global pool | linear. Block b and the classifier
    are linear in their input, so a fitted adapter around them is exact."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.b(torch.relu(self.a(x)))
        x = self.pool(torch.relu(self.c(x)))
        return self.fc(torch.flatten(x, 1))


class ResNetLike(nn.Module):
    """A stem, a basic residual block (two convs and the identity), a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        x = torch.relu(self.conv3(x)).mean((2, 3))
        return self.fc(x)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BN layers non-trivial statistics so that masking points matter."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model.eval()


def tiny_net() -> nn.Module:
    """The tests' TinyNet: weights from torch's seed 0, BatchNorm statistics randomized."""
    torch.manual_seed(0)
    return randomized(TinyNet())


def tiny_traced():
    """(tiny_net(), its trace)."""
    from robustpart.graph import trace
    model = tiny_net()
    return model, trace(model, TINY_SPEC, "tiny")
