"""Byte corpora, splits, the KJV extraction and bits-per-byte evaluation."""

from __future__ import annotations

import shutil

import pytest
import torch

from agentattn.lm import AgentLM, AgentLMConfig
from agentattn.lm import data as lm_data
from agentattn.lm.data import ByteCorpus, eval_windows, load_text_bytes, random_batch
from agentattn.lm.train import LMTrainConfig, evaluate_bpb


def test_textfile_split_is_contiguous_90_5_5(tmp_path):
    text = ("In the beginning God created the heaven and the earth. " * 40).encode()
    path = tmp_path / "t.txt"
    path.write_bytes(text)
    corpus = ByteCorpus.load(f"textfile:{path}")
    n = len(text)
    assert corpus.train.numel() == int(0.9 * n) and corpus.val.numel() == int(0.95 * n) - int(0.9 * n)
    joined = torch.cat([corpus.train, corpus.val, corpus.test])
    assert bytes(joined.tolist()) == text


def test_bad_data_specs(tmp_path):
    with pytest.raises(ValueError, match="'kjv' or 'textfile:PATH'"):
        load_text_bytes("wikitext")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_bytes(f"textfile:{tmp_path / 'missing.txt'}")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text_bytes(f"textfile:{tmp_path / 'bin.txt'}")
    (tmp_path / "tiny.txt").write_bytes(b"abc")
    with pytest.raises(ValueError, match="too small"):
        ByteCorpus.load(f"textfile:{tmp_path / 'tiny.txt'}")


def test_missing_bible_program_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_data.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="bible-kjv"):
        load_text_bytes("kjv", cache_dir=tmp_path)


def test_kjv_cache_is_used_without_the_program(tmp_path, monkeypatch):
    (tmp_path / "kjv.txt").write_bytes(b"cached text " * 10)
    monkeypatch.setattr(lm_data.shutil, "which", lambda name: None)
    assert load_text_bytes("kjv", cache_dir=tmp_path) == b"cached text " * 10


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian package bible-kjv not installed")
def test_kjv_extraction(tmp_path):
    text = load_text_bytes("kjv", cache_dir=tmp_path)
    assert b"In the beginning God created the heaven and the earth." in text[:200]
    assert b"The grace of our Lord Jesus Christ be with you all. Amen." in text[-200:]
    assert (tmp_path / "kjv.txt").read_bytes() == text


def test_batches_and_eval_windows():
    tokens = torch.arange(100, dtype=torch.uint8)
    x, y = random_batch(tokens, 4, 10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 10) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])
    windows = eval_windows(tokens, 30)
    targets = torch.cat([w[1] for w in windows])
    assert torch.equal(targets, tokens[1:].long())  # every byte after the first predicted exactly once


def test_uniform_model_scores_8_bits_per_byte():
    model = AgentLM(AgentLMConfig(attn_type="linear", d_model=16, n_layers=1, n_heads=2, max_seq_len=32))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    tokens = torch.randint(0, 256, (301,), dtype=torch.uint8)
    assert evaluate_bpb(model, tokens, 32, batch_size=3) == pytest.approx(8.0, abs=1e-6)


def test_train_config_schedule():
    cfg = LMTrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = cfg.scheduler(optimizer)  # timm's CosineLRScheduler

    def lr_at(step: int) -> float:
        scheduler.step_update(step)
        return optimizer.param_groups[0]["lr"]

    assert (
        lr_at(0) == pytest.approx(0.1) and lr_at(5) == pytest.approx(0.55) and lr_at(10) == pytest.approx(1.0)
    )
    assert lr_at(55) == pytest.approx(0.55) and lr_at(99) == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        LMTrainConfig(steps=0)
