"""Small building blocks shared by the architectures: input standardisation and torch-equivalent initialisers."""

import math

import numpy as np

from toolkit.backend import configure_keras

keras = configure_keras()

CHANNELS_FIRST = "channels_first"


@keras.saving.register_keras_serializable(package="mtk")
class Standardize(keras.layers.Layer):
    """(x - mean) / std per channel, so every saved model takes raw pixels in [0, 1] like an API would."""

    def __init__(self, mean, std, **kwargs):
        super().__init__(**kwargs)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ValueError(f"Standardize needs mean/std of equal length and std > 0, got {mean} / {std}")

    def build(self, input_shape):
        shape = (1, len(self.mean), 1, 1)
        self._mean = self.add_weight(
            shape=shape, initializer=keras.initializers.Constant(np.reshape(self.mean, shape)), trainable=False,
            name="mean")
        self._inv_std = self.add_weight(
            shape=shape, initializer=keras.initializers.Constant(1.0 / np.reshape(self.std, shape)), trainable=False,
            name="inv_std")

    def call(self, x):
        return (x - self._mean) * self._inv_std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}


def torch_default_init(fan_in):
    """torch's default Linear/Conv init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound)


def kaiming_normal(mode="fan_out"):
    """torch.nn.init.kaiming_normal_(nonlinearity='relu') with the given fan mode."""
    return keras.initializers.VarianceScaling(scale=2.0, mode=mode, distribution="untruncated_normal")


@keras.saving.register_keras_serializable(package="mtk")
class TorchBatchNorm(keras.layers.BatchNormalization):
    """Keras BatchNormalization computed by torch's fused ``F.batch_norm`` (NCHW, axis 1).

    Same variables and config as the Keras layer; the running statistics follow torch's rule (unbiased batch
    variance, momentum ``1 - self.momentum``), as the reference models do. Keras's own BN is unfused on torch
    (separate mean/variance ops) and measurably slower in training.
    """

    def call(self, inputs, training=None, mask=None):
        if mask is not None or self.axis not in (1, -3) or len(inputs.shape) != 4 or self.renorm:
            return super().call(inputs, training=training, mask=mask)
        import torch.nn.functional as F

        return F.batch_norm(
            inputs, self.moving_mean.value, self.moving_variance.value,
            self.gamma.value if self.scale else None, self.beta.value if self.center else None,
            training=bool(training) and self.trainable, momentum=1.0 - self.momentum, eps=self.epsilon)


def batch_norm():
    """BatchNorm with torch's defaults (momentum 0.1 == Keras 0.9, eps 1e-5), not Keras's (0.99, 1e-3)."""
    return TorchBatchNorm(axis=1, momentum=0.9, epsilon=1e-5)


class _TorchPadding:
    """Symmetric zero padding done inside ``F.conv2d`` (as torch's reference models do), kept in the config."""

    def _init_padding(self, torch_padding):
        self.torch_padding = int(torch_padding)

    def compute_output_shape(self, input_shape):
        p = self.torch_padding
        n, c, h, w = input_shape
        padded = (n, c, None if h is None else h + 2 * p, None if w is None else w + 2 * p)
        return super().compute_output_shape(padded)

    def get_config(self):
        return {**super().get_config(), "torch_padding": self.torch_padding}


@keras.saving.register_keras_serializable(package="mtk")
class TorchConv2D(_TorchPadding, keras.layers.Conv2D):
    """Keras Conv2D (NCHW) computed as one ``F.conv2d`` with torch's symmetric zero ``padding`` and the bias fused.

    Same variables as Conv2D. Keras's own path pads with a separate op (or pads asymmetrically for 'same' at stride
    2, unlike the reference models) and adds the bias as another op; both cost a full pass over the activations.
    """

    def __init__(self, filters, kernel_size, torch_padding=0, **kwargs):
        kwargs.update(padding="valid", data_format=CHANNELS_FIRST)
        super().__init__(filters, kernel_size, **kwargs)
        self._init_padding(torch_padding)

    def call(self, inputs):
        import torch.nn.functional as F

        return F.conv2d(inputs, self.kernel.value.permute(3, 2, 0, 1), self.bias.value if self.use_bias else None,
                        stride=self.strides, padding=self.torch_padding, dilation=self.dilation_rate)


@keras.saving.register_keras_serializable(package="mtk")
class TorchDepthwiseConv2D(_TorchPadding, keras.layers.DepthwiseConv2D):
    """Keras DepthwiseConv2D (NCHW) as one grouped ``F.conv2d`` with torch's symmetric padding."""

    def __init__(self, kernel_size, torch_padding=0, **kwargs):
        kwargs.update(padding="valid", data_format=CHANNELS_FIRST)
        super().__init__(kernel_size, **kwargs)
        self._init_padding(torch_padding)

    def call(self, inputs):
        import torch.nn.functional as F

        k = self.kernel.value  # (kh, kw, in, multiplier)
        kh, kw, cin, mult = k.shape
        weight = k.permute(2, 3, 0, 1).reshape(cin * mult, 1, kh, kw)
        return F.conv2d(inputs, weight, self.bias.value if self.use_bias else None, stride=self.strides,
                        padding=self.torch_padding, dilation=self.dilation_rate, groups=cin)


@keras.saving.register_keras_serializable(package="mtk")
class TorchDense(keras.layers.Dense):
    """Keras Dense computed as one fused ``F.linear`` (matmul and bias in one op)."""

    def call(self, inputs, training=None):
        import torch.nn.functional as F

        if self.lora_enabled or self.quantization_mode or len(inputs.shape) != 2:
            return super().call(inputs, training=training)
        out = F.linear(inputs, self.kernel.value.T, self.bias.value if self.use_bias else None)
        return self.activation(out) if self.activation is not None else out


def conv(filters, kernel_size, strides=1, padding=0, use_bias=False, init=None, groups=None):
    """A torch-style Conv2d (NCHW, symmetric zero padding like the reference models) as a Keras layer."""
    if groups == "depthwise":
        return TorchDepthwiseConv2D(kernel_size, torch_padding=padding, strides=strides, use_bias=use_bias,
                                    depthwise_initializer=init or kaiming_normal("fan_in"))
    kwargs = {"kernel_initializer": init} if init is not None else {}
    return TorchConv2D(filters, kernel_size, torch_padding=padding, strides=strides, use_bias=use_bias, **kwargs)


@keras.saving.register_keras_serializable(package="mtk")
class UpsampleConv2D(keras.layers.Layer):
    """Nearest-neighbour 2x upsampling followed by a 3x3 'same' convolution, computed without the upsampling.

    On a nearest-upsampled image each output pixel of a given parity (row and column even/odd) sees a 2x2 window of
    the low-resolution input with some of the 3x3 taps summed, so the layer runs one 2x2 convolution with 4x the
    output channels on the small image and interleaves the four results: the same function and gradients as
    ``UpSampling2D(2)`` + ``Conv2D(3, padding=1)`` with about 2.2x fewer multiply-adds. The kernel is stored in the
    usual (3, 3, in, out) form.
    """

    # For output parity a, low-res offsets (in a 1-padded input) and the 3x3 taps summed into each of them.
    _TAPS = {0: ((0,), (1, 2)), 1: ((0, 1), (2,))}

    def __init__(self, filters, use_bias=True, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 **kwargs):
        super().__init__(**kwargs)
        self.filters, self.use_bias = int(filters), bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(3, 3, int(input_shape[1]), self.filters),
                                      initializer=self.kernel_initializer, name="kernel")
        self.bias = self.add_weight(shape=(self.filters,), initializer=self.bias_initializer,
                                    name="bias") if self.use_bias else None

    def _phase_kernels(self):
        import torch

        k = self.kernel.value.permute(3, 2, 0, 1)  # (out, in, 3, 3) as torch's conv2d wants
        blocks = []
        for a in (0, 1):
            rows = [k[:, :, list(taps), :].sum(2) for taps in self._TAPS[a]]  # two (out, in, 3) row groups
            for b in (0, 1):
                blocks.append(torch.stack(
                    [torch.stack([r[:, :, list(taps)].sum(2) for taps in self._TAPS[b]], -1) for r in rows], -2))
        return torch.cat(blocks, 0)  # (4*out, in, 2, 2), parity-major

    def call(self, x):
        import torch
        import torch.nn.functional as F

        n, _, h, w = x.shape
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)), self._phase_kernels())  # (n, 4*out, h+1, w+1)
        y = y.view(n, 2, 2, self.filters, h + 1, w + 1)
        parts = [[y[:, a, b, :, a:a + h, b:b + w] for b in (0, 1)] for a in (0, 1)]
        out = torch.stack([torch.stack(row, -1) for row in parts], -2)  # (n, out, h, w, a, b)
        out = out.permute(0, 1, 2, 4, 3, 5).reshape(n, self.filters, 2 * h, 2 * w)
        return out if self.bias is None else out + self.bias.value.view(1, -1, 1, 1)

    def compute_output_shape(self, input_shape):
        n, _, h, w = input_shape
        return (n, self.filters, None if h is None else 2 * h, None if w is None else 2 * w)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer)}
