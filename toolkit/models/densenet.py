"""DenseNet-121, CIFAR variant (huyvnphan/PyTorch_CIFAR10): 3x3 stride-1 conv0, keeps the stride-2 max-pool."""

from toolkit.backend import configure_keras
from toolkit.models.layers import CHANNELS_FIRST, TorchDense, batch_norm, conv, kaiming_normal, torch_default_init
from toolkit.models.registry import register_architecture

keras = configure_keras()


def _bn_relu(x):
    return keras.layers.ReLU()(batch_norm()(x))


def _dense_layer(x, growth, bn_size):
    out = conv(bn_size * growth, 1, init=kaiming_normal("fan_in"))(_bn_relu(x))
    out = conv(growth, 3, padding=1, init=kaiming_normal("fan_in"))(_bn_relu(out))
    return keras.layers.Concatenate(axis=1)([x, out])


def _densenet(x, num_classes, growth=32, blocks=(6, 12, 24, 16), init_features=64, bn_size=4):
    x = _bn_relu(conv(init_features, 3, padding=1, init=kaiming_normal("fan_in"))(x))
    # torch MaxPool2d(3, 2, padding=1) after a ReLU: zero padding equals -inf padding on non-negative inputs.
    x = keras.layers.ZeroPadding2D(1, data_format=CHANNELS_FIRST)(x)
    x = keras.layers.MaxPooling2D(3, strides=2, data_format=CHANNELS_FIRST)(x)
    for i, n in enumerate(blocks):
        for _ in range(n):
            x = _dense_layer(x, growth, bn_size)
        if i != len(blocks) - 1:
            x = conv(x.shape[1] // 2, 1, init=kaiming_normal("fan_in"))(_bn_relu(x))
            x = keras.layers.AveragePooling2D(2, data_format=CHANNELS_FIRST)(x)
    x = _bn_relu(x)
    x = keras.layers.GlobalAveragePooling2D(data_format=CHANNELS_FIRST)(x)
    return TorchDense(num_classes, kernel_initializer=torch_default_init(x.shape[-1]),
                              bias_initializer="zeros")(x)


@register_architecture("densenet121", min_size=16)
def densenet121(x, num_classes, growth=32, blocks=(6, 12, 24, 16), init_features=64):
    """DenseNet-121 for 32x32 inputs (6.96M parameters at 10 classes); growth/blocks shrink it for CPU presets."""
    return _densenet(x, num_classes, growth, tuple(blocks), init_features)
