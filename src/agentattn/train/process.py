"""Where a training process runs: its rank under ``torchrun`` (DistributedDataParallel set-up), its device, its
determinism and thread count, and its autocast dtype. :func:`agentattn.train.loop.train` starts here."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..device import resolve_device
from .config import TrainConfig, _amp_dtype

__all__ = ["RunProcess", "start_process"]


@dataclass
class RunProcess:
    """Where this process trains: its rank among ``world_size`` processes, its device and its autocast dtype."""

    world_size: int
    rank: int
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:  # rank 0 alone logs, evaluates and checkpoints
        return self.rank == 0


def start_process(config: TrainConfig) -> RunProcess:
    """Join the process group under torchrun, pick the device, and set determinism and threads.

    Raises:
        ValueError: ``amp='fp16'`` off CUDA, or an unusable device name.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    threads = config.threads or (1 if config.deterministic else 0)
    if threads:
        torch.set_num_threads(threads)  # the reduction order of CPU kernels depends on the thread count
    amp_dtype = _amp_dtype(config.amp)
    if amp_dtype == torch.float16 and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device (it uses a GradScaler): use amp='bf16' on the CPU")
    return RunProcess(world_size, rank, device, amp_dtype)
