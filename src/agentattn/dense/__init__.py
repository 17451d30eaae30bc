"""Dense prediction with agent-attention backbones: detection (torchvision) and semantic segmentation.

Needs the ``[dense]`` extra (torchvision, pycocotools, scikit-image).
"""

from .backbones import OFFICIAL_AGENT_GRIDS, AgentBackbone, build_backbone, list_backbones
from .detection import DETECTOR_KINDS, build_detector
from .segmentation import SEGMENTER_KINDS, build_segmenter

__all__ = [
    "DETECTOR_KINDS",
    "OFFICIAL_AGENT_GRIDS",
    "SEGMENTER_KINDS",
    "AgentBackbone",
    "build_backbone",
    "build_detector",
    "build_segmenter",
    "list_backbones",
]
