"""One ``attn_type`` grammar for every family: the official forms, words, per-block specs and their errors."""

from __future__ import annotations

import pytest
import timm
import torch

from agentattn.layers import AgentAttentionBase, LinearAttention
from agentattn.models._builder import parse_attn_type

# Four stages of two blocks each, tiny widths: the model families in their smallest working form.
FAMILIES = {
    "agent_deit_tiny_patch16_224": dict(img_size=32, embed_dim=32, depth=8, num_heads=2, num_classes=5, agent_num=4),
    "agent_swin_tiny_224": dict(
        img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 2), window_size=2,
        agent_num=4, num_classes=5,
    ),
    "agent_pvt_tiny_224": dict(
        img_size=64, embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(2, 2, 2, 2), agent_num=4,
        num_classes=5,
    ),
    "agent_cswin_tiny_224": dict(
        img_size=64, embed_dim=8, depth=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), split_size=(1, 2, 3, 7),
        agent_num=4, num_classes=5,
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("attn_type", "expected"),
    [
        ("A", [["A", "A"], ["A", "A"], ["A", "A"], ["A", "A"]]),
        ("softmax", [["B", "B"], ["B", "B"], ["B", "B"], ["B", "B"]]),
        ("AABL", [["A", "A"], ["A", "A"], ["B", "B"], ["L", "L"]]),  # one letter per stage
        ("aaab", [["A", "A"], ["A", "A"], ["A", "A"], ["B", "B"]]),  # letters in any case
        ("AAMB1", [["A", "A"], ["A", "A"], ["A", "B"], ["B", "B"]]),  # the official Swin form
        ("ABABABAB", [["A", "B"], ["A", "B"], ["A", "B"], ["A", "B"]]),  # one letter per block
        ("A3L1B4", [["A", "A"], ["A", "L"], ["B", "B"], ["B", "B"]]),  # runs, the official DeiT form
        ("L8", [["L", "L"], ["L", "L"], ["L", "L"], ["L", "L"]]),  # one run over every block
        (["agent", "M1", "AL", "B2"], [["A", "A"], ["A", "B"], ["A", "L"], ["B", "B"]]),  # per-stage entries
    ],
)
def test_one_grammar(attn_type, expected):
    assert parse_attn_type(attn_type, (2, 2, 2, 2)) == expected


@pytest.mark.parametrize(
    ("attn_type", "match"),
    [
        ("AAB", "3 letters: give one, one per stage \\(4\\) or one per block \\(8\\)"),
        ("AAM", "an 'M' stage needs a trailing count"),
        ("AAAB3", "an 'M' stage needs a trailing count"),
        ("AAMB3", "stage 2 is 'M3' but has only 2 blocks"),
        ("A3B3", "6 blocks, but it has 8"),
        ("AAXB", "runs like 'A4B8'"),
        ("", "attn_type must be"),
        (["A", "B"], "2 entries, but there are 4 stages"),
        (["A", "B", "A", "Q"], "stage 3 is 'Q'"),
        (7, "attn_type must be"),
    ],
)
def test_errors_name_attn_type_and_the_counts(attn_type, match):
    with pytest.raises(ValueError, match=match):
        parse_attn_type(attn_type, (2, 2, 2, 2))


BLOCKS = ("AgentDeiTBlock", "AgentSwinBlock", "Block", "AgentCSwinBlock")


def _kinds(model: torch.nn.Module) -> str:
    """The attention of each block, in order: 'A' agent, 'L' linear, 'B' softmax (window, SR or global)."""
    out = ""
    for module in model.modules():
        if type(module).__name__ not in BLOCKS:
            continue
        inside = list(module.modules())
        if any(isinstance(m, AgentAttentionBase) for m in inside):
            out += "A"
        elif any(isinstance(m, LinearAttention) or "LinearAttention" in type(m).__name__ for m in inside):
            out += "L"
        else:
            out += "B"
    return out


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize(
    ("attn_type", "blocks"),
    [("agent", "AAAAAAAA"), (["A", "M1", "AL", "B"], "AAABALBB"), ("A3L1B4", "AAALBBBB")],
)
def test_every_family_takes_every_form(name, attn_type, blocks):
    kwargs = FAMILIES[name]
    if name == "agent_deit_tiny_patch16_224" and isinstance(attn_type, list):
        pytest.skip("a one-stage model takes no per-stage list")
    model = timm.create_model(name, **kwargs, attn_type=attn_type).eval()
    assert _kinds(model) == blocks
    with torch.no_grad():
        out = model(torch.randn(1, 3, *((32, 32) if name == "agent_deit_tiny_patch16_224" else (64, 64))))
    assert out.shape == (1, 5) and torch.isfinite(out).all()
