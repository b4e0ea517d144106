"""Entry points: read a plan or DeepSpeed config, translate, validate, resolve, report."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .deepspeed import is_deepspeed_config, translate_deepspeed
from .errors import PlanError, PlanWarning, Problem, problems_from_validation
from .plan import Plan

__all__ = ["load_plan", "validate_source", "read_json"]


def read_json(source: str | Path) -> dict:
    """A JSON object from a path, or from JSON text (a string whose first non-blank is '{')."""
    text = source if isinstance(source, str) and source.lstrip().startswith("{") else None
    if text is None:
        try:
            text = Path(source).read_text()
        except OSError as e:
            raise PlanError([Problem("<source>", str(source), f"cannot read: {e.strerror or e}")]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError([Problem("<source>", str(source)[:80], f"not valid JSON: {e}")]) from None
    if not isinstance(data, dict):
        raise PlanError([Problem("<source>", type(data).__name__, "the top level must be a JSON object")])
    return data


def _deepspeed_paths(problems: list[Problem], sources: dict[str, str]) -> list[Problem]:
    """Re-address problems at native key paths to the DeepSpeed key they were translated from."""
    out = []
    for p in problems:
        parts = p.path.split(".")
        for n in range(len(parts), 0, -1):
            origin = sources.get(".".join(parts[:n]), "")
            if origin.startswith("deepspeed:"):
                ds_path = origin.removeprefix("deepspeed:").split(" ")[0]
                p = replace(p, path=ds_path, message=f"{p.message} (dsc key {p.path})")
                break
        out.append(p)
    return out


def validate_source(source: Any, *, world_size: int = 1, strict: bool = False,
                    model_info: dict | None = None, deepspeed: bool | None = None
                    ) -> tuple[Plan | None, list[Problem]]:
    """Load, translate if DeepSpeed, validate and resolve; never raises for plan problems.

    Returns the resolved plan (None when any error remains) and every problem, errors and
    warnings. With `strict`, warnings count as errors. `deepspeed` forces (True) or forbids
    (False) DeepSpeed translation; None detects it with `is_deepspeed_config`.
    """
    problems: list[Problem] = []
    plan = None
    try:
        if isinstance(source, Plan):
            plan, sources = source, {}
        else:
            data = source if isinstance(source, dict) else read_json(source)
            sources = {}
            if is_deepspeed_config(data) if deepspeed is None else deepspeed:
                t = translate_deepspeed(data, world_size=world_size, model_info=model_info)
                problems += t.problems
                data, sources = t.plan_dict, t.sources
            try:
                plan = Plan.model_validate(data).with_sources(sources)
            except ValidationError as e:
                problems += _deepspeed_paths(problems_from_validation(e, Plan), sources)
        if plan is not None:
            try:
                plan = plan.resolve(world_size, model_info=model_info)
            except PlanError as e:
                problems += _deepspeed_paths(e.problems, sources)
                plan = None
    except PlanError as e:
        problems += e.problems
    problems = _dedupe(problems)
    if strict:
        problems = [replace(p, severity="error", message=f"{p.message} [warning; an error under strict]")
                    if p.severity == "warning" else p for p in problems]
    if any(p.severity == "error" for p in problems):
        plan = None
    return plan, problems


def _dedupe(problems: list[Problem]) -> list[Problem]:
    """Keep the first error per key path (translation errors come before validation errors)."""
    seen, out = set(), []
    for p in problems:
        if p.severity == "error" and p.path in seen:
            continue
        seen.add(p.path) if p.severity == "error" else None
        out.append(p)
    return out


def load_plan(source: Any, *, world_size: int = 1, strict: bool = False,
              model_info: dict | None = None, deepspeed: bool | None = None) -> Plan:
    """A resolved Plan from a dict, a JSON path or text, or a Plan (native or DeepSpeed).

    Warnings are emitted as `PlanWarning`; errors (and, with `strict`, warnings) raise
    `PlanError` listing every problem at once.
    """
    plan, problems = validate_source(source, world_size=world_size, strict=strict,
                                     model_info=model_info, deepspeed=deepspeed)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        rest = [p for p in problems if p.severity != "error"]
        n = len(errors)
        summary = (f"invalid plan: {n} error{'s' if n != 1 else ''}"
                   + (f" (and {len(rest)} warning{'s' if len(rest) != 1 else ''})" if rest else ""))
        raise PlanError(errors + rest, summary)
    for p in problems:
        warnings.warn(str(p), PlanWarning, stacklevel=2)
    return plan
