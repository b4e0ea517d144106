"""Checkpoints (torch.distributed.checkpoint files): exact resume, resharding N -> M ranks across
ZeRO stages and tensor-parallel sizes, consolidation, atomicity."""

from __future__ import annotations

import subprocess

import pytest
import torch

import dsc
from dsc.runtime import checkpoint as ckpt

from helpers import ROOT, TESTS, dsc_cmd, dsc_run
from models import dataset, gpt, gpt_batch, hf_llama


def worker(tmp_path, world, name, *args):
    out = tmp_path / f"{name}.pt"
    dsc_run(world, TESTS / "ckpt_worker.py", *args, "--out", str(out))
    return torch.load(out, weights_only=False)


def assert_close(got: dict, ref: dict, rtol: float = 1e-5) -> None:
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        err, scale = float((got[k] - v).double().norm()), float(v.double().norm())
        assert err <= rtol * scale + 1e-7, f"{k}: |diff| {err:.3g} vs |ref| {scale:.3g}"


@pytest.mark.slow
def test_save_on_2_resume_exactly_and_reshard_to_1_and_4(tmp_path):
    """Train 2 steps on 2 ranks (ZeRO-2), save; resume for 2 more steps on 2 ranks (exactly equal to
    an uninterrupted 4-step run), on 1 rank under ZeRO-3 and on 4 ranks under ZeRO-1 (equal within
    fp32 tolerance: other reduction orders). Llama has no biases whose gradient is pure noise."""
    ck = tmp_path / "ck"
    full = worker(tmp_path, 2, "full", "--stage", "2", "--steps", "4", "--save", str(ck), "--save-after", "2")
    same = worker(tmp_path, 2, "same", "--stage", "2", "--start", "2", "--steps", "2", "--load", str(ck))
    for k, v in full["state"].items():
        assert torch.equal(same["state"][k], v), f"resume on the same layout is not exact: {k}"
    assert same["lr"] == full["lr"] and same["steps"] == full["steps"] == 4
    for world, stage in ((1, 3), (4, 1)):
        got = worker(tmp_path, world, f"ws{world}", "--stage", str(stage), "--start", "2", "--steps", "2",
                     "--load", str(ck))
        assert_close(got["state"], full["state"])
        assert got["lr"] == full["lr"]

    # consolidate: one plain state_dict that a fresh model loads strictly
    out = tmp_path / "model.pt"
    proc = subprocess.run([*dsc_cmd(), "checkpoint", "consolidate", str(ck), str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    model = hf_llama()
    model.load_state_dict(torch.load(out))
    assert_close(model.state_dict(), full["saved"], rtol=0)  # exactly what was saved

    # the shards are torch.distributed.checkpoint's: ZeRO-2 chunks cut parameters, so a parameter
    # has pieces from both ranks, and plain DCP reads it whole without dsc
    import json

    import torch.distributed.checkpoint as dcp

    folder = ck / (ck / "latest").read_text().strip()
    meta = json.loads((folder / "meta.json").read_text())
    index = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    pieces = {n: len(index[f"param/{n}"].chunks) for n in meta["params"]}
    assert set(pieces.values()) == {1, 2}, pieces
    name = max(pieces, key=pieces.get)
    t = torch.empty(meta["params"][name]["numel"])
    dcp.load({f"param/{name}": t}, checkpoint_id=folder, no_dist=True)
    alias = next(k for k, v in meta["aliases"].items() if v == name)
    assert torch.equal(t.view(meta["params"][name]["shape"]), model.state_dict()[alias])


@pytest.mark.slow
def test_tensor_parallel_checkpoint_resumes_and_reshards_across_tp_and_dp(tmp_path):
    """Save on tp=2 (Llama, vocabulary 97 padded to 98 per tp slice); resume exactly on tp=2, and
    within fp32 tolerance on 1 rank (no tp) and on tp=2 x dp=2 under ZeRO-3; consolidate."""
    ck, v = tmp_path / "ck", ("--vocab", "97")
    full = worker(tmp_path, 2, "full", "--stage", "1", "--tp", "2", "--steps", "4", "--save", str(ck),
                  "--save-after", "2", *v)
    same = worker(tmp_path, 2, "same", "--stage", "1", "--tp", "2", "--start", "2", "--steps", "2",
                  "--load", str(ck), *v)
    for k, t in full["state"].items():
        assert torch.equal(same["state"][k], t), f"tp resume on the same layout is not exact: {k}"
    for world, stage, tp in ((1, 0, 1), (4, 3, 2)):
        got = worker(tmp_path, world, f"tp{tp}ws{world}", "--stage", str(stage), "--tp", str(tp), "--start", "2",
                     "--steps", "2", "--load", str(ck), *v)
        assert_close(got["state"], full["state"])
    out = tmp_path / "model.pt"
    proc = subprocess.run([*dsc_cmd(), "checkpoint", "consolidate", str(ck), str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import models
    models.set_vocab(97)
    model = hf_llama()
    model.load_state_dict(torch.load(out))  # whole tensors: tp slices joined, padding dropped
    assert model.lm_head.weight.shape[0] == 97


def test_crash_during_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model = gpt()
    (x, y), _ = gpt_batch(dataset(1, 2))
    plan = {"zero": {"stage": 1}, "optimizer": {"type": "adamw", "lr": 1e-2}}
    compiled = dsc.compile(model, plan, example_inputs=(x, y))
    compiled.backward(compiled(x, y))
    compiled.step()
    compiled.save_checkpoint(tmp_path, tag="good")
    good = compiled.full_state_dict()
    compiled.backward(compiled(x, y))
    compiled.step()

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "_write_shards", crash)
    with pytest.raises(OSError, match="simulated"):
        compiled.save_checkpoint(tmp_path, tag="bad")
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "good"
    assert not (tmp_path / "bad").exists()
    fresh = dsc.compile(gpt(), plan, example_inputs=(x, y))
    fresh.load_checkpoint(tmp_path)
    for k, v in good.items():
        assert torch.equal(fresh.full_state_dict()[k], v)
    assert fresh.global_steps == 1


def test_loading_into_a_different_model_names_the_mismatch(tmp_path):
    (x, y), _ = gpt_batch(dataset(1, 2))
    plan = {"zero": {"stage": 2}, "optimizer": {"type": "adamw"}}
    dsc.compile(gpt(), plan, example_inputs=(x, y)).save_checkpoint(tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    compiled = dsc.compile(other, plan, example_inputs=(torch.randn(2, 3),))
    with pytest.raises(ValueError, match="does not match this model"):
        compiled.load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no 'latest'"):
        compiled.load_checkpoint(tmp_path / "nothing")


@pytest.mark.slow
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    ck, good = tmp_path / "ck", tmp_path / "good.pt"
    proc = subprocess.run([*dsc_cmd(), "run", "--nproc", "2", str(TESTS / "kill_save_worker.py"), str(ck), str(good)],
                          capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert proc.returncode != 0, "the worker was supposed to be killed"
    assert (ck / "latest").read_text().strip() == "good"
    assert not (ck / "bad").exists()
    (x, y), _ = gpt_batch(dataset(1, 2))
    fresh = dsc.compile(gpt(), {"zero": {"stage": 2}, "optimizer": {"type": "adamw", "lr": 1e-2}},
                        example_inputs=(x, y))
    fresh.load_checkpoint(ck)
    expected = torch.load(good)
    for k, v in expected.items():
        assert torch.equal(fresh.full_state_dict()[k], v), k
