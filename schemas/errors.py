"""Plan problems and errors: one readable line per problem, with its key path and a fix.

A `Problem` names the dotted key path (``zero.stage``, ``optimizer.params.lr``), the value found
there and what is wrong; `PlanError` carries every problem of a plan at once. Pydantic's
`ValidationError` is converted here so users never see its raw dump.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

__all__ = ["Problem", "PlanError", "PlanWarning", "did_you_mean", "problems_from_validation"]


class PlanWarning(UserWarning):
    """A plan or DeepSpeed config is usable, but something in it is ignored or changed."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a plan, at one key path."""

    path: str
    """Dotted key path of the offending key, e.g. ``zero.stage`` or ``optimizer.params.lr``."""
    value: Any
    """The value found at `path` (None when the key is missing)."""
    message: str
    """What is wrong and what is allowed; the full line is ``f"{path}: {message}"``."""
    severity: Literal["error", "warning"] = "error"
    """``error``: the plan cannot run. ``warning``: it runs, but differently from what was asked."""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class PlanError(ValueError):
    """A plan that cannot be used; `problems` lists every reason, not just the first."""

    def __init__(self, problems: list[Problem], summary: str | None = None):
        self.problems = list(problems)
        n = len(self.problems)
        self.summary = summary or f"invalid plan: {n} problem{'s' if n != 1 else ''}"
        super().__init__(self.summary)

    def __str__(self) -> str:
        return "\n".join([self.summary] + [f"  {p}" for p in self.problems])


def did_you_mean(name: str, options: typing.Iterable[str]) -> str:
    """``" (did you mean 'stage'?)"`` for the closest option, or ``""`` when none is close."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


# DeepSpeed spellings someone may write into a native plan, and their dsc key path.
DEEPSPEED_SPELLINGS = {
    "zero_optimization": "zero",
    "train_batch_size": "batch.train_batch_size",
    "train_micro_batch_size_per_gpu": "batch.micro_batch_size",
    "gradient_accumulation_steps": "batch.gradient_accumulation_steps",
    "fp16": "precision.dtype",
    "bf16": "precision.dtype",
    "bfloat16": "precision.dtype",
}


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation like ``Zero`` or ``Optimizer | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _submodel(arg)) is not None:
            return found
    return None


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model that sits at ``loc`` (a pydantic error location) under `model`."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        sub = _submodel(field.annotation) if field else None
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _unknown_key_message(key: str, fields: list[str], section: str) -> str:
    """'unknown key' with a did-you-mean over `fields`, or over DeepSpeed's spellings of them."""
    hint = "" if key in DEEPSPEED_SPELLINGS else did_you_mean(key, fields)
    ds_key = difflib.get_close_matches(key, list(DEEPSPEED_SPELLINGS), n=1)
    if not hint and ds_key:
        target = DEEPSPEED_SPELLINGS[ds_key[0]]
        if not section or target.startswith(section + "."):
            name = target.split(".")[-1] if section else target.split(".")[0]
            hint = f" (did you mean {name!r}? DeepSpeed's {ds_key[0]!r} is {target!r} in a dsc plan)"
    return f"unknown key{hint}; allowed here: {', '.join(fields)}"


def problems_from_validation(err: ValidationError, model: type[BaseModel]) -> list[Problem]:
    """Turn each pydantic error into a one-line `Problem` with path, value and allowed values."""
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "<plan>"
        value = e.get("input")
        kind, msg = e["type"], e["msg"]
        if kind == "extra_forbidden":
            section = ".".join(str(p) for p in loc[:-1])
            message = _unknown_key_message(str(loc[-1]), _fields_at(model, loc[:-1]), section)
        elif kind == "value_error":
            message = msg.removeprefix("Value error, ")
        elif kind in ("literal_error", "enum"):
            allowed = e.get("ctx", {}).get("expected", "").replace(" or ", ", ")
            message = f"{value!r} — not allowed; allowed: {allowed}"
        elif kind == "missing":
            message = "required key is missing"
        else:
            message = f"{value!r} — {msg[0].lower() + msg[1:]}"
        problems.append(Problem(path, value, message, "error"))
    return problems
