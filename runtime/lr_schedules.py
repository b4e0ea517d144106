"""Warmup learning-rate schedules with DeepSpeed's semantics.

``WarmupLR``, ``WarmupDecayLR`` and ``WarmupCosineLR`` reproduce the classes of the
same name in DeepSpeed's ``deepspeed/runtime/lr_schedules.py`` (deepspeedai/DeepSpeed,
including the multi-group fixes of PRs #7969/#8171 and the clamped cosine tail), as
``torch.optim.lr_scheduler.LRScheduler`` subclasses:

* ``last_batch_iteration`` (an alias of torch's ``last_epoch``) starts at -1 and
  construction does *not* advance it: it writes the iteration -1 value into the
  optimizer (``warmup_min_lr`` for WarmupLR/WarmupDecayLR, ``0.0`` for WarmupCosineLR).
  Each ``step()`` then advances it by one (or sets it, if given) and writes the LR for
  that iteration, so the first ``step()`` applies iteration 0.
* ``warmup_num_steps`` must be a positive int and is clamped to at least 2; an unknown
  ``warmup_type`` falls back to ``"log"`` with a warning; ``total_num_steps <
  warmup_num_steps`` only warns.
* ``state_dict()`` is ``{"last_batch_iteration": n}``; ``load_state_dict`` restores only
  that counter (the next ``step()`` rewrites the LRs).
"""

from __future__ import annotations

import logging
import math

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "build_scheduler", "SCHEDULERS"]

logger = logging.getLogger(__name__)

WARMUP_TYPES = ("log", "linear")


def _check_warmup(warmup_num_steps, warmup_type):
    if not isinstance(warmup_num_steps, int) or warmup_num_steps <= 0:
        raise ValueError(f"warmup_num_steps must be a positive integer, got {warmup_num_steps}")
    if warmup_type not in WARMUP_TYPES:
        logger.warning("Using unknown warmup_type: %s. The increasing function is set to default (log)", warmup_type)
        warmup_type = "log"
    return max(2, warmup_num_steps), warmup_type


def _warn_short(total_num_steps, warmup_num_steps, given):
    if total_num_steps < warmup_num_steps:
        logger.warning("total_num_steps %s is less than warmup_num_steps %s", total_num_steps, given)


def warmup_gamma(it: int, warmup_num_steps: int, warmup_type: str) -> float:
    """Warmup fraction at iteration ``it < warmup_num_steps`` (0 at it=0)."""
    if warmup_type == "log":
        return (1.0 / math.log(warmup_num_steps)) * math.log(it + 1)
    return it / warmup_num_steps


def decay_gamma(it: int, warmup_num_steps: int, total_num_steps: int) -> float:
    """WarmupDecayLR's linear factor after warmup: 1 at it=warmup_num_steps, 0 from it=total_num_steps on."""
    return max(0.0, float(total_num_steps - it) / float(max(1.0, total_num_steps - warmup_num_steps)))


def cosine_ratio(it: int, warmup_num_steps: int, total_num_steps: int, cos_min_ratio: float) -> float:
    """WarmupCosineLR's ratio after warmup; reaches cos_min_ratio at it=total_num_steps-1 and stays there."""
    progress = min(1.0, (it - warmup_num_steps + 1) / max(1, total_num_steps - warmup_num_steps))
    return max(0.0, cos_min_ratio + (1.0 - cos_min_ratio) * ((1 + math.cos(math.pi * progress)) / 2))


class _DeepSpeedSchedule(LRScheduler):
    """Shared DeepSpeed-style stepping on top of torch's LRScheduler."""

    def __init__(self, optimizer, last_batch_iteration: int = -1):
        self._start = last_batch_iteration
        super().__init__(optimizer)  # calls _initial_step below
        self.last_batch_iteration = last_batch_iteration

    @property
    def last_batch_iteration(self) -> int:
        return self.last_epoch

    @last_batch_iteration.setter
    def last_batch_iteration(self, value: int) -> None:
        self.last_epoch = value

    def _initial_step(self) -> None:
        # torch's constructor would step() once (advancing to 0); DeepSpeed only writes the
        # iteration -1 value, and nothing at all when resuming (last_batch_iteration != -1).
        self._step_count = 0
        if self._start == -1:
            self._apply(self.get_lr())

    def step(self, last_batch_iteration: int | None = None) -> None:
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self._step_count += 1
        self._apply(self.get_lr())

    def _apply(self, lrs) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_batch_iteration = state_dict["last_batch_iteration"]


def _unwrap(optimizer):
    # DeepSpeed accepts wrappers exposing a torch optimizer as `.optimizer`.
    if not isinstance(optimizer, Optimizer) and isinstance(getattr(optimizer, "optimizer", None), Optimizer):
        return optimizer.optimizer
    return optimizer


def _group_lrs(optimizer):
    # plain floats, so in-place updates of tensor lrs cannot alias the stored base values
    return [float(group["lr"]) if torch.is_tensor(group["lr"]) else group["lr"] for group in optimizer.param_groups]


def _per_group(optimizer, value, name):
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"expected {n} value for {name}, got {len(value)}")
        return list(value)
    return [value] * n


class WarmupLR(_DeepSpeedSchedule):
    """min_lr -> max_lr over warmup_num_steps (log or linear), then constant max_lr.

    ``warmup_min_lr``/``warmup_max_lr`` may be per-group lists; ``warmup_max_lr=None``
    means each group's current optimizer lr (DeepSpeed's newest default).
    """

    def __init__(self, optimizer, warmup_min_lr=0.0, warmup_max_lr=0.001, warmup_num_steps: int = 1000,
                 warmup_type: str = "log", last_batch_iteration: int = -1):
        optimizer = _unwrap(optimizer)
        self.warmup_num_steps, self.warmup_type = _check_warmup(warmup_num_steps, warmup_type)
        if warmup_max_lr is None:
            warmup_max_lr = _group_lrs(optimizer)
        self.min_lrs = _per_group(optimizer, warmup_min_lr, "min_lr")
        self.max_lrs = _per_group(optimizer, warmup_max_lr, "max_lr")
        self.delta_lrs = [hi - lo for hi, lo in zip(self.max_lrs, self.min_lrs)]
        super().__init__(optimizer, last_batch_iteration)

    def _gamma(self, it: int) -> float:
        return warmup_gamma(it, self.warmup_num_steps, self.warmup_type) if it < self.warmup_num_steps else 1.0

    def get_lr(self) -> list[float]:
        it = self.last_batch_iteration
        if it < 0:
            return list(self.min_lrs)
        gamma = self._gamma(it)
        return [lo + delta * gamma for lo, delta in zip(self.min_lrs, self.delta_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay from max_lr to min_lr at total_num_steps (held there after)."""

    def __init__(self, optimizer, total_num_steps: int, warmup_min_lr=0.0, warmup_max_lr=0.001,
                 warmup_num_steps: int = 1000, warmup_type: str = "log", last_batch_iteration: int = -1):
        self.total_num_steps = total_num_steps
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_batch_iteration)
        _warn_short(total_num_steps, self.warmup_num_steps, warmup_num_steps)

    def _gamma(self, it: int) -> float:
        if it < self.warmup_num_steps:
            return warmup_gamma(it, self.warmup_num_steps, self.warmup_type)
        return decay_gamma(it, self.warmup_num_steps, self.total_num_steps)


class WarmupCosineLR(_DeepSpeedSchedule):
    """Ratio of each group's construction-time lr: warmup_min_ratio -> 1 over warmup, then cosine to cos_min_ratio."""

    def __init__(self, optimizer, total_num_steps: int, warmup_min_ratio: float = 0.0, warmup_num_steps: int = 1000,
                 cos_min_ratio: float = 0.0001, warmup_type: str = "log", last_batch_iteration: int = -1):
        optimizer = _unwrap(optimizer)
        self.warmup_num_steps, self.warmup_type = _check_warmup(warmup_num_steps, warmup_type)
        self.total_num_steps = total_num_steps
        self.warmup_min_ratio = warmup_min_ratio
        self.cos_min_ratio = cos_min_ratio
        _warn_short(total_num_steps, self.warmup_num_steps, warmup_num_steps)
        self.org_lrs = _group_lrs(optimizer)
        super().__init__(optimizer, last_batch_iteration)

    def get_lr_ratio(self) -> float:
        it = self.last_batch_iteration
        if it < 0:
            return 0.0
        if it < self.warmup_num_steps:
            gamma = warmup_gamma(it, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + gamma * (1.0 - self.warmup_min_ratio)
        return cosine_ratio(it, self.warmup_num_steps, self.total_num_steps, self.cos_min_ratio)

    def get_lr(self) -> list[float]:
        ratio = self.get_lr_ratio()
        return [org_lr * ratio for org_lr in self.org_lrs]


SCHEDULERS = {
    "WarmupLR": (WarmupLR, ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type")),
    "WarmupDecayLR": (WarmupDecayLR,
                      ("total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type")),
    "WarmupCosineLR": (WarmupCosineLR,
                       ("total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type")),
}


def build_scheduler(optimizer, spec) -> _DeepSpeedSchedule:
    """Build the scheduler named by ``spec.type`` from the attributes of ``spec`` it accepts.

    Attributes ``spec`` lacks are left at the scheduler's defaults; values (None included) are passed as-is.
    """
    kind = getattr(spec, "type", None)
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown LR scheduler type {kind!r}; expected one of {', '.join(SCHEDULERS)}")
    cls, names = SCHEDULERS[kind]
    kwargs = {name: getattr(spec, name) for name in names if hasattr(spec, name)}
    if "total_num_steps" in names and kwargs.get("total_num_steps") is None:
        raise ValueError(f"{kind} requires total_num_steps")
    return cls(optimizer, **kwargs)
