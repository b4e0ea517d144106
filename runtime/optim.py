"""Build the torch optimizer a plan asks for.

dsc's optimizers are torch.optim's; the plan's `optimizer.type` picks one:
`adamw` (decoupled weight decay; DeepSpeed's default "Adam"), `adam` (L2 weight decay added to
the gradient, torch.optim.Adam) and `sgd`. All three update element by element, so running them
on flat shards gives the same numbers as running them on the original parameters.
"""

from __future__ import annotations

import torch


def optimizer_kind(spec) -> str | None:
    """The key used for memory accounting: adamw, adam, sgd or sgd_momentum (None: no optimizer)."""
    if spec is None:
        return None
    if spec.type == "sgd":
        return "sgd_momentum" if spec.momentum else "sgd"
    return spec.type


def build_optimizer(params, spec) -> torch.optim.Optimizer:
    """A torch optimizer over `params` configured from the plan's `optimizer` section.

    Adam/AdamW use torch's fused kernel (CPU and GPU): on flat multi-million-element shards it is
    several times faster than the default multi-tensor path, which streams the shard once per
    elementwise operation.
    """
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    if spec.type == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps,
                                 weight_decay=spec.weight_decay, fused=fused or None)
    if spec.type == "adam":
        return torch.optim.Adam(params, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps,
                                weight_decay=spec.weight_decay, fused=fused or None)
    if spec.type == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, dampening=spec.dampening,
                               weight_decay=spec.weight_decay, nesterov=spec.nesterov)
    raise ValueError(f"optimizer.type: {spec.type!r} is not supported; allowed: adamw, adam, sgd")
