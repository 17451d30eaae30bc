"""The Hugging Face API: AutoModelForCausalLM round trip, generate() against AgentLM.generate, loss, refusals."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM

from agentattn.lm import ATTN_TYPES, AgentLM, AgentLMConfig
from agentattn.lm.hf import AgentLMForCausalLM, AgentLMHFConfig

TINY = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=24, agent_num=4, chunk_size=8)


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_auto_model_round_trip_and_greedy_generate_equals_agentlm(attn_type, tmp_path):
    torch.manual_seed(0)
    lm = AgentLM(AgentLMConfig(attn_type=attn_type, **TINY)).eval()
    AgentLMForCausalLM.from_lm(lm).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, AgentLMForCausalLM) and loaded.config.to_lm_config() == lm.config
    for key, value in lm.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    prompt = torch.randint(0, 256, (2, 9))
    # 9 + 30 tokens pass max_seq_len = 24: the softmax twin crops and re-reads, as AgentLM.generate does
    expected = lm.generate(prompt, 30, temperature=0.0)
    got = loaded.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


def test_forward_loss_and_config():
    config = AgentLMHFConfig(attn_type="softmax", **TINY)
    assert AutoConfig.for_model("agentattn_lm").model_type == config.model_type == "agentattn_lm"
    model = AgentLMForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 16))
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert out.logits.shape == (2, 16, 256) and torch.allclose(out.loss, expected)
    assert torch.equal(out.logits, model.model(ids))


def test_config_json_with_the_old_agent_count_name_loads(tmp_path):
    import json

    AgentLMHFConfig(attn_type="agent", **TINY).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    values = json.loads(path.read_text())
    values["num_agents"] = values.pop("agent_num")
    del values["window_positions"]  # written before the option existed
    path.write_text(json.dumps(values))
    loaded = AgentLMHFConfig.from_pretrained(tmp_path)
    assert loaded.agent_num == TINY["agent_num"] and not hasattr(loaded, "num_agents")
    assert loaded.window_positions == "none" and AgentLMHFConfig(attn_type="agent").window_positions == "rope"


def test_refusals():
    with pytest.raises(ValueError, match="attn_type must be one of"):
        AgentLMHFConfig(attn_type="flash")
    with pytest.raises(ValueError, match="d_model"):
        AgentLMHFConfig(attn_type="agent", d_model=30, n_heads=4)
    model = AgentLMForCausalLM(AgentLMHFConfig(attn_type="agent", **TINY))
    ids = torch.randint(0, 256, (2, 8))
    with pytest.raises(ValueError, match="padding is not supported"):
        model(ids, attention_mask=torch.tensor([[1] * 8, [0] + [1] * 7]))
