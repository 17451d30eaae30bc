"""ToMe bipartite token merging with AgentSD's agent tokens (spec §5.2).

The latent token grid (H rows, W columns, row-major) is split into destination (dst) tokens, one per sy×sx cell
(the top-left one, or a random one with ``use_rand``), and source (src) tokens, all the others. Every src token
picks its most similar dst token (cosine similarity on ``metric``); src tokens are ranked by that best score, and
the top ``r`` are mean-merged into their dst:

    merged = [src tokens ranked after r (unmerged) | dst tokens averaged with the src tokens that chose them]

Agents reuse the same ranking with ``agent_r`` instead of ``r``; they exist only if
``(N - agent_r) * 2 < (N - r)`` (both capped at the number of src tokens). Unmerging gives every token the row
of its merged group. This is the math of the official ``agentsd/merge.py`` (itself ToMeSD's), written with
token-level index tensors: rows come out in a deterministic order (the official order depends on an unstable
argsort over ties), so compare rows through :attr:`TokenMerge.row_token` and :attr:`TokenMerge.token_to_row`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), index (B, M) -> (B, M, C)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _merge_into_dst(
    x: torch.Tensor, dst_tokens: torch.Tensor, src_tokens: torch.Tensor, src_dst: torch.Tensor
) -> torch.Tensor:
    """Mean of every dst token and the src tokens merged into it -> (B, n_dst, C)."""
    dst = x[:, dst_tokens]  # (B, n_dst, C)
    src = _gather_rows(x, src_tokens)  # (B, r, C)
    return dst.scatter_reduce(1, src_dst[..., None].expand(-1, -1, x.shape[-1]), src, reduce="mean")


@dataclass
class TokenMerge:
    """One bipartite merge plan (indices only; apply it to any (B, N, C) tensor of the same token grid).

    Attributes:
        dst_tokens: (n_dst,) token index of each dst token.
        unm_tokens: (B, n_unm) src tokens left unmerged, in rank order.
        src_tokens: (B, r) src tokens merged into a dst token.
        src_dst: (B, r) which dst (0..n_dst-1) each merged src token joins.
        agent_unm_tokens, agent_src_tokens, agent_src_dst: the same for the agent set; None without agents.
        token_to_row: (B, N) row of the merged tensor that each token reads back at unmerge.
    """

    dst_tokens: torch.Tensor
    unm_tokens: torch.Tensor
    src_tokens: torch.Tensor
    src_dst: torch.Tensor
    agent_unm_tokens: torch.Tensor | None
    agent_src_tokens: torch.Tensor | None
    agent_src_dst: torch.Tensor | None
    token_to_row: torch.Tensor

    @property
    def num_merged(self) -> int:
        """Rows of the merged tensor: N - r."""
        return self.unm_tokens.shape[1] + self.dst_tokens.shape[0]

    @property
    def num_agents(self) -> int:
        """Rows of the agent tensor (0 without agents)."""
        if self.agent_unm_tokens is None:
            return 0
        return self.agent_unm_tokens.shape[1] + self.dst_tokens.shape[0]

    @property
    def row_token(self) -> torch.Tensor:
        """(B, N - r): for each merged row, its unmerged src token or its dst token."""
        dst = self.dst_tokens.expand(self.unm_tokens.shape[0], -1)
        return torch.cat([self.unm_tokens, dst], dim=1)

    @property
    def agent_row_token(self) -> torch.Tensor | None:
        """(B, n_agents): the same for the agent rows; None without agents."""
        if self.agent_unm_tokens is None:
            return None
        dst = self.dst_tokens.expand(self.agent_unm_tokens.shape[0], -1)
        return torch.cat([self.agent_unm_tokens, dst], dim=1)

    @property
    def token_to_agent_row(self) -> torch.Tensor | None:
        """(B, N): agent row that each token was averaged into; None without agents."""
        if self.agent_unm_tokens is None:
            return None
        return _token_to_row(
            self.token_to_row.shape[1],
            self.dst_tokens,
            self.agent_unm_tokens,
            self.agent_src_tokens,
            self.agent_src_dst,
        )

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) -> merged (B, N - r, C): [unmerged src | dst averaged with its merged src]."""
        dst = _merge_into_dst(x, self.dst_tokens, self.src_tokens, self.src_dst)
        return torch.cat([_gather_rows(x, self.unm_tokens), dst], dim=1)

    def agents(self, x: torch.Tensor) -> torch.Tensor | None:
        """x (B, N, C) -> agent tokens (B, n_agents, C), built like :meth:`merge` with agent_r; None without agents."""
        if self.agent_unm_tokens is None:
            return None
        dst = _merge_into_dst(x, self.dst_tokens, self.agent_src_tokens, self.agent_src_dst)
        return torch.cat([_gather_rows(x, self.agent_unm_tokens), dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """y (B, N - r, C) -> (B, N, C): each token takes its merged group's row."""
        if y.shape[1] != self.num_merged:
            raise ValueError(f"unmerge expects {self.num_merged} rows, got shape {tuple(y.shape)}")
        return _gather_rows(y, self.token_to_row)


def _token_to_row(
    n: int,
    dst_tokens: torch.Tensor,
    unm_tokens: torch.Tensor,
    src_tokens: torch.Tensor,
    src_dst: torch.Tensor,
) -> torch.Tensor:
    """(B, N) row of each token in [unm | dst] given the merge indices."""
    b, n_unm = unm_tokens.shape
    device = dst_tokens.device
    rows = torch.zeros(b, n, dtype=torch.long, device=device)
    rows[:, dst_tokens] = n_unm + torch.arange(dst_tokens.shape[0], device=device)
    rows.scatter_(1, unm_tokens, torch.arange(n_unm, device=device).expand(b, -1))
    rows.scatter_(1, src_tokens, n_unm + src_dst)
    return rows


def dst_token_indices(
    h: int,
    w: int,
    sx: int,
    sy: int,
    use_rand: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Token index (row-major in an h×w grid) of the dst token of each full sy×sx cell -> (h//sy * w//sx,).

    Rows and columns past the last full cell hold only src tokens, as in the official code.
    """
    hsy, wsx = h // sy, w // sx
    if use_rand:
        gen_device = generator.device if generator is not None else "cpu"
        offset = torch.randint(sy * sx, (hsy, wsx), generator=generator, device=gen_device).to(device)
    else:
        offset = torch.zeros(hsy, wsx, dtype=torch.long, device=device)
    rows = torch.arange(hsy, device=device)[:, None] * sy + offset // sx
    cols = torch.arange(wsx, device=device)[None, :] * sx + offset % sx
    return (rows * w + cols).flatten()


def bipartite_soft_matching_2d(
    metric: torch.Tensor,
    h: int,
    w: int,
    sx: int,
    sy: int,
    r: int,
    agent_r: int = 0,
    use_rand: bool = False,
    generator: torch.Generator | None = None,
) -> TokenMerge | None:
    """Plan the ToMe merge (and AgentSD's agents) of an h×w token grid.

    Args:
        metric: (B, N, C) tokens the similarity is computed on (the block input), N = h·w.
        h, w: grid rows and columns.
        sx, sy: dst stride along columns and rows (one dst token per sy×sx cell).
        r: number of src tokens to merge away (capped at the number of src tokens).
        agent_r: the same for the agent set.
        use_rand: pick a random dst per cell (with ``generator``) instead of the top-left one.

    Returns:
        A :class:`TokenMerge`, or None when ``r <= 0`` (nothing merges, as in the official code).
    """
    n = metric.shape[1]
    if n != h * w:
        raise ValueError(f"metric has {n} tokens, expected h*w = {h}*{w} = {h * w}")
    if r <= 0:
        return None
    device = metric.device
    with torch.no_grad():
        dst_tokens = dst_token_indices(h, w, sx, sy, use_rand, generator, device)  # (n_dst,)
        is_src = torch.ones(n, dtype=torch.bool, device=device)
        is_src[dst_tokens] = False
        src_all = is_src.nonzero().squeeze(1)  # (n_src,) ascending

        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, src_all] @ metric[:, dst_tokens].transpose(-1, -2)  # (B, n_src, n_dst)
        node_max, node_idx = scores.max(dim=-1)  # best dst of each src
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)  # (B, n_src) src ranked by score

        n_src = src_all.shape[0]
        r = min(n_src, r)
        ranked_tokens = src_all[edge_idx]  # (B, n_src) token index of each ranked src
        ranked_dst = node_idx.gather(1, edge_idx)  # (B, n_src) its best dst
        unm_tokens, src_tokens, src_dst = ranked_tokens[:, r:], ranked_tokens[:, :r], ranked_dst[:, :r]

        agent_r = min(n_src, agent_r)
        if (n - agent_r) * 2 < (n - r):
            agent = (ranked_tokens[:, agent_r:], ranked_tokens[:, :agent_r], ranked_dst[:, :agent_r])
        else:
            agent = (None, None, None)
        token_to_row = _token_to_row(n, dst_tokens, unm_tokens, src_tokens, src_dst)
    return TokenMerge(dst_tokens, unm_tokens, src_tokens, src_dst, *agent, token_to_row)
