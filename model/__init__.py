"""MYOW model package: encoders, heads, the MYOW/BYOL module, the k-NN miner, losses,
schedules and the EMA update. Pure PyTorch: no files, ranks, metrics or configs."""

from .encoders import ENCODER_KINDS, MLPEncoder, SessionEncoder, SmallConvNet, build_encoder, resnet_cifar, set_session
from .heads import MLPHead
from .losses import byol_loss, cosine_distance, mined_loss
from .schedules import cosine_ema_momentum, mining_weight, warmup_cosine_lr
from .ema import copy_params_, ema_update_
from .miner import exclusion_mask, mine_views
from .myow import ARCHITECTURES, MYOW

__all__ = [
    "ENCODER_KINDS", "MLPEncoder", "SessionEncoder", "SmallConvNet", "build_encoder", "resnet_cifar", "set_session",
    "MLPHead",
    "byol_loss", "cosine_distance", "mined_loss",
    "cosine_ema_momentum", "mining_weight", "warmup_cosine_lr",
    "copy_params_", "ema_update_",
    "exclusion_mask", "mine_views",
    "ARCHITECTURES", "MYOW",
]
