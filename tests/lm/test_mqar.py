"""MQAR (Zoology's multi-query associative recall): the generator's structure, the training pipeline, the command."""

from __future__ import annotations

import json

import pytest
import torch

from agentattn.cli.main import main
from agentattn.lm.mqar import IGNORE, MQARConfig, mqar_batch, train_mqar


def test_batches_hold_pairs_then_each_key_queried_once():
    gen = torch.Generator().manual_seed(0)
    inputs, labels = mqar_batch(8, 64, 6, 128, gen)
    assert inputs.shape == labels.shape == (8, 64)
    for x, y in zip(inputs, labels, strict=True):
        keys, values = x[0:12:2], x[1:12:2]
        assert (
            len(set(keys.tolist())) == 6
            and all(0 < k < 64 for k in keys)
            and all(64 <= v < 128 for v in values)
        )
        pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
        asked = (y != IGNORE).nonzero().flatten().tolist()
        assert len(asked) == 6 and all(p >= 12 for p in asked)
        assert sorted(x[asked].tolist()) == sorted(keys.tolist())  # every key queried once
        for p in asked:
            assert y[p] == pairs[int(x[p])] == x[p + 1]  # the label is the key's value, the next token
        rest = [p for p in range(12, 64) if p not in asked and p - 1 not in asked]
        assert (x[rest] == 0).all()  # filler


@pytest.mark.parametrize("seq_len, pairs, vocab, match", [(20, 6, 128, "seq_len must be >= 4·num_pairs = 24"),
                                                          (64, 40, 64, "num_pairs must be in")])  # fmt: skip
def test_bad_sizes(seq_len, pairs, vocab, match):
    with pytest.raises(ValueError, match=match):
        mqar_batch(2, seq_len, pairs, vocab, torch.Generator())


def test_a_model_learns_the_one_pair_task():
    """One pair: the answer is always the token at position 1. Learning it checks the pipeline (labels at the query
    positions, the loss, the accuracy); a label one position off could not be learned."""
    config = MQARConfig(attn_type="softmax", d_model=32, n_heads=2, seq_len=8, num_pairs=1, vocab_size=16,
                        steps=200, batch_size=32, lr=3e-3, eval_examples=250)  # fmt: skip
    assert train_mqar(config)["accuracy"] > 0.95


def test_command_sweeps_mixers_and_agent_settings(tmp_path):
    args = ["lm", "mqar", "--attn", "agent", "softmax", "--d-model", "16", "32", "--steps", "2", "--seq-len", "32",
            "--pairs", "4", "--vocab-size", "64", "--eval-examples", "8", "--batch-size", "2",
            "--agents", "4x8", "2x16", "--output", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((tmp_path / "mqar.json").read_text())
    assert len(rows) == 2 * 2 + 2  # agent: two (n, C) settings × two widths; softmax: two widths
    assert {(r["model"].get("agent_num"), r["model"].get("chunk_size")) for r in rows if r["attn_type"] == "agent"} == {
        (4, 8), (2, 16)}  # fmt: skip
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert main([*args[:-2], "--agents", "4y8", "--output", str(tmp_path)]) == 1


def test_loss_on_the_queries_equals_the_full_logits_loss():
    """Training computes logits at the query positions only (``lm_head(hidden_states[asked])``): the same loss as
    the full (B, T, vocab) logits with the other positions ignored."""
    from agentattn.lm import AgentLM, AgentLMConfig

    torch.manual_seed(0)
    model = AgentLM(AgentLMConfig(attn_type="agent", vocab_size=64, d_model=32, n_layers=1, n_heads=2,
                                  max_seq_len=32, agent_num=4, chunk_size=8))  # fmt: skip
    inputs, labels = mqar_batch(4, 32, 4, 64, torch.Generator().manual_seed(1))
    full = torch.nn.functional.cross_entropy(
        model(inputs).flatten(0, 1), labels.flatten(), ignore_index=IGNORE
    )
    asked = labels != IGNORE
    sparse = torch.nn.functional.cross_entropy(
        model.lm_head(model.hidden_states(inputs)[asked]), labels[asked]
    )
    assert torch.allclose(full, sparse, rtol=1e-6, atol=1e-6)
