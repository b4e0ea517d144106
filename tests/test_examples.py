"""The examples run as the README says, and what they save loads into a plain model."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from helpers import ROOT, dsc_run

sys.path.insert(0, str(ROOT / "examples"))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["plan.json", "ds_config.json"])
def test_train_example_on_two_ranks_learns_and_saves_a_loadable_state_dict(tmp_path, config):
    from gpt import build_model

    saved = tmp_path / "model.pt"
    out = dsc_run(2, ROOT / "examples" / "train.py", "--config", str(ROOT / "examples" / config),
                  "--steps", "12", "--save", str(saved))
    losses = [float(m) for m in re.findall(r"^step +\d+ +loss ([\d.]+)", out.stdout, re.M)]
    assert len(losses) == 12, out.stdout[-2000:]
    assert losses[-1] < losses[0] - 0.3, f"the example did not learn: {losses}"
    model = build_model(seed=5)
    model.load_state_dict(torch.load(saved))  # strict: every key present, shapes right
    assert "per-rank memory and communication" in out.stdout


@pytest.mark.slow
def test_zero3_bf16_example_checkpoints_on_2_ranks_and_resumes_on_4(tmp_path):
    plan, ck = str(ROOT / "examples" / "plan_zero3_bf16.json"), str(tmp_path / "ck")
    first = dsc_run(2, ROOT / "examples" / "train.py", "--config", plan, "--steps", "6", "--checkpoint", ck)
    assert "checkpoint saved" in first.stdout
    second = dsc_run(4, ROOT / "examples" / "train.py", "--config", plan, "--steps", "3", "--resume", ck)
    steps = [int(s) for s in re.findall(r"^step +(\d+) ", second.stdout, re.M)]
    assert steps == [7, 8, 9], second.stdout[-2000:]
    losses = [float(m) for m in re.findall(r"^step +\d+ +loss ([\d.]+)", first.stdout + second.stdout, re.M)]
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_tensor_parallel_example_trains_on_tp2_x_dp2_and_saves_a_plain_state_dict(tmp_path):
    from gpt import build_model

    saved = tmp_path / "model.pt"
    out = dsc_run(4, ROOT / "examples" / "train.py", "--config", str(ROOT / "examples" / "plan_tp.json"),
                  "--steps", "12", "--save", str(saved))
    assert "x dp 2 (x tp 2)" in out.stdout and "tensor-parallel modules" in out.stdout
    losses = [float(m) for m in re.findall(r"^step +\d+ +loss ([\d.]+)", out.stdout, re.M)]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.3, losses
    model = build_model(seed=5)
    model.load_state_dict(torch.load(saved))  # the padded vocabulary rows are gone
