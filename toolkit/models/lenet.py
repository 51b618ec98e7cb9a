"""LeNet5 and the two slimmer MNIST members of MISLEADER (conv widths 6-16-120 / 3-8-60 / 4-10-30)."""

from toolkit.backend import configure_keras
from toolkit.models.layers import CHANNELS_FIRST, TorchConv2D, TorchDense, torch_default_init
from toolkit.models.registry import register_architecture

keras = configure_keras()


def _lenet(x, num_classes, convs, hidden):
    in_channels = x.shape[1]
    for i, filters in enumerate(convs):
        fan_in = in_channels * 25
        x = TorchConv2D(filters, 5, kernel_initializer=torch_default_init(fan_in),
                        bias_initializer=torch_default_init(fan_in))(x)
        x = keras.layers.ReLU()(x)
        if i < 2:
            x = keras.layers.MaxPooling2D(2, data_format=CHANNELS_FIRST)(x)
        in_channels = filters
    if x.shape[2] != 1 or x.shape[3] != 1:
        raise ValueError(f"LeNet needs 32x32 inputs (its last conv must reach 1x1), got a {x.shape[2:]} map")
    x = keras.layers.Flatten()(x)
    x = TorchDense(hidden, activation="relu", kernel_initializer=torch_default_init(convs[-1]),
                   bias_initializer=torch_default_init(convs[-1]))(x)
    return TorchDense(num_classes, kernel_initializer=torch_default_init(hidden),
                      bias_initializer=torch_default_init(hidden))(x)


@register_architecture("lenet5", min_size=32, max_size=32)
def lenet5(x, num_classes):
    """LeNet5 as in DFAD/DFME/MISLEADER: conv 6-16-120 (5x5), fc 84."""
    return _lenet(x, num_classes, (6, 16, 120), 84)


@register_architecture("lenet5_half", min_size=32, max_size=32)
def lenet5_half(x, num_classes):
    """MISLEADER's LeNet5-Half: conv 3-8-60, fc 42."""
    return _lenet(x, num_classes, (3, 8, 60), 42)


@register_architecture("lenet5_fifth", min_size=32, max_size=32)
def lenet5_fifth(x, num_classes):
    """MISLEADER's LeNet5-1/5 as released: conv 4-10-30, fc 30."""
    return _lenet(x, num_classes, (4, 10, 30), 30)
