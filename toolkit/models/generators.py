"""Query generators of the data-free attacks (DFME's generator), as Keras models from a latent vector."""

from toolkit.backend import configure_keras
from toolkit.models.layers import CHANNELS_FIRST, TorchBatchNorm, UpsampleConv2D, torch_default_init

keras = configure_keras()


def dfme_generator(nz, image_shape, ngf=64, fast_upsample=True):
    """DFME's generator (cake-lab GeneratorA): dense -> BN -> [up x2, conv, BN, LeakyReLU] x2 -> conv -> BN(no affine).

    Returns the pre-tanh image, as the gradient estimate perturbs it before tanh. ``fast_upsample`` computes each
    "nearest upsample + 3x3 conv" with ``UpsampleConv2D`` (same function, ~2x fewer multiply-adds).
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
    x = keras.layers.ZeroPadding2D(1, data_format=CHANNELS_FIRST)(x)
    x = keras.layers.Conv2D(channels, 3, data_format=CHANNELS_FIRST, kernel_initializer=torch_default_init(ngf * 9),
                            bias_initializer=torch_default_init(ngf * 9))(x)
    x = TorchBatchNorm(axis=1, momentum=0.9, epsilon=1e-5, center=False, scale=False)(x)
    return keras.Model(z, x, name="dfme_generator")
