"""dsc.runtime.lr_schedules against DeepSpeed's deepspeed/runtime/lr_schedules.py semantics."""

import math
import types

import pytest
import torch

from dsc.runtime.lr_schedules import WarmupCosineLR, WarmupDecayLR, WarmupLR, build_scheduler


# --- independent literal transcription of DeepSpeed's formulas (deepspeedai/DeepSpeed,
# deepspeed/runtime/lr_schedules.py). `it` is last_batch_iteration; returns per-group LRs.
def ds_reference(kind, it, org_lrs, total_num_steps=None, warmup_min_lr=0.0, warmup_max_lr=0.001,
                 warmup_num_steps=1000, warmup_type="log", warmup_min_ratio=0.0, cos_min_ratio=0.0001):
    n = len(org_lrs)
    warmup_num_steps = max(2, warmup_num_steps)
    inverse_log_warm_up = 1.0 / math.log(warmup_num_steps)
    if kind == "WarmupCosineLR":
        if it < 0:
            return [0.0 for _ in org_lrs]
        if it < warmup_num_steps:
            if warmup_type == "log":
                ratio = inverse_log_warm_up * math.log(it + 1)
            else:
                ratio = it / warmup_num_steps
            ratio = warmup_min_ratio + ratio * (1. - warmup_min_ratio)
        else:
            real_last_step = it - warmup_num_steps + 1
            real_total_steps = max(1, total_num_steps - warmup_num_steps)
            cosine_progress = min(1.0, real_last_step / real_total_steps)
            ratio = (1 + math.cos(math.pi * cosine_progress)) / 2
            ratio = max(0.0, cos_min_ratio + (1. - cos_min_ratio) * ratio)
        return [org_lr * ratio for org_lr in org_lrs]
    min_lrs = list(warmup_min_lr) if isinstance(warmup_min_lr, (list, tuple)) else [warmup_min_lr] * n
    max_lrs = list(warmup_max_lr) if isinstance(warmup_max_lr, (list, tuple)) else [warmup_max_lr] * n
    if it < 0:
        return min_lrs
    if it < warmup_num_steps:
        if warmup_type == "log":
            gamma = inverse_log_warm_up * math.log(it + 1)
        else:
            gamma = it / warmup_num_steps
    elif kind == "WarmupLR":
        gamma = 1.0
    else:
        gamma = max(0.0, float(total_num_steps - it) / float(max(1.0, total_num_steps - warmup_num_steps)))
    return [lo + (hi - lo) * gamma for lo, hi in zip(min_lrs, max_lrs)]


def make_opt(lrs=(0.1,)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def lrs(opt):
    return [g["lr"] for g in opt.param_groups]


def make(kind, opt, **kw):
    return {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR}[kind](opt, **kw)


CASES = [
    ("WarmupLR", dict(warmup_min_lr=0.0, warmup_max_lr=0.01, warmup_num_steps=10, warmup_type="log")),
    ("WarmupLR", dict(warmup_min_lr=[1e-4, 2e-4], warmup_max_lr=[0.01, 0.05], warmup_num_steps=10,
                      warmup_type="linear")),
    ("WarmupDecayLR", dict(total_num_steps=30, warmup_min_lr=1e-4, warmup_max_lr=0.01, warmup_num_steps=10,
                           warmup_type="log")),
    ("WarmupDecayLR", dict(total_num_steps=30, warmup_min_lr=0.0, warmup_max_lr=0.01, warmup_num_steps=10,
                           warmup_type="linear")),
    ("WarmupCosineLR", dict(total_num_steps=30, warmup_min_ratio=0.1, warmup_num_steps=10, cos_min_ratio=0.01,
                            warmup_type="log")),
    ("WarmupCosineLR", dict(total_num_steps=30, warmup_min_ratio=0.0, warmup_num_steps=10, cos_min_ratio=0.05,
                            warmup_type="linear")),
]


@pytest.mark.parametrize("kind,kw", CASES)
def test_matches_reference_every_step(kind, kw):
    org = [0.1, 0.3]
    opt = make_opt(org)
    sched = make(kind, opt, **kw)
    # construction: iteration -1 value, not advanced
    assert sched.last_batch_iteration == -1
    assert lrs(opt) == ds_reference(kind, -1, org, **kw)
    assert sched.get_last_lr() == lrs(opt)
    seen = {}
    for it in range(45):  # step 0, warmup boundary (9/10), mid-decay, total (30) and beyond
        sched.step()
        assert sched.last_batch_iteration == it
        expected = ds_reference(kind, it, org, **kw)
        assert lrs(opt) == expected, (it, lrs(opt), expected)
        assert sched.get_last_lr() == expected
        seen[it] = expected
    assert seen[0] == ds_reference(kind, 0, org, **kw)


def test_key_values():
    opt = make_opt()
    s = WarmupLR(opt, warmup_min_lr=0.001, warmup_max_lr=0.01, warmup_num_steps=10)
    assert lrs(opt) == [0.001]  # construction == min lr == step-0 value (log(1) == 0)
    s.step()
    assert lrs(opt) == [0.001]
    s.step(9)
    assert lrs(opt)[0] == pytest.approx(0.01)  # log(10)/log(10) == 1 at warmup_num_steps - 1
    s.step(500)
    assert lrs(opt) == [0.001 + (0.01 - 0.001) * 1.0]  # min + delta * gamma, not max_lr itself

    opt = make_opt()
    s = WarmupDecayLR(opt, total_num_steps=20, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=10,
                      warmup_type="linear")
    s.step(9)
    assert lrs(opt)[0] == pytest.approx(0.9)  # linear warmup never reaches 1 inside warmup
    s.step(10)
    assert lrs(opt) == [1.0]
    s.step(15)
    assert lrs(opt) == [0.5]
    s.step(20)
    assert lrs(opt) == [0.0]
    s.step(25)
    assert lrs(opt) == [0.0]

    opt = make_opt([0.2, 0.4])
    s = WarmupCosineLR(opt, total_num_steps=20, warmup_min_ratio=0.5, warmup_num_steps=10, cos_min_ratio=0.1)
    assert lrs(opt) == [0.0, 0.0]  # DeepSpeed writes 0.0 at construction, not the step-0 value
    s.step()
    assert lrs(opt) == [0.1, 0.2]  # step 0: warmup_min_ratio * org_lr
    s.step(19)  # cosine floor is reached at total_num_steps - 1
    assert lrs(opt) == pytest.approx([0.02, 0.04])
    s.step(100)
    assert lrs(opt) == pytest.approx([0.02, 0.04])  # clamped, no cosine wrap-around
    assert s.org_lrs == [0.2, 0.4]


def test_warmup_num_steps_clamped_and_validated():
    opt = make_opt()
    s = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=1)
    assert s.warmup_num_steps == 2
    s.step()
    s.step()
    assert lrs(opt) == [1.0 / math.log(2) * math.log(2)]
    for bad in (0, -3, 10.0, None):
        with pytest.raises(ValueError):
            WarmupLR(make_opt(), warmup_num_steps=bad)
        with pytest.raises(ValueError):
            WarmupCosineLR(make_opt(), total_num_steps=100, warmup_num_steps=bad)
    with pytest.raises(ValueError):
        WarmupLR(make_opt([0.1, 0.2]), warmup_max_lr=[0.1, 0.2, 0.3])


def test_unknown_type_falls_back_to_log_and_short_total_only_warns(caplog):
    with caplog.at_level("WARNING"):
        s = WarmupLR(make_opt(), warmup_type="cosine")
    assert s.warmup_type == "log" and "unknown warmup_type" in caplog.text

    # total_num_steps < warmup_num_steps: DeepSpeed warns, does not raise
    org = [0.1, 0.3]
    kw = dict(total_num_steps=5, warmup_num_steps=10, warmup_min_ratio=0.0, cos_min_ratio=0.01)
    opt = make_opt(org)
    caplog.clear()
    with caplog.at_level("WARNING"):
        s = WarmupCosineLR(opt, **kw)
    assert "less than warmup_num_steps" in caplog.text
    for it in range(15):
        s.step()
        assert lrs(opt) == ds_reference("WarmupCosineLR", it, org, **kw)
    assert lrs(opt) == pytest.approx([0.001, 0.003])  # sits at the floor after warmup

    with caplog.at_level("WARNING"):
        WarmupDecayLR(make_opt(), total_num_steps=5, warmup_num_steps=10)


def test_warmup_max_lr_none_uses_each_group_lr():
    opt = make_opt([0.1, 0.2])
    s = WarmupLR(opt, warmup_max_lr=None, warmup_num_steps=10)
    assert s.max_lrs == [0.1, 0.2]
    s.step(50)
    assert lrs(opt) == [0.1, 0.2]


@pytest.mark.parametrize("kind,kw", CASES)
def test_state_dict_resume(kind, kw):
    org = [0.1, 0.3]
    opt = make_opt(org)
    s = make(kind, opt, **kw)
    for _ in range(12):
        s.step()
    sd = s.state_dict()
    assert sd == {"last_batch_iteration": 11}
    tail = []
    for _ in range(25):
        s.step()
        tail.append(lrs(opt))

    opt2 = make_opt(org)
    s2 = make(kind, opt2, **kw)
    s2.load_state_dict(sd)
    assert s2.last_batch_iteration == 11 and s2.last_epoch == 11
    tail2 = []
    for _ in range(25):
        s2.step()
        tail2.append(lrs(opt2))
    assert tail2 == tail

    # DeepSpeed's constructor argument: resume without touching the optimizer's lrs
    opt3 = make_opt(org)
    s3 = make(kind, opt3, last_batch_iteration=11, **kw)
    assert lrs(opt3) == org
    s3.step()
    assert lrs(opt3) == tail[0]


def test_torch_tooling_and_tensor_lr():
    opt = make_opt()
    s = WarmupLR(opt, warmup_max_lr=0.01, warmup_num_steps=10)
    assert isinstance(s, torch.optim.lr_scheduler.LRScheduler)
    opt.step()
    s.step()
    assert s.get_last_lr() == lrs(opt)

    p = torch.nn.Parameter(torch.zeros(1))
    topt = torch.optim.Adam([p], lr=torch.tensor(0.1))
    ts = WarmupCosineLR(topt, total_num_steps=20, warmup_min_ratio=0.5, warmup_num_steps=10)
    lr_tensor = topt.param_groups[0]["lr"]
    ts.step()
    assert topt.param_groups[0]["lr"] is lr_tensor  # updated in place
    assert lr_tensor.item() == pytest.approx(0.05)


def test_build_scheduler():
    opt = make_opt([0.1, 0.2])
    spec = types.SimpleNamespace(type="WarmupCosineLR", warmup_min_lr=0.0, warmup_max_lr=0.001, warmup_num_steps=10,
                                 warmup_type="linear", total_num_steps=40, warmup_min_ratio=0.1, cos_min_ratio=0.2)
    s = build_scheduler(opt, spec)
    assert isinstance(s, WarmupCosineLR) and s.cos_min_ratio == 0.2 and s.warmup_type == "linear"
    spec.type = "WarmupDecayLR"
    s = build_scheduler(make_opt(), spec)
    assert isinstance(s, WarmupDecayLR) and s.total_num_steps == 40 and s.max_lrs == [0.001]
    spec.type = "WarmupLR"
    s = build_scheduler(make_opt(), spec)
    assert type(s) is WarmupLR and s.warmup_num_steps == 10
    spec.type = "OneCycle"
    with pytest.raises(ValueError, match="WarmupLR, WarmupDecayLR, WarmupCosineLR"):
        build_scheduler(make_opt(), spec)
    with pytest.raises(ValueError, match="total_num_steps"):
        build_scheduler(make_opt(), types.SimpleNamespace(type="WarmupDecayLR", total_num_steps=None))


def test_against_deepspeed_if_installed():
    ds = pytest.importorskip("deepspeed.runtime.lr_schedules")
    for kind, kw in CASES:
        ours_opt, ref_opt = make_opt([0.1, 0.3]), make_opt([0.1, 0.3])
        ours, ref = make(kind, ours_opt, **kw), getattr(ds, kind)(ref_opt, **kw)
        assert lrs(ours_opt) == pytest.approx(lrs(ref_opt))
        for _ in range(45):
            ours.step()
            ref.step()
            assert lrs(ours_opt) == pytest.approx(lrs(ref_opt))
        assert ours.state_dict() == ref.state_dict()
