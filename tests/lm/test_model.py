"""AgentLM: shapes, twins' parity, decoding against the parallel forward, generate, causality, I/O, bad input."""

from __future__ import annotations

import pytest
import torch

from agentattn.lm import ATTN_TYPES, AgentLM, AgentLMConfig, state_nbytes
from tests.conftest import assert_close_rel


def _tiny(attn_type: str, **kw) -> AgentLM:
    cfg = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, agent_num=4, chunk_size=8)
    cfg.update(kw)
    torch.manual_seed(0)
    model = AgentLM(AgentLMConfig(attn_type=attn_type, **cfg)).eval()
    # make the agent prior non-trivial (random decay and read bias), as after training
    for name, p in model.named_parameters():
        if name.endswith(("agent_bias", "log_decay")):
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.5)
    return model


def test_config_defaults_and_validation():
    cfg = AgentLMConfig(attn_type="agent")
    assert cfg.vocab_size == 256 and cfg.d_model > 0 and cfg.max_seq_len > 0
    with pytest.raises(TypeError):
        AgentLMConfig()  # attn_type has no default
    with pytest.raises(ValueError, match="attn_type must be one of"):
        AgentLMConfig(attn_type="flash")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        AgentLMConfig(attn_type="softmax", d_model=30, n_heads=4)


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_forward_shape(attn_type):
    model = _tiny(attn_type)
    logits = model(torch.randint(0, 256, (2, 19)))
    assert logits.shape == (2, 19, 256) and logits.dtype == torch.float32


def test_twins_have_equal_params_and_shared_init():
    models = {}
    for t in ATTN_TYPES:
        torch.manual_seed(3)
        models[t] = AgentLM(AgentLMConfig(attn_type=t))
    params = {t: m.num_params() for t, m in models.items()}
    assert params["softmax"] == params["linear"]
    assert abs(params["agent"] - params["softmax"]) / params["softmax"] <= 0.02
    soft = models["softmax"].state_dict()
    for t in ("agent", "linear"):
        other = models[t].state_dict()
        assert all(torch.equal(soft[k], other[k]) for k in soft), f"{t} twin starts from other shared weights"


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("prompt_len", [1, 19])
@pytest.mark.parametrize(
    "extra",
    [{}, {"conv_kernel": 0}, {"positions": "none"}, {"window_positions": "none"}],
    ids=["default", "no-conv", "nope", "window-none"],
)
def test_decode_matches_parallel_forward(attn_type, prompt_len, extra):
    model = _tiny(attn_type, **extra)
    idx = torch.randint(0, 256, (2, 38))
    with torch.no_grad():
        ref = model(idx)  # (B, T, V)
        logits, states = model.prefill(idx[:, :prompt_len], capacity=38)
        outs = [logits]
        for t in range(prompt_len, 38):
            outs.append(model.step(idx[:, t], states))
    got = torch.stack(outs, dim=1)  # logits for positions prompt_len - 1 .. 49
    assert_close_rel(got, ref[:, prompt_len - 1 :], 1e-5, f"{attn_type} decode vs parallel")


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_greedy_generate_equals_repeated_argmax(attn_type):
    model = _tiny(attn_type, max_seq_len=48)
    prompt = torch.randint(0, 256, (2, 9))
    out = model.generate(prompt, max_new_tokens=24, temperature=0.0)
    seq = prompt
    with torch.no_grad():
        for _ in range(24):
            nxt = model(seq)[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(out, seq)


def test_softmax_generate_past_max_seq_len_crops_context():
    model = _tiny("softmax", max_seq_len=16)
    prompt = torch.randint(0, 256, (1, 10))
    out = model.generate(prompt, max_new_tokens=12)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq[:, -16:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_generate_streams_and_samples():
    model = _tiny("agent")
    seen = []
    gen = torch.Generator().manual_seed(0)
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=1.0, top_k=5, generator=gen,
                         callback=lambda tok: seen.append(int(tok[0])))  # fmt: skip
    assert out.shape == (1, 8) and seen == out[0, 3:].tolist()


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_model_causality_bit_identical(attn_type):
    model = _tiny(attn_type)
    idx = torch.randint(0, 256, (2, 40))
    idx2 = idx.clone()
    idx2[:, 21:] = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    assert torch.equal(a[:, :21], b[:, :21])


@pytest.mark.parametrize("attn_type", ["agent", "linear"])
def test_decode_state_size_does_not_depend_on_length(attn_type):
    model = _tiny(attn_type, max_seq_len=200)
    sizes = set()
    for T in (3, 40, 200):
        _, states = model.prefill(torch.randint(0, 256, (1, T)))
        model.step(torch.zeros(1, dtype=torch.long), states)
        sizes.add(state_nbytes(states))
    assert len(sizes) == 1
    _, kv_short = _tiny("softmax", max_seq_len=200).prefill(torch.randint(0, 256, (1, 3)))
    _, kv_long = _tiny("softmax", max_seq_len=200).prefill(torch.randint(0, 256, (1, 200)))
    assert state_nbytes(kv_long) > state_nbytes(kv_short)  # the KV cache does grow


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_save_load_roundtrip(attn_type, tmp_path):
    model = _tiny(attn_type)
    path = tmp_path / "m.safetensors"
    model.save(path)
    loaded = AgentLM.load(path).eval()
    assert loaded.config == model.config
    idx = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))


def test_agent_num_keeps_its_old_name(tmp_path):
    """agent_num is the vision name; num_agents (the LM's old name) still works where users could rely on it."""
    assert AgentLMConfig("agent", num_agents=8).agent_num == 8
    assert AgentLMConfig("agent", agent_num=8).num_agents == 8  # reads the field
    assert AgentLMConfig.from_dict({"attn_type": "agent", "num_agents": 4}).agent_num == 4
    with pytest.raises(ValueError, match="agent_num \\(4\\) and its old name num_agents \\(8\\) differ"):
        AgentLMConfig("agent", agent_num=4, num_agents=8)
    # a file saved before the rename and before window_positions: num_agents, and no window_positions
    import json

    from safetensors.torch import load_file, safe_open, save_file

    model = _tiny("agent", agent_num=3, window_positions="none")
    model.save(tmp_path / "new.safetensors")
    with safe_open(tmp_path / "new.safetensors", "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    config["num_agents"] = config.pop("agent_num")
    del config["window_positions"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(tmp_path / "new.safetensors"), old, metadata={**meta, "config": json.dumps(config)})
    loaded = AgentLM.load(old).eval()
    assert loaded.config == model.config  # window_positions "none": the model it was trained as
    idx = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an agentattn LM checkpoint"):
        AgentLM.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        AgentLM.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        AgentLM.load(tmp_path / "missing.safetensors")


def test_bad_input():
    model = _tiny("agent", max_seq_len=16)
    with pytest.raises(ValueError, match="more than max_seq_len = 16"):
        model.generate(torch.zeros(1, 17, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="more than max_seq_len = 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match=r"int64 \(torch.long\)"):
        model(torch.zeros(1, 4))
    with pytest.raises(TypeError, match=r"int64 \(torch.long\)"):
        model.generate(torch.zeros(1, 4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="is on meta but the model is on cpu"):
        model(torch.zeros(1, 4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside \[0, 256\)"):
        model(torch.full((1, 4), 256))
    with pytest.raises(ValueError, match="at least one token"):
        model.prefill(torch.zeros(1, 0, dtype=torch.long))


def test_rotary_scores_depend_on_the_offset_only():
    from agentattn.lm.model import rotate

    q, k = torch.randn(1, 2, 1, 16, dtype=torch.float64), torch.randn(1, 2, 1, 16, dtype=torch.float64)
    score = lambda s, t: (rotate(q, s, 10000.0) * rotate(k, t, 10000.0)).sum().item()  # noqa: E731
    assert score(5, 2) == pytest.approx(score(103, 100), rel=1e-6)  # angles are computed in fp32
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_positions_and_conv_options():
    rope, nope = _tiny("softmax"), _tiny("softmax", positions="none")
    assert rope.config.positions == "rope"  # Transformer++ is the softmax default
    idx = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert not torch.allclose(rope(idx), nope(idx))  # same weights, positions change the scores
    for t in ATTN_TYPES:  # the causal conv is an option of every mixer
        assert (_tiny(t).blocks[0].attn.dwc is None) is False
        assert _tiny(t, conv_kernel=0).blocks[0].attn.dwc is None
    with pytest.raises(ValueError, match="positions must be one of"):
        AgentLMConfig(attn_type="softmax", positions="alibi")
    with pytest.raises(ValueError, match="even head dim"):
        AgentLMConfig(attn_type="softmax", d_model=12, n_heads=4)
    with pytest.raises(ValueError, match="window_positions must be one of"):
        AgentLMConfig(attn_type="agent", window_positions="alibi")
    with pytest.raises(ValueError, match="even head dim"):
        AgentLMConfig(attn_type="agent", d_model=12, n_heads=4, window_positions="rope")


def test_agent_window_positions_change_only_the_window_logits():
    plain, rope = _tiny("agent", window_positions="none"), _tiny("agent")
    assert rope.config.window_positions == "rope"  # the default since the ablation (see the README)
    assert plain.state_dict().keys() == rope.state_dict().keys()  # no new parameters
    idx = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert not torch.allclose(plain(idx), rope(idx))


def test_twins_with_and_without_the_conv_share_their_other_weights():
    torch.manual_seed(7)
    with_conv = AgentLM(AgentLMConfig(attn_type="softmax")).state_dict()
    torch.manual_seed(7)
    without = AgentLM(AgentLMConfig(attn_type="retention", conv_kernel=0)).state_dict()
    shared = [k for k in without if k in with_conv]
    assert len(shared) > 10 and all(torch.equal(with_conv[k], without[k]) for k in shared)
