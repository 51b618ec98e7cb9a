import numpy as np
import pytest
import keras
import torch

from toolkit.errors import UserError
from toolkit.models import available_architectures, build_model, count_trainable_params

# Trainable parameters of the reference torch models at 10 classes (torch counts parameters, not BN buffers):
# LeNet family from LabRAI/MISLEADER, ResNet-8x from DFAD/DFME, MobileNetV2 / DenseNet121 CIFAR variants as
# torchvision's models with the CIFAR stem (checked against torchvision 0.29: 2,236,682 and 6,956,426).
REFERENCE_PARAMS = {
    ("lenet5", 1): 61_706,
    ("lenet5_half", 1): 15_738,
    ("lenet5_fifth", 1): 9_884,
    ("resnet18_8x", 3): 11_173_962,
    ("resnet34_8x", 3): 21_282_122,
    ("mobilenet_v2", 3): 2_236_682,
    ("densenet121", 3): 6_956_426,
}


@pytest.mark.parametrize("arch,channels", list(REFERENCE_PARAMS))
def test_parameter_counts_match_reference(arch, channels):
    model = build_model(arch, (channels, 32, 32), 10)
    assert count_trainable_params(model) == REFERENCE_PARAMS[(arch, channels)]


def test_resnet18_is_11_17m():
    assert round(count_trainable_params(build_model("resnet18_8x", (3, 32, 32), 10)) / 1e6, 2) == 11.17


@pytest.mark.parametrize("arch", ["lenet5", "lenet5_half", "lenet5_fifth", "resnet18_8x_w16", "mobilenet_v2"])
@pytest.mark.parametrize("channels,classes", [(1, 10), (3, 100)])
def test_any_channels_and_classes(arch, channels, classes):
    model = build_model(arch, (channels, 32, 32), classes, mean=[0.5] * channels, std=[0.25] * channels)
    out = model(torch.rand(2, channels, 32, 32), training=False)
    assert tuple(out.shape) == (2, classes)
    assert torch.isfinite(out).all()


def test_head_grows_with_classes():
    small = count_trainable_params(build_model("resnet18_8x", (3, 32, 32), 10))
    large = count_trainable_params(build_model("resnet18_8x", (3, 32, 32), 100))
    assert large - small == 90 * 512 + 90


def test_standardize_is_inside_the_model():
    x = torch.rand(4, 1, 32, 32)
    plain = build_model("lenet5", (1, 32, 32), 10)
    norm = build_model("lenet5", (1, 32, 32), 10, mean=[0.2], std=[0.5])
    norm.set_weights([w for w in norm.get_weights()[:2]] + plain.get_weights())
    expected = plain((x - 0.2) / 0.5, training=False)
    np.testing.assert_allclose(norm(x, training=False).detach().numpy(), expected.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_lenet_matches_torch_reference_function():
    """Same weights, same outputs as the reference LeNet5 written in plain torch (NCHW, 5x5 convs, 2x2 max-pools)."""
    model = build_model("lenet5", (1, 32, 32), 10)
    w = [torch.as_tensor(v) for v in model.get_weights()]
    x = torch.rand(3, 1, 32, 32)
    F = torch.nn.functional
    h = F.max_pool2d(F.relu(F.conv2d(x, w[0].permute(3, 2, 0, 1), w[1])), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, w[2].permute(3, 2, 0, 1), w[3])), 2)
    h = F.relu(F.conv2d(h, w[4].permute(3, 2, 0, 1), w[5])).flatten(1)
    ref = F.linear(F.relu(F.linear(h, w[6].T, w[7])), w[8].T, w[9])
    np.testing.assert_allclose(model(x, training=False).detach().numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)


def test_batchnorm_uses_torch_defaults():
    model = build_model("resnet18_8x_w16", (3, 32, 32), 10)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(bn.momentum == 0.9 and bn.epsilon == 1e-5 and bn.axis == 1 for bn in bns)


def test_unknown_architecture_is_a_user_error():
    with pytest.raises(UserError, match="unknown architecture 'resnet19_8x'.*did you mean 'resnet18_8x'"):
        build_model("resnet19_8x", (3, 32, 32), 10)


def test_lenet_rejects_wrong_input_size():
    with pytest.raises(UserError, match="lenet5.*32"):
        build_model("lenet5", (1, 28, 28), 10)


def test_registry_lists_the_zoo():
    assert {"lenet5", "lenet5_half", "lenet5_fifth", "resnet18_8x", "resnet34_8x", "mobilenet_v2",
            "densenet121"} <= set(available_architectures())


def test_torch_batchnorm_matches_torch_module():
    from toolkit.models.layers import TorchBatchNorm

    x = torch.randn(16, 5, 6, 6) * 3 + 1
    ours, ref = TorchBatchNorm(axis=1, momentum=0.9, epsilon=1e-5), torch.nn.BatchNorm2d(5)
    ours.build(x.shape)
    for training in (True, True, False):
        ref.train(training)
        torch.testing.assert_close(ours(x, training=training), ref(x).detach())
    torch.testing.assert_close(ours.moving_mean.value.detach(), ref.running_mean)
    torch.testing.assert_close(ours.moving_variance.value.detach(), ref.running_var)


@pytest.mark.parametrize("arch,shape", [("lenet5", (1, 32, 32)), ("resnet18_8x_w16", (3, 32, 32)),
                                        ("mobilenet_v2", (3, 32, 32)), ("densenet121", (3, 32, 32))])
def test_fast_forward_is_the_same_computation(arch, shape):
    from toolkit.models.fast import forward

    model = build_model(arch, shape, 10, mean=[0.5] * shape[0], std=[0.25] * shape[0])
    x = torch.rand(4, *shape)
    torch.testing.assert_close(forward(model, x, False), model(x, training=False), rtol=0, atol=0)
    start = [w.copy() for w in model.get_weights()]
    torch.manual_seed(0)
    a, after_a = model(x, training=True), model.get_weights()
    model.set_weights(start)
    torch.manual_seed(0)
    b, after_b = forward(model, x, True), model.get_weights()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(np.array_equal(p, q) for p, q in zip(after_a, after_b))


@pytest.mark.parametrize("cin,cout,size", [(3, 5, 4), (16, 8, 8)])
def test_upsample_conv_equals_upsampling_then_conv(cin, cout, size):
    import torch.nn.functional as F

    from toolkit.models.layers import UpsampleConv2D

    layer = UpsampleConv2D(cout, bias_initializer="random_normal")
    x = torch.randn(4, cin, size, size, requires_grad=True)
    layer.build(x.shape)
    kernel = layer.kernel.value
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), kernel.permute(3, 2, 0, 1), layer.bias.value,
                   padding=1)
    out = layer(x)
    assert out.shape == (4, cout, 2 * size, 2 * size)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    g_out = torch.autograd.grad((out * out).sum(), [x, kernel])
    g_ref = torch.autograd.grad((ref * ref).sum(), [x, kernel])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_torch_conv_transpose_layer_matches_torch():
    import torch.nn as nn

    from toolkit.models.fast import forward
    from toolkit.models.generators import dcgan_discriminator, dcgan_generator
    from toolkit.models.layers import TorchConv2DTranspose

    layer = TorchConv2DTranspose(5, 4, strides=2, torch_padding=1, bias_initializer="random_normal")
    x = torch.randn(2, 3, 8, 8)
    out = layer(x)
    ref = nn.ConvTranspose2d(3, 5, 4, stride=2, padding=1)
    with torch.no_grad():
        ref.weight.copy_(layer.kernel.value.permute(3, 2, 0, 1))
        ref.bias.copy_(layer.bias.value)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    assert tuple(layer.compute_output_shape((None, 3, 8, 8))) == (None, 5, 16, 16)
    g, d = dcgan_generator(16, (1, 32, 32), 8), dcgan_discriminator((1, 32, 32), 8)
    images = torch.tanh(forward(g, torch.randn(3, 16), True))
    assert images.shape == (3, 1, 32, 32) and forward(d, images, True).shape == (3, 1)
