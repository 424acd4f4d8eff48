import pytest
import torch
from torch import nn

from model.encoders import MLPEncoder, SmallConvNet, build_encoder, resnet_cifar
from model.heads import MLPHead


def test_mlp_encoder_structure_and_shape():
    enc = MLPEncoder(in_dim=20)
    bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm1d)]
    linears = [m for m in enc.modules() if isinstance(m, nn.Linear)]
    assert len(bns) == 4 and all(b.num_features == 64 for b in bns)
    assert len(linears) == 5
    layers = list(enc.net)
    assert isinstance(layers[-1], nn.Linear) and layers[-1].out_features == 32
    # every block is Linear-BN-ReLU; nothing after the last Linear
    for i in range(4):
        assert [type(m) for m in layers[3 * i:3 * i + 3]] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert not any(isinstance(m, nn.Dropout) for m in enc.modules())
    assert enc.out_dim == 32
    assert enc(torch.randn(5, 20)).shape == (5, 32)


def test_mlp_encoder_dropout_option():
    enc = MLPEncoder(in_dim=10, hidden_dim=16, num_blocks=2, out_dim=8, dropout=0.3)
    drops = [m for m in enc.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and drops[0].p == 0.3
    assert enc(torch.randn(4, 10)).shape == (4, 8)


def test_resnet18_cifar_stem_and_output():
    net = resnet_cifar(18)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity) and isinstance(net.fc, nn.Identity)
    assert net.out_dim == 512
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_resnet50_and_grayscale():
    net = resnet_cifar(50)
    assert net.out_dim == 2048 and net.conv1.kernel_size == (3, 3)
    gray = resnet_cifar(18, in_channels=1).eval()
    with torch.no_grad():
        assert gray(torch.randn(1, 1, 8, 8)).shape == (1, 512)
    with pytest.raises(ValueError):
        resnet_cifar(34)


def test_small_convnet():
    net = SmallConvNet()
    assert net.out_dim == 128
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 128)


def test_build_encoder_kinds_and_error():
    assert isinstance(build_encoder("mlp", in_dim=7), MLPEncoder)
    assert build_encoder("convnet", in_channels=3, out_dim=16).out_dim == 16
    assert build_encoder("resnet18").out_dim == 512
    with pytest.raises(ValueError, match="transformer.*mlp.*resnet18.*resnet50.*convnet"):
        build_encoder("transformer")


def test_mlp_head():
    head = MLPHead(8, 16, 4)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head(torch.randn(5, 8)).shape == (5, 4)
