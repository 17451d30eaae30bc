"""Training and evaluation: data sources (:mod:`.data`) and the training loop (:mod:`.loop`)."""

from .data import DataBundle, EpochSampler, build_data, load_fashion_mnist, read_idx
from .loop import PRESETS, TrainConfig, TrainResult, evaluate, load_training_checkpoint, train

__all__ = [
    "PRESETS",
    "DataBundle",
    "EpochSampler",
    "TrainConfig",
    "TrainResult",
    "build_data",
    "evaluate",
    "load_fashion_mnist",
    "load_training_checkpoint",
    "read_idx",
    "train",
]
