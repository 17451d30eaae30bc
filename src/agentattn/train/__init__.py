"""Training and evaluation: what to run (:mod:`.config`), data sources (:mod:`.data`), the training loop
(:mod:`.loop`) and what a run keeps across a kill (:mod:`.state`)."""

from .config import PRESETS, TrainConfig
from .data import DataBundle, EpochSampler, build_data, load_fashion_mnist, read_idx
from .loop import TrainResult, evaluate, train
from .state import load_training_checkpoint

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
