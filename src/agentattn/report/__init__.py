"""Reports: ``compare`` (agent vs softmax vs linear twins, trained and measured) and ``explain`` (what the
agents attend to), rendered as Markdown and self-contained HTML with matplotlib figures."""

from .compare import COMPARE_MODEL, COMPARE_MODEL_KWARGS, TWINS, CompareConfig, TwinResult, compare
from .explain import Explanation, explain, load_images, preprocessing_for
from .render import Report

__all__ = [
    "COMPARE_MODEL",
    "COMPARE_MODEL_KWARGS",
    "TWINS",
    "CompareConfig",
    "Explanation",
    "Report",
    "TwinResult",
    "compare",
    "explain",
    "load_images",
    "preprocessing_for",
]
