"""AgentSD: training-free agent attention for Stable Diffusion UNets in diffusers (spec §5).

    from agentattn.diffusion import apply_patch, remove_patch, AgentSDSchedule
    apply_patch(pipe, ratio=0.4, agent_ratio=0.95, sx=4, sy=4)
    image = pipe(prompt, callback_on_step_end=AgentSDSchedule()).images[0]
    remove_patch(pipe)

Needs the ``[diffusion]`` extra (diffusers).
"""

from .merge import TokenMerge, bipartite_soft_matching_2d
from .patch import (
    AgentSDConfig,
    apply_patch,
    check_config,
    is_patched,
    patch_options,
    patch_stats,
    remove_patch,
    set_patch_options,
)
from .processor import AgentSDAttnProcessor, agent_sd_attention
from .schedule import AgentSDSchedule

__all__ = [
    "AgentSDAttnProcessor",
    "AgentSDConfig",
    "AgentSDSchedule",
    "TokenMerge",
    "agent_sd_attention",
    "apply_patch",
    "bipartite_soft_matching_2d",
    "check_config",
    "is_patched",
    "patch_options",
    "patch_stats",
    "remove_patch",
    "set_patch_options",
]
