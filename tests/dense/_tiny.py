"""Tiny backbone configurations shared by the dense tests (all four stages, small widths)."""

TINY = {
    "agent_pvt_tiny_224": dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1)),
    "agent_swin_tiny_224": dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4)),
    "agent_cswin_tiny_224": dict(embed_dim=16, depth=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
}
