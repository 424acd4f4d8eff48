"""Encoders f: input -> representation y.

Every encoder exposes ``out_dim`` (the size D of the representation y) so that heads
can be sized without running a dummy forward pass.

- :class:`MLPEncoder`: the paper's encoder for neural data (App. D).
- :func:`resnet_cifar`: torchvision ResNet-18/50 with the CIFAR stem (App. C).
- :class:`SmallConvNet`: a small convnet that trains quickly on a CPU (MNIST, demos, tests).
- :func:`build_encoder`: plain factory keyed by a string (used by configs).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLPEncoder", "SessionEncoder", "set_session", "resnet_cifar", "SmallConvNet", "build_encoder", "ENCODER_KINDS"]


class MLPEncoder(nn.Module):
    """MLP encoder of paper App. D.

    ``num_blocks`` blocks of Linear(hidden_dim) - BatchNorm1d - ReLU [- Dropout], then a
    final Linear(out_dim) with no BN and no activation (the representation must be free
    to take any sign/scale; the predictor works on it directly when there is no projector).

    Args:
        in_dim: number of input features (e.g. recorded units).
        hidden_dim: width of each block (paper: 64).
        num_blocks: number of Linear-BN-ReLU blocks (paper: 4).
        out_dim: representation size D (paper: 32).
        dropout: dropout probability after each ReLU; 0 (default) adds no Dropout layer.
            Used by the supervised MLP baseline, not by MYOW.

    Shapes: (B, in_dim) -> (B, out_dim).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 64, num_blocks: int = 4,
                 out_dim: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        if in_dim <= 0 or hidden_dim <= 0 or out_dim <= 0 or num_blocks < 0:
            raise ValueError(
                f"MLPEncoder: dimensions must be positive (in_dim={in_dim}, "
                f"hidden_dim={hidden_dim}, out_dim={out_dim}, num_blocks={num_blocks})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLPEncoder: dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_blocks):
            layers += [nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        return self.net(x)


class SessionEncoder(nn.Module):
    """One encoder for several recording sessions whose units differ.

    Each session s has its own read-in ``Linear(N_s, width)`` (units are not shared across
    sessions: unit 3 of one session has nothing to do with unit 3 of another); the rest
    of the network (``trunk``, e.g. an MLPEncoder with ``in_dim=width``) is shared, so all
    sessions map into one representation space. ``session`` selects the read-in for the
    next forward passes (a batch never mixes sessions); set it on every copy with
    :func:`set_session`.

    Shapes: (B, N_session) -> (B, trunk.out_dim).
    """

    def __init__(self, in_dims: list[int], trunk: nn.Module, width: int) -> None:
        super().__init__()
        self.read_in = nn.ModuleList(nn.Linear(int(n), width) for n in in_dims)
        self.trunk = trunk
        self.in_dims = [int(n) for n in in_dims]
        self.out_dim = trunk.out_dim
        self.session = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.read_in[self.session](x))


def set_session(module: nn.Module, session: int) -> None:
    """Select ``session``'s read-in in every SessionEncoder inside ``module`` (online and
    target networks alike); a no-op for single-session models."""
    for m in module.modules():
        if isinstance(m, SessionEncoder):
            m.session = int(session)


def resnet_cifar(depth: int = 18, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-18/50, CIFAR variant (paper App. C).

    The ImageNet stem (7x7 stride-2 conv + max-pool) would shrink a 32x32 image to 8x8
    before the first block; the CIFAR variant uses a 3x3 stride-1 conv and no max-pool.
    ``fc`` is an Identity so the output is the global-average-pooled feature.

    Args:
        depth: 18 (D=512) or 50 (D=2048).
        in_channels: image channels (3 for RGB; 1 for MNIST).

    Returns:
        the module, with attribute ``out_dim``. Shapes: (B, in_channels, H, W) -> (B, out_dim).
    """
    import torchvision  # lazily: importing it costs ~1 s on every command that never builds a ResNet

    if depth == 18:
        net = torchvision.models.resnet18(weights=None)
        out_dim = 512
    elif depth == 50:
        net = torchvision.models.resnet50(weights=None)
        out_dim = 2048
    else:
        raise ValueError(f"resnet_cifar: depth must be 18 or 50, got {depth!r}")
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # Same init torchvision applies to its own convs (the replaced conv would otherwise
    # get PyTorch's default uniform init).
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.out_dim = out_dim
    return net


class SmallConvNet(nn.Module):
    """Small, fast convnet (3 conv-BN-ReLU blocks, global average pool, linear).

    Meant for MNIST-sized images on a CPU (demo, smoke tests), not for paper numbers.

    Args:
        in_channels: image channels (1 for MNIST).
        out_dim: representation size D.

    Shapes: (B, in_channels, H, W) -> (B, out_dim).
    """

    def __init__(self, in_channels: int = 1, out_dim: int = 128) -> None:
        super().__init__()
        chans = (32, 64, 128)
        layers: list[nn.Module] = []
        prev = in_channels
        for i, c in enumerate(chans):
            # First block keeps resolution; the next two halve it (cheap on a CPU).
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(prev, c, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            prev = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, out_dim)
        self.in_channels = in_channels
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_dim)."""
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


ENCODER_KINDS = ("mlp", "resnet18", "resnet50", "convnet")


def build_encoder(kind: str, **kwargs) -> nn.Module:
    """Build an encoder by name.

    Args:
        kind: "mlp" (kwargs of :class:`MLPEncoder`, ``in_dim`` required), "resnet18" /
            "resnet50" (kwargs of :func:`resnet_cifar` except ``depth``), or "convnet"
            (kwargs of :class:`SmallConvNet`).

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "mlp":
        return MLPEncoder(**kwargs)
    if kind == "resnet18":
        return resnet_cifar(18, **kwargs)
    if kind == "resnet50":
        return resnet_cifar(50, **kwargs)
    if kind == "convnet":
        return SmallConvNet(**kwargs)
    raise ValueError(f"unknown encoder kind {kind!r}; choose one of {', '.join(ENCODER_KINDS)}")
