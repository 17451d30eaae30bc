"""Bad input for the op, the layers, ``timm.create_model`` kwargs and model forward (table-driven, see cases.py)."""

from __future__ import annotations

import functools

import pytest
import timm
import torch

import agentattn  # noqa: F401  (registers the models)
from agentattn.layers import (
    AgentAttention,
    CSwinAgentAttention,
    LinearAttention,
    PVTAgentAttention,
    SoftmaxAttention,
)
from agentattn.ops import agent_attention, linear_attention, naive

from .cases import Case, case_id, check_case


def _t(*shape, dtype=torch.float32, device="cpu"):
    return (
        torch.randn(*shape, dtype=dtype)
        if device == "cpu"
        else torch.empty(*shape, dtype=dtype, device=device)
    )


def _qkva(b=2, h=2, n_q=6, m=7, n=3, d=4, **over):
    out = dict(q=_t(b, h, n_q, d), k=_t(b, h, m, d), v=_t(b, h, m, d), agents=_t(b, h, n, d))
    out.update(over)
    return out


def _shape(*shape):
    def check(y):
        assert tuple(y.shape) == shape, f"shape {tuple(y.shape)} != {shape}"

    return check


def _finite(y):
    assert torch.isfinite(y).all(), "non-finite output"


def _all_nan(y):
    assert torch.isnan(y).all(), "NaN input should give an all-NaN output (documented)"


def _nan_rows(y):
    # NaN in one query: that query's output is NaN, the others stay finite (documented).
    assert torch.isnan(y[:, :, 0]).all() and torch.isfinite(y[:, :, 1:]).all()


def _op_cases(entry: str, op) -> list[Case]:
    def call(**kw):
        def run(tmp):
            a = _qkva(**{k: v for k, v in kw.items() if k in ("b", "h", "n_q", "m", "n", "d")})
            a.update({k: v for k, v in kw.items() if k not in ("b", "h", "n_q", "m", "n", "d")})
            q, k, v, agents = a.pop("q"), a.pop("k"), a.pop("v"), a.pop("agents")
            return op(q, k, v, agents, **a)

        return run

    nan_q = _t(2, 2, 6, 4)
    nan_q[:, :, 0] = float("nan")
    big_nan_q = _t(1, 3, 300, 64)
    big_nan_q[:, :, 0, 5] = float("nan")
    nan_k = _t(2, 2, 7, 4)
    nan_k[0, 0, 0, 0] = float("nan")
    all_padded = torch.zeros(2, 7, dtype=torch.bool)
    all_padded[1] = True
    return [
        Case(entry, "q rank 3", call(q=_t(2, 6, 4)), ValueError, r"q must be 4-D \(B, H, N, d\)"),
        Case(entry, "k rank 5", call(k=_t(1, 2, 2, 7, 4)), ValueError, r"k must be 4-D"),
        Case(entry, "v rank 2", call(v=_t(7, 4)), ValueError, r"v must be 4-D"),
        Case(entry, "agents rank 3", call(agents=_t(2, 3, 4)), ValueError, r"agents must be 4-D"),
        Case(entry, "q not a tensor", call(q=[[1.0]]), TypeError, r"q must be a torch.Tensor"),
        Case(entry, "int q", call(q=torch.ones(2, 2, 6, 4, dtype=torch.long)), TypeError, r"q must be a floating"),
        Case(entry, "fp64 k with fp32 q", call(k=_t(2, 2, 7, 4, dtype=torch.float64)), TypeError, r"k has dtype"),
        Case(entry, "k on another device", call(k=_t(2, 2, 7, 4, device="meta")), ValueError, r"k is on meta"),
        Case(entry, "heads differ", call(k=_t(2, 3, 7, 4)), ValueError, r"k must have shape \(B, H, M, d\)"),
        Case(entry, "head dim differs", call(agents=_t(2, 2, 3, 5)), ValueError, r"agents must have shape"),
        Case(entry, "v has other M", call(v=_t(2, 2, 8, 4)), ValueError, r"v must have shape \(B, H, M, d_v\)"),
        Case(entry, "n = 0 agents", call(n=0), ValueError, r"at least one agent"),
        Case(entry, "M = 0 keys", call(m=0), ValueError, r"at least one key"),
        Case(entry, "B = 0", call(b=0), None, check=_shape(0, 2, 6, 4)),
        Case(entry, "N = 1", call(n_q=1), None, check=_shape(2, 2, 1, 4)),
        Case(entry, "M = 1", call(m=1), None, check=_shape(2, 2, 6, 4)),
        Case(entry, "agents > keys", call(n=20, m=3), None, check=_finite),
        Case(entry, "d_v != d", call(v=_t(2, 2, 7, 9)), None, check=_shape(2, 2, 6, 9)),
        Case(entry, "agent_bias wrong shape", call(agent_bias=_t(3, 3, 7)), ValueError, r"agent_bias must broadcast"),
        Case(entry, "agent_bias rank 5", call(agent_bias=_t(1, 1, 2, 3, 7)), ValueError, r"agent_bias must broadcast"),
        Case(entry, "query_bias wrong shape", call(query_bias=_t(6, 4)), ValueError, r"query_bias must broadcast"),
        Case(entry, "1-D query_bias (n,)", call(query_bias=_t(3)), None, check=_shape(2, 2, 6, 4)),
        Case(entry, "2-D agent_bias (n, M)", call(agent_bias=_t(3, 7)), None, check=_shape(2, 2, 6, 4)),
        Case(entry, "int agent_bias", call(agent_bias=torch.ones(3, 7, dtype=torch.long)), TypeError, r"agent_bias"),
        Case(entry, "mask wrong shape", call(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)), ValueError,
             r"key_padding_mask must have shape \(B, M\) = \(2, 7\)"),
        Case(entry, "float mask", call(key_padding_mask=torch.zeros(2, 7)), TypeError, r"key_padding_mask must be a bool"),
        Case(entry, "every key padded", call(key_padding_mask=all_padded), None,
             check=lambda y: (_finite(y), _assert(torch.equal(y[1], torch.zeros_like(y[1])), "padded row not 0"))),
        Case(entry, "dropout_p = 1", call(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        Case(entry, "dropout_p < 0", call(dropout_p=-0.1), ValueError, r"dropout_p"),
        Case(entry, "dropout_p NaN", call(dropout_p=float("nan")), ValueError, r"dropout_p"),
        Case(entry, "scale = 0", call(scale=0.0), ValueError, r"scale must be a positive"),
        Case(entry, "scale = inf", call(scale=float("inf")), ValueError, r"scale must be a positive"),
        Case(entry, "scale NaN", call(scale=float("nan")), ValueError, r"scale"),
        Case(entry, "NaN in one query", call(q=nan_q), None, check=_nan_rows),
        # With biases (as every agent layer has) the fast CPU path skips its NaN scan and relies on SDPA's fused
        # kernel propagating the NaN through the additive mask: checked here on the installed torch.
        Case(entry, "NaN in one query, with biases",
             call(q=nan_q, agent_bias=_t(2, 2, 3, 7), query_bias=_t(2, 2, 6, 3)), None, check=_nan_rows),
        Case(entry, "NaN in one query, large", call(q=big_nan_q, k=_t(1, 3, 300, 64), v=_t(1, 3, 300, 64),
             agents=_t(1, 3, 49, 64), agent_bias=_t(1, 3, 49, 300), query_bias=_t(1, 3, 300, 49)), None,
             check=_nan_rows),
        Case(entry, "NaN in a key", call(k=nan_k), None,
             check=lambda y: _assert(torch.isnan(y[0, 0]).all() and torch.isfinite(y[1]).all(), "NaN spread")),
    ]  # fmt: skip


def _assert(cond, what):
    assert cond, what


def _linear_cases() -> list[Case]:
    entry = "ops.linear_attention"

    def call(q=None, k=None, v=None, **kw):
        q = _t(2, 2, 6, 4) if q is None else q
        k = _t(2, 2, 7, 4) if k is None else k
        v = _t(2, 2, 7, 4) if v is None else v
        return lambda tmp: linear_attention(q, k, v, **kw)

    return [
        Case(entry, "q rank 3", call(q=_t(2, 6, 4)), ValueError, r"q must be 4-D"),
        Case(entry, "k head dim differs", call(k=_t(2, 2, 7, 5)), ValueError, r"disagree"),
        Case(entry, "int q", call(q=torch.ones(2, 2, 6, 4, dtype=torch.long)), TypeError, r"q must be a floating"),
        Case(entry, "fp64 v", call(v=_t(2, 2, 7, 4, dtype=torch.float64)), TypeError, r"v has dtype"),
        Case(entry, "k on another device", call(k=_t(2, 2, 7, 4, device="meta")), ValueError, r"k is on meta"),
        Case(entry, "q not a tensor", call(q=3.0), TypeError, r"q must be a torch.Tensor"),
        Case(entry, "eps = 0", call(eps=0.0), ValueError, r"eps must be a positive"),
        Case(entry, "B = 0", call(q=_t(0, 2, 6, 4), k=_t(0, 2, 7, 4), v=_t(0, 2, 7, 4)), None, check=_shape(0, 2, 6, 4)),
        Case(entry, "N = 1, M = 1", call(q=_t(2, 2, 1, 4), k=_t(2, 2, 1, 4), v=_t(2, 2, 1, 4)), None,
             check=_shape(2, 2, 1, 4)),
        Case(entry, "NaN key", call(k=torch.full((2, 2, 7, 4), float("nan"))), None, check=_all_nan),
    ]  # fmt: skip


def _layer_cases() -> list[Case]:
    cases: list[Case] = []
    # (entry, constructor, good input shape (B = 2), grid of that input)
    families = [
        ("layers.AgentAttention", lambda **kw: AgentAttention(16, 2, 4, (3, 4), num_prefix_tokens=1, **kw), (2, 13, 16)),
        ("layers.PVTAgentAttention", lambda **kw: PVTAgentAttention(16, 2, 4, (4, 4), sr_ratio=2, **kw), (2, 16, 16)),
        ("layers.CSwinAgentAttention", lambda **kw: CSwinAgentAttention(16, 2, 4, (3, 4), **kw), (3, 2, 12, 16)),
        ("layers.SoftmaxAttention", lambda **kw: SoftmaxAttention(16, 2, **kw), (2, 13, 16)),
        ("layers.LinearAttention", lambda **kw: LinearAttention(16, 2, (3, 4), num_prefix_tokens=1, **kw), (2, 13, 16)),
    ]  # fmt: skip
    for entry, make, shape in families:
        cswin = entry.endswith("CSwinAgentAttention")
        batch_axis = 1 if cswin else 0

        def fwd(x, make=make, **kw):
            return lambda tmp: make()(x, **kw)

        def with_batch(b, shape=shape, batch_axis=batch_axis):
            s = list(shape)
            s[batch_axis] = b
            return tuple(s)

        empty = _t(*with_batch(0))
        nan_x = _t(*shape)
        nan_x[..., 0, :] = float("nan")
        bad_c = (*shape[:-1], 8)
        wrong_n = (*shape[:-2], shape[-2] + 1, shape[-1])
        cases += [
            Case(entry, "rank too low", fwd(_t(*shape[1:])), ValueError, r"must be"),
            Case(entry, "rank too high", fwd(_t(1, *shape)), ValueError, r"must be"),
            Case(entry, "wrong channels", fwd(_t(*bad_c)), ValueError, r"16"),
            Case(entry, "int input", fwd(torch.ones(shape, dtype=torch.long)), TypeError, r"floating-point"),
            Case(entry, "fp64 input, fp32 weights", fwd(_t(*shape, dtype=torch.float64)), TypeError, r"dtype"),
            Case(entry, "input on another device", fwd(_t(*shape, device="meta")), ValueError, r"meta"),
            Case(entry, "B = 0", fwd(empty), None, check=lambda y: _assert(y.numel() == 0 and y.shape[-1] == 16, "")),
            Case(entry, "NaN token", fwd(nan_x), None, check=lambda y: _assert(torch.isnan(y).any(), "NaN lost")),
            Case(entry, "dim not divisible by heads", lambda tmp, make=make: type(make())(15, 2), ValueError,
                 r"dim \(15\) must be divisible by num_heads \(2\)"),
            Case(entry, "num_heads = 0", lambda tmp, make=make: type(make())(16, 0), ValueError, r"num_heads"),
            Case(entry, "dim = 0", lambda tmp, make=make: type(make())(0, 1), ValueError, r"dim"),
        ]  # fmt: skip
        if not entry.endswith("SoftmaxAttention"):
            cases += [
                Case(entry, "token count off the grid", fwd(_t(*wrong_n)), ValueError, r"grid_size|N = "),
                Case(entry, "grid_size (0, 4)", fwd(_t(*shape), grid_size=(0, 4)), ValueError, r"grid_size must be"),
                Case(entry, "grid_size (2, 2) for 12 tokens", fwd(_t(*shape), grid_size=(2, 2)), ValueError,
                     r"grid_size|N = "),
                Case(entry, "grid_size 'big'", fwd(_t(*shape), grid_size="big"), ValueError, r"grid_size must be"),
            ]  # fmt: skip
        if "Agent" in entry:
            cls = type(make())
            cases += [
                Case(entry, "agent_num = 0", lambda tmp, cls=cls: cls(16, 2, 0), ValueError, r"agent_num must be"),
                Case(entry, "agent_num = -4", lambda tmp, cls=cls: cls(16, 2, -4), ValueError, r"agent_num must be"),
                Case(entry, "attn_drop = 1", lambda tmp, make=make: make(attn_drop=1.0), ValueError, r"attn_drop"),
                Case(entry, "learned agents, B = 0", lambda tmp, make=make, x=empty: make(learned_agents=True)(x),
                     None, check=lambda y: _assert(y.numel() == 0, "not empty")),
            ]  # fmt: skip
        else:
            cases.append(
                Case(
                    entry,
                    "proj_drop = 2",
                    lambda tmp, make=make: make(proj_drop=2.0),
                    ValueError,
                    r"proj_drop",
                )
            )
    # agent_num larger than the number of tokens: pooling repeats queries; documented to work.
    cases += [
        Case("layers.AgentAttention", "agent_num 49 > N = 4 tokens", lambda tmp: AgentAttention(8, 2, 49, (2, 2))(_t(2, 4, 8)),
             None, check=_finite),
        Case("layers.AgentAttention", "N = 1 (grid 1×1)", lambda tmp: AgentAttention(8, 2, 4, (1, 1))(_t(2, 1, 8)),
             None, check=_shape(2, 1, 8)),
        Case("layers.PVTAgentAttention", "sr_ratio larger than the grid (one key, padded)",
             lambda tmp: PVTAgentAttention(8, 2, 4, 4, sr_ratio=8)(_t(2, 16, 8)), None, check=_shape(2, 16, 8)),
        Case("layers.PVTAgentAttention", "run-time grid smaller than sr_ratio",
             lambda tmp: PVTAgentAttention(8, 2, 4, 4, sr_ratio=2)(_t(2, 1, 8), grid_size=(1, 1)), None,
             check=_shape(2, 1, 8)),
        Case("layers.CSwinAgentAttention", "qkv first axis 2", lambda tmp: CSwinAgentAttention(8, 2, 4, 2)(_t(2, 2, 4, 8)),
             ValueError, r"\(3, B, H·W, C\)"),
    ]  # fmt: skip
    return cases


# Small configs of each family (fast to build), the kwargs their tests use.
SMALL = {
    "agent_deit_tiny_patch16_224": dict(depth=1, img_size=32, patch_size=8, embed_dim=16, num_heads=2, agent_num=4),
    "agent_pvt_tiny_224": dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 2, 2),
                               mlp_ratios=(2, 2, 2, 2), agent_num=(4, 4, 4, 1), img_size=64),
    "agent_swin_tiny_224": dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 2, 2), img_size=64, window_size=2),
    "agent_cswin_tiny_224": dict(depth=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 2, 2), img_size=64,
                                 split_size=(1, 2, 2, 2)),
}  # fmt: skip


def _small(name, **over):
    return timm.create_model(name, **{"num_classes": 5, **SMALL[name], **over}).eval()


@functools.cache
def _cached_small(name):
    return _small(name)


def _model_cases() -> list[Case]:
    cases = [
        Case("timm.create_model", "unknown model name", lambda tmp: timm.create_model("agent_pvt_nonexistent"),
             RuntimeError, r"Unknown model \(agent_pvt_nonexistent\)"),  # timm's own error, documented
    ]  # fmt: skip
    for name in SMALL:
        family = name.split("_")[1]
        entry = f"create_model kwargs ({family})"
        depth_key = "depth" if family in ("deit", "cswin") else "depths"
        stage_heads = (1, 1, 2) if family != "deit" else 3
        cases += [
            Case(entry, "unknown kwarg", lambda tmp, n=name: _small(n, bogus_option=3), TypeError, r"bogus_option"),
            Case(entry, "agent_num = 0", lambda tmp, n=name: _small(n, agent_num=0), ValueError, r"agent_num"),
            Case(entry, "num_heads not dividing the width", lambda tmp, n=name, h=stage_heads: _small(n, num_heads=h),
                 ValueError, r"num_heads|divisible|per stage"),
            Case(entry, "drop_path_rate = 1.5", lambda tmp, n=name: _small(n, drop_path_rate=1.5), ValueError,
                 r"drop_path_rate"),
            Case(entry, "drop_rate = -1", lambda tmp, n=name: _small(n, drop_rate=-1.0), ValueError, r"drop_rate|dropout"),
            Case(entry, "num_classes = -1", lambda tmp, n=name: _small(n, num_classes=-1), ValueError, r"num_classes"),
            Case(entry, "in_chans = 0", lambda tmp, n=name: _small(n, in_chans=0), ValueError, r"in_chans"),
            Case(entry, "img_size = 0", lambda tmp, n=name: _small(n, img_size=0), ValueError, r"img_size"),
            Case(entry, "global_pool 'bogus'", lambda tmp, n=name: _small(n, global_pool="bogus"), ValueError,
                 r"global_pool|pool"),
        ]  # fmt: skip
        if family != "deit":
            cases.append(
                Case(entry, "stage list of the wrong length", lambda tmp, n=name, k=depth_key: _small(n, **{k: (1, 1)}),
                     ValueError, r"stage|one value|entries|sequence")
            )  # fmt: skip

        entry = f"model forward ({family})"
        size = SMALL[name]["img_size"]

        def fwd(x, n=name, grad=False):
            def run(tmp):
                model = _cached_small(n)
                with torch.set_grad_enabled(grad):
                    return model(x)

            return run

        cases += [
            Case(entry, "image of rank 3", fwd(_t(3, size, size)), ValueError, r"\(B, C, H, W\)|4-D"),
            Case(entry, "1 channel for 3", fwd(_t(2, 1, size, size)), ValueError, r"in_chans|channels"),
            Case(entry, "int image", fwd(torch.ones(2, 3, size, size, dtype=torch.long)), TypeError, r"floating"),
            Case(entry, "fp64 image", fwd(_t(2, 3, size, size, dtype=torch.float64)), TypeError, r"dtype"),
            Case(entry, "image on another device", fwd(_t(2, 3, size, size, device="meta")), ValueError, r"meta"),
            Case(entry, "B = 0", fwd(_t(0, 3, size, size)), None, check=_shape(0, 5)),
            Case(entry, "B = 0 with grad", fwd(_t(0, 3, size, size), grad=True), None, check=_shape(0, 5)),
            Case(entry, "NaN image", fwd(torch.full((1, 3, size, size), float("nan"))), None, check=_all_nan),
        ]  # fmt: skip
    cases.append(
        Case(
            "model forward (deit)",
            "other image size, fixed-size model",
            lambda tmp: _small("agent_deit_tiny_patch16_224")(_t(1, 3, 40, 40)),
            ValueError,
            r"40",
        )
    )
    return cases


CASES = [
    *_op_cases("ops.agent_attention", agent_attention),
    *_op_cases("ops.naive.agent_attention", naive.agent_attention),
    *_linear_cases(),
    *_layer_cases(),
    *_model_cases(),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input(case, tmp_path):
    check_case(case, tmp_path)
