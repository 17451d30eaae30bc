"""The recommended AgentSD step schedule as a diffusers ``callback_on_step_end`` (spec §5.4).

Steps 0-19 run with sx = sy = 4, ratio 0.4 and agent_ratio 0.95 (256 agents for a 64² latent); from step 20 on,
sx = sy = 2 and agent_ratio 0.5, where the agent condition fails and the blocks run plain ToMe.

    pipe = StableDiffusionPipeline.from_pretrained(path)
    apply_patch(pipe, ratio=0.4, agent_ratio=0.95, sx=4, sy=4)
    image = pipe(prompt, callback_on_step_end=AgentSDSchedule()).images[0]
"""

from __future__ import annotations

from typing import Any

from .patch import patch_options, set_patch_options

EARLY = {"ratio": 0.4, "agent_ratio": 0.95, "sx": 4, "sy": 4}
LATE = {"ratio": 0.4, "agent_ratio": 0.5, "sx": 2, "sy": 2}


class AgentSDSchedule:
    """``callback_on_step_end`` that switches the patch of ``pipeline.unet`` at ``switch_step``.

    Args:
        switch_step: first step that runs with ``late`` (20 in the official recipe).
        late: options for :func:`~agentattn.diffusion.set_patch_options` from then on.

    The options in effect at step 0 come back after the last step, so the pipeline can be called again. Works
    inside ``MultiPipelineCallbacks`` (it asks for no tensors).
    """

    tensor_inputs: list[str] = []  # noqa: RUF012 - diffusers reads this class attribute

    def __init__(self, switch_step: int = 20, late: dict[str, Any] | None = None) -> None:
        if isinstance(switch_step, bool) or not isinstance(switch_step, int) or switch_step < 1:
            raise ValueError(f"switch_step must be a positive int, got {switch_step!r}")
        self.switch_step = switch_step
        self.late = dict(LATE if late is None else late)
        self._early: dict[str, Any] | None = None

    def __call__(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict) -> dict:
        if step_index == 0 or self._early is None:
            options = patch_options(pipeline)
            self._early = {k: options[k] for k in self.late}
        if step_index + 1 == self.switch_step:
            set_patch_options(pipeline, **self.late)
        num_steps = getattr(pipeline, "num_timesteps", None)
        if num_steps is not None and step_index + 1 >= num_steps:
            set_patch_options(pipeline, **self._early)
        return callback_kwargs
