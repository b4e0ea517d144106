"""Mixed precision: autocast compute and DeepSpeed's fp16 loss scaling.

dsc keeps parameters, gradients and optimizer state in fp32 (the master weights; shards under
ZeRO-3) and runs the compiled graph under `torch.autocast`, so each op computes in the dtype eager
autocast would pick. fp16 gradients can underflow, so the loss is multiplied by a scale before
backward and the gradients divided by it before the step; `DynamicLossScaler` follows DeepSpeed's
deepspeed/runtime/fp16/loss_scaler.py: on overflow the step is skipped and, once `hysteresis`
overflows have been seen, the scale halves (never below `min_loss_scale`); after
`loss_scale_window` clean steps it doubles.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision, device_type: str):
    """The context the compiled forward runs in (a no-op for fp32)."""
    if precision.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[precision.dtype])


class StaticLossScaler:
    """A fixed scale (1 for bf16/fp32); never skips a step."""

    dynamic = False

    def __init__(self, scale: float = 1.0):
        self.cur_scale = float(scale)

    def update(self, overflow: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"cur_scale": self.cur_scale}

    def load_state_dict(self, state: dict) -> None:
        self.cur_scale = state["cur_scale"]


class DynamicLossScaler(StaticLossScaler):
    """DeepSpeed's dynamic loss scaler (update_scale semantics, scale factor 2)."""

    dynamic = True

    def __init__(self, init_scale: float, scale_window: int, min_scale: float, hysteresis: int,
                 consecutive_hysteresis: bool = False):
        super().__init__(init_scale)
        self.scale_window = scale_window
        self.min_scale = min_scale
        self.delayed_shift = hysteresis
        self.consecutive_hysteresis = consecutive_hysteresis
        self.cur_hysteresis = hysteresis
        self.cur_iter = 0
        self.last_overflow_iter = -1

    def update(self, overflow: bool) -> None:
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale:
                    raise FloatingPointError(
                        f"fp16 loss scale is already at precision.min_loss_scale ({self.min_scale}) and the "
                        "gradients still overflow: lower the learning rate, use bf16, or lower min_loss_scale")
                self.cur_scale = max(self.cur_scale / 2.0, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            stable = self.cur_iter - self.last_overflow_iter - 1
            if stable > 0 and stable % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= 2.0
        self.cur_iter += 1

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("cur_scale", "cur_hysteresis", "cur_iter", "last_overflow_iter")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def build_loss_scaler(precision) -> StaticLossScaler:
    """DeepSpeed's choice: fp16 with loss_scale 0 is dynamic; fp16 otherwise static; else 1."""
    if precision.dtype != "fp16":
        return StaticLossScaler(1.0)
    if precision.loss_scale > 0:
        return StaticLossScaler(precision.loss_scale)
    return DynamicLossScaler(2.0 ** precision.initial_scale_power, precision.loss_scale_window,
                             precision.min_loss_scale, precision.hysteresis, precision.consecutive_hysteresis)
