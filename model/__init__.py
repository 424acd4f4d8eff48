"""MYOW model package: encoders, heads, the MYOW/BYOL module, the k-NN miner, losses,
schedules and the EMA update. Pure PyTorch: no files, ranks, metrics or configs."""

from .ema import ema_update_
from .encoders import ENCODER_KINDS, MLPEncoder, SessionEncoder, SmallConvNet, build_encoder, resnet_cifar, set_session
from .heads import MLPHead
from .losses import byol_loss, cosine_distance, mined_loss
from .miner import exclusion_mask, mine_views
from .methods import METHOD_NAMES, DataNeeds, Method, data_needs
from .myow import ARCHITECTURES, MYOW
from .schedules import cosine_ema_momentum, mining_weight, warmup_cosine_lr

__all__ = [
    "ENCODER_KINDS", "MLPEncoder", "SessionEncoder", "SmallConvNet", "build_encoder", "resnet_cifar", "set_session",
    "MLPHead",
    "byol_loss", "cosine_distance", "mined_loss",
    "cosine_ema_momentum", "mining_weight", "warmup_cosine_lr",
    "ema_update_",
    "exclusion_mask", "mine_views",
    "METHOD_NAMES", "DataNeeds", "Method", "data_needs",
    "ARCHITECTURES", "MYOW",
]
