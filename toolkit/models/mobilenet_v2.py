"""MobileNetV2, CIFAR variant (huyvnphan/PyTorch_CIFAR10, used by MISLEADER): stride-1 stem and second stage."""

from toolkit.backend import configure_keras
from toolkit.models.layers import TorchDense, batch_norm, conv, kaiming_normal
from toolkit.models.registry import register_architecture

keras = configure_keras()

# (expansion t, output channels c, repeats n, first stride s); the 24-channel stage has stride 1 for 32x32 inputs.
_SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _divisible(value, divisor=8):
    """torchvision's _make_divisible: nearest multiple of 8, never more than 10% below the request."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def _conv_bn(x, filters, kernel, stride=1, relu6=True, depthwise=False):
    x = conv(filters, kernel, strides=stride, padding=(kernel - 1) // 2, init=None if depthwise else kaiming_normal(),
             groups="depthwise" if depthwise else None)(x)
    x = batch_norm()(x)
    return keras.layers.ReLU(max_value=6.0)(x) if relu6 else x


def _inverted_residual(x, out_channels, stride, expansion):
    in_channels = x.shape[1]
    out = x
    if expansion != 1:
        out = _conv_bn(out, in_channels * expansion, 1)
    out = _conv_bn(out, None, 3, stride=stride, depthwise=True)
    out = _conv_bn(out, out_channels, 1, relu6=False)
    if stride == 1 and in_channels == out_channels:
        out = keras.layers.Add()([x, out])
    return out


@register_architecture("mobilenet_v2", min_size=8)
def mobilenet_v2(x, num_classes, dropout=0.2, width_mult=1.0):
    """MobileNetV2 for 32x32 inputs (2.24M parameters at 10 classes), dropout 0.2 before the classifier.

    ``width_mult`` scales every layer's channels (rounded to multiples of 8, as torchvision); the last layer keeps
    1280 channels unless the multiplier is above 1.
    """
    x = _conv_bn(x, _divisible(32 * width_mult), 3, stride=1)
    for t, c, n, s in _SETTING:
        for i in range(n):
            x = _inverted_residual(x, _divisible(c * width_mult), s if i == 0 else 1, t)
    x = _conv_bn(x, _divisible(1280 * max(1.0, width_mult)), 1)
    x = keras.layers.GlobalAveragePooling2D(data_format="channels_first")(x)
    x = keras.layers.Dropout(dropout)(x)
    return TorchDense(num_classes, kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
                              bias_initializer="zeros")(x)
