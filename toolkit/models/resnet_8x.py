"""CIFAR ResNets as used by DFAD/DFME/MISLEADER ("ResNet-8x"): 3x3 stride-1 stem, four stages, global pooling."""

from toolkit.backend import configure_keras
from toolkit.models.layers import TorchDense, batch_norm, conv, kaiming_normal, torch_default_init
from toolkit.models.registry import register_architecture

keras = configure_keras()


def _basic_block(x, planes, stride):
    in_planes = x.shape[1]
    out = conv(planes, 3, strides=stride, padding=1, init=kaiming_normal())(x)
    out = keras.layers.ReLU()(batch_norm()(out))
    out = batch_norm()(conv(planes, 3, padding=1, init=kaiming_normal())(out))
    shortcut = x
    if stride != 1 or in_planes != planes:
        shortcut = batch_norm()(conv(planes, 1, strides=stride, init=kaiming_normal())(x))
    return keras.layers.ReLU()(keras.layers.Add()([out, shortcut]))


def _resnet(x, num_classes, blocks, width=64):
    x = keras.layers.ReLU()(batch_norm()(conv(width, 3, padding=1, init=kaiming_normal())(x)))
    for stage, n in enumerate(blocks):
        planes = width * 2 ** stage
        for i in range(n):
            x = _basic_block(x, planes, 2 if (stage > 0 and i == 0) else 1)
    x = keras.layers.GlobalAveragePooling2D(data_format="channels_first")(x)
    fan_in = x.shape[-1]
    return TorchDense(num_classes, kernel_initializer=torch_default_init(fan_in),
                              bias_initializer=torch_default_init(fan_in))(x)


@register_architecture("resnet18_8x", min_size=8)
def resnet18_8x(x, num_classes, width=64):
    """ResNet-18, CIFAR variant (11.17M parameters at 10 classes)."""
    return _resnet(x, num_classes, (2, 2, 2, 2), width)


@register_architecture("resnet34_8x", min_size=8)
def resnet34_8x(x, num_classes, width=64):
    """ResNet-34, CIFAR variant (21.28M parameters at 10 classes): the paper's CIFAR target."""
    return _resnet(x, num_classes, (3, 4, 6, 3), width)


@register_architecture("resnet18_8x_w16", min_size=8)
def resnet18_8x_w16(x, num_classes):
    """ResNet-18 CIFAR at 1/4 width (16-32-64-128 channels, 0.7M parameters): a CPU-sized stand-in."""
    return _resnet(x, num_classes, (2, 2, 2, 2), 16)
