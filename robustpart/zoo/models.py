"""Reduced-width torchvision CNNs for Fashion-MNIST (1x28x28 grayscale, 10 classes).

Every model is an instance of torchvision's own class (VGG, AlexNet, ResNet, MobileNetV2, ConvNeXt) and
keeps its module structure (`features`/`avgpool`/`classifier`, `layerN` of BasicBlocks, InvertedResidual,
CNBlock, ...), so the compiler meets the real torchvision graphs; only widths, the stem and the strides
are adapted to 28x28 inputs. Initialisation follows the matching torchvision class.
"""
from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models import AlexNet, ConvNeXt, MobileNetV2
from torchvision.models.convnext import CNBlockConfig, LayerNorm2d
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vgg import VGG, make_layers
from torchvision.ops.misc import Conv2dNormActivation

NUM_CLASSES = 10
IN_CHANNELS = 1

# VGG16's 13 convolutions at 1/4 of the ImageNet width (64 -> 16 ... 512 -> 128), without VGG16's last
# max-pool: 28 px only allows four halvings (28 -> 14 -> 7 -> 3 -> 1).
VGG16_CFG = [16, 16, "M", 32, 32, "M", 64, 64, 64, "M", 128, 128, 128, "M", 128, 128, 128]


def _vgg_init(modules) -> None:
    """torchvision.models.vgg.VGG's init_weights rule, for modules replaced after construction."""
    for m in modules:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)


def fmnist_vgg16_bn() -> VGG:
    """torchvision VGG16-BN layout: 13 conv-BN-ReLU (widths 16..128), 4 max-pools, 3-layer classifier."""
    features = make_layers(VGG16_CFG, batch_norm=True)
    features[0] = nn.Conv2d(IN_CHANNELS, VGG16_CFG[0], kernel_size=3, padding=1)
    model = VGG(features, num_classes=NUM_CLASSES, init_weights=True)
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    width, hidden = VGG16_CFG[-1], 256
    model.classifier = nn.Sequential(
        nn.Linear(width, hidden),
        nn.ReLU(True),
        nn.Dropout(p=0.5),
        nn.Linear(hidden, hidden),
        nn.ReLU(True),
        nn.Dropout(p=0.5),
        nn.Linear(hidden, NUM_CLASSES),
    )
    # The replaced 1-channel first conv gets VGG's conv init. The replaced classifier keeps PyTorch's
    # default Linear init: VGG's N(0, 0.01) init of this narrow 3-layer head (after a 1x1 feature map)
    # left training stuck at chance level for the first hundred steps (measured).
    _vgg_init([model.features[0]])
    return model


def fmnist_alexnet() -> AlexNet:
    """torchvision AlexNet layout (no BatchNorm) with widths 32, 64, 96, 64, 64 and a 256-wide classifier.

    28 -> conv5x5/1 -> pool 14 -> conv5x5 -> pool 7 -> 3x conv3x3 -> pool 3; the AdaptiveAvgPool2d((3, 3))
    is then an identity on 28x28 inputs, as the (6, 6) one is on 224x224 ImageNet inputs.
    """
    widths, hidden = (32, 64, 96, 64, 64), 256
    model = AlexNet(num_classes=NUM_CLASSES)
    model.features = nn.Sequential(
        nn.Conv2d(IN_CHANNELS, widths[0], kernel_size=5, stride=1, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(widths[0], widths[1], kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(widths[1], widths[2], kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(widths[2], widths[3], kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(widths[3], widths[4], kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=2, stride=2),
    )
    model.avgpool = nn.AdaptiveAvgPool2d((3, 3))
    model.classifier = nn.Sequential(
        nn.Dropout(p=0.5),
        nn.Linear(widths[4] * 3 * 3, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(p=0.5),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, NUM_CLASSES),
    )
    return model


class FmnistResNet(ResNet):
    """torchvision ResNet (BasicBlock, [2, 2, 2, 2]) at widths 16, 32, 64, 128 with a 3x3 stride-1 stem and
    no stem max-pool (28 -> 28 -> 14 -> 7 -> 4). Subclasses ResNet so `_make_layer` and `forward` are
    torchvision's; only `__init__` is rewritten because ResNet's hard-codes the 64..512 widths."""

    def __init__(self, layers=(2, 2, 2, 2), widths=(16, 32, 64, 128), num_classes: int = NUM_CLASSES,
                 in_channels: int = IN_CHANNELS) -> None:
        nn.Module.__init__(self)
        norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, widths[0], layers[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def fmnist_resnet18() -> ResNet:
    return FmnistResNet()


# MobileNetV2's (t, c, n, s) table with the stride-2 of its 32- and 64-channel stages set to 1:
# with the stride-2 stem, total stride 8 (28 -> 14 -> 7 -> 7 -> 7 -> 4), so most blocks run at 7x7.
MOBILENET_V2_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 1],
    [6, 64, 4, 1],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]
MOBILENET_V2_WIDTH = 0.5


def fmnist_mobilenet_v2() -> MobileNetV2:
    """torchvision MobileNetV2 (width 0.5, 17 InvertedResidual blocks, 1280-wide last conv) whose stem conv
    takes 1 channel (3x3, stride 2 as in torchvision)."""
    model = MobileNetV2(num_classes=NUM_CLASSES, width_mult=MOBILENET_V2_WIDTH,
                        inverted_residual_setting=MOBILENET_V2_SETTING)
    stem = model.features[0][0]
    new_stem = nn.Conv2d(IN_CHANNELS, stem.out_channels, kernel_size=3, stride=2, padding=1, bias=False)
    nn.init.kaiming_normal_(new_stem.weight, mode="fan_out")
    model.features[0][0] = new_stem
    return model


CONVNEXT_SETTING = [(32, 64, 2), (64, 128, 2), (128, None, 2)]


def fmnist_convnext() -> ConvNeXt:
    """torchvision ConvNeXt with 3 stages (32, 64, 128 channels, 2 CNBlocks each) and a 2x2 stride-2
    patchify stem from 1 channel (28 -> 14 -> 7 -> 3)."""
    block_setting = [CNBlockConfig(c_in, c_out, n) for c_in, c_out, n in CONVNEXT_SETTING]
    model = ConvNeXt(block_setting=block_setting, stochastic_depth_prob=0.0, layer_scale=0.1,
                     num_classes=NUM_CLASSES)
    width = block_setting[0].input_channels
    model.features[0] = Conv2dNormActivation(IN_CHANNELS, width, kernel_size=2, stride=2, padding=0,
                                             norm_layer=partial(LayerNorm2d, eps=1e-6),
                                             activation_layer=None, bias=True)
    stem = model.features[0][0]
    nn.init.trunc_normal_(stem.weight, std=0.02)
    nn.init.zeros_(stem.bias)
    return model


BUILDERS = {
    "fmnist_vgg16_bn": fmnist_vgg16_bn,
    "fmnist_resnet18": fmnist_resnet18,
    "fmnist_alexnet": fmnist_alexnet,
    "fmnist_mobilenet_v2": fmnist_mobilenet_v2,
    "fmnist_convnext": fmnist_convnext,
}
