"""Query generators of the data-free attacks (DFME's generator; DFMS-HL's DCGAN pair), as Keras models."""

from toolkit.backend import configure_keras
from toolkit.models.layers import (CHANNELS_FIRST, TorchBatchNorm, TorchConv2D, TorchConv2DTranspose, UpsampleConv2D,
                                   torch_default_init)

keras = configure_keras()


def dfme_generator(nz, image_shape, ngf=64, fast_upsample=True):
    """DFME's generator (cake-lab GeneratorA): dense -> BN -> [up x2, conv, BN, LeakyReLU] x2 -> conv -> BN(no affine).

    Returns the pre-tanh image, as the gradient estimate perturbs it before tanh. ``fast_upsample`` computes each
    "nearest upsample + 3x3 conv" as one transposed convolution (``UpsampleConv2D``: same function, 2.25x fewer
    multiply-adds) and pads the last convolution inside the conv op; the eager form is cake-lab's layer sequence.
    """
    channels, height, width = image_shape
    if height != width or height % 4:
        raise ValueError(f"the DFME generator makes square images with a side divisible by 4, not {image_shape}")
    init = height // 4
    z = keras.Input(shape=(nz,), name="z")
    x = keras.layers.Dense(ngf * 2 * init * init, kernel_initializer=torch_default_init(nz),
                           bias_initializer=torch_default_init(nz))(z)
    x = keras.layers.Reshape((ngf * 2, init, init))(x)
    x = TorchBatchNorm(axis=1, momentum=0.9, epsilon=1e-5)(x)
    for filters, fan_in in ((ngf * 2, ngf * 2 * 9), (ngf, ngf * 2 * 9)):
        if fast_upsample:
            x = UpsampleConv2D(filters, kernel_initializer=torch_default_init(fan_in),
                               bias_initializer=torch_default_init(fan_in))(x)
        else:
            x = keras.layers.UpSampling2D(2, data_format=CHANNELS_FIRST)(x)
            x = keras.layers.ZeroPadding2D(1, data_format=CHANNELS_FIRST)(x)
            x = keras.layers.Conv2D(filters, 3, data_format=CHANNELS_FIRST, kernel_initializer=torch_default_init(fan_in),
                                    bias_initializer=torch_default_init(fan_in))(x)
        x = TorchBatchNorm(axis=1, momentum=0.9, epsilon=1e-5)(x)
        x = keras.layers.LeakyReLU(0.2)(x)
    init_out = {"kernel_initializer": torch_default_init(ngf * 9), "bias_initializer": torch_default_init(ngf * 9)}
    if fast_upsample:
        x = TorchConv2D(channels, 3, torch_padding=1, **init_out)(x)
    else:
        x = keras.layers.ZeroPadding2D(1, data_format=CHANNELS_FIRST)(x)
        x = keras.layers.Conv2D(channels, 3, data_format=CHANNELS_FIRST, **init_out)(x)
    x = TorchBatchNorm(axis=1, momentum=0.9, epsilon=1e-5, center=False, scale=False)(x)
    return keras.Model(z, x, name="dfme_generator")


def _dcgan_init():
    return keras.initializers.RandomNormal(0.0, 0.02)  # DCGAN's N(0, 0.02) convolution weights


def _dcgan_bn():
    return TorchBatchNorm(axis=1, momentum=0.9, epsilon=1e-5,
                          gamma_initializer=keras.initializers.RandomNormal(1.0, 0.02))


def dcgan_generator(nz, image_shape, ngf=64):
    """DCGAN generator (Radford et al.; the PyTorch example DFMS uses) for 32x32 images: z -> 4 -> 8 -> 16 -> 32.

    Returns pre-tanh images; the attack maps tanh to [0, 1] pixels.
    """
    channels, height, width = image_shape
    if (height, width) != (32, 32):
        raise ValueError(f"the DCGAN generator makes 32x32 images, not {image_shape} (set the dataset image_size)")
    z = keras.Input(shape=(nz,), name="z")
    x = keras.layers.Reshape((nz, 1, 1))(z)
    for i, filters in enumerate((ngf * 4, ngf * 2, ngf)):
        x = TorchConv2DTranspose(filters, 4, strides=1 if i == 0 else 2, torch_padding=0 if i == 0 else 1,
                                 use_bias=False, kernel_initializer=_dcgan_init())(x)
        x = _dcgan_bn()(x)
        x = keras.layers.ReLU()(x)
    x = TorchConv2DTranspose(channels, 4, strides=2, torch_padding=1, use_bias=False, kernel_initializer=_dcgan_init())(x)
    return keras.Model(z, x, name="dcgan_generator")


def dcgan_discriminator(image_shape, ndf=64):
    """DCGAN discriminator for 32x32 images in [-1, 1]: 32 -> 16 -> 8 -> 4 -> one real/fake logit."""
    images = keras.Input(shape=tuple(image_shape), name="images")
    x = images
    for i, filters in enumerate((ndf, ndf * 2, ndf * 4)):
        x = TorchConv2D(filters, 4, strides=2, torch_padding=1, use_bias=False, kernel_initializer=_dcgan_init())(x)
        if i:
            x = _dcgan_bn()(x)
        x = keras.layers.LeakyReLU(0.2)(x)
    x = TorchConv2D(1, 4, use_bias=False, kernel_initializer=_dcgan_init())(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(images, x, name="dcgan_discriminator")
