"""The structured report of a compile: one JSON object for `compiled.report()` and the CLI.

Shape (stable keys; later passes add to `passes` and to each rank):
    {"dsc_version", "world_size", "model": {...}, "capture": {...}, "plan": {...},
     "sources": {key path: origin}, "passes": [pass records of rank 0],
     "ranks": [{"rank", "coords", "memory": {"params_bytes", "grads_bytes", "optimizer_bytes",
                "activations_bytes", "buffers_bytes", "total_bytes"}, "comm_bytes_per_step",
                "collectives": [...]}]}
"""

from __future__ import annotations

from typing import Any

from . import __version__


def build_report(model, plan, captured, programs) -> dict[str, Any]:
    from .analyze import parameter_bytes  # torch: not for `dsc inspect`, which only reads JSON

    trainable, frozen, buffers = parameter_bytes(programs[0].gm)
    return {
        "dsc_version": __version__,
        "world_size": programs[0].world_size,
        "model": {"class": type(model).__name__, "trainable_params": trainable,
                  "frozen_params_bytes": frozen, "buffers_bytes": buffers},
        "capture": {"strategy": captured.strategy, "seconds": round(captured.seconds, 3),
                    "notes": list(captured.notes), "training": captured.training},
        "plan": plan.model_dump(mode="json"),
        "sources": dict(plan.sources),
        "passes": programs[0].passes,
        "kernels": programs[0].artifacts.get("kernels", []),
        "declined_fusion": next((p["declined"] for p in programs[0].passes if p["name"] == "fuse_kernels"), []),
        "ranks": [p.rank_report() for p in programs],
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def explain(report: dict[str, Any]) -> str:
    """The report as text: plan, pass log, per-rank memory and communication."""
    out = [f"dsc {report['dsc_version']}: {report['model']['class']} "
           f"({report['model']['trainable_params']:,} trainable parameters) on {report['world_size']} rank(s)",
           f"capture: {report['capture']['strategy']} in {report['capture']['seconds']} s"]
    out += [f"  note: {n}" for n in report["capture"]["notes"]]
    out.append("")
    out.append("resolved plan (value  <- where it came from):")
    for key, origin in sorted(report["sources"].items()):
        value: Any = report["plan"]
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None and origin == "default":
            continue  # an unused optional section (e.g. scheduler, or one reserved for later)
        out.append(f"  {key:<36} {value!s:<14} <- {origin}")
    out.append("")
    out.append("passes:")
    for p in report["passes"]:
        out.append(f"  {p['name']:<20} {p['summary']}")
        for d in p["declined"]:
            out.append(f"  {'':<20}   declined {d['what']}: {d['reason']}")
    tp = next((p for p in report["passes"] if p["name"] == "shard_tensor_parallel"), None)
    if tp is not None:
        out.append("")
        out.append("tensor-parallel modules (rank 0's table; every rank decides the same):")
        for module, v in tp["details"]["modules"].items():
            out.append(f"  {module:<48} {v['style']:<9} {v['why']}")
    if report.get("kernels"):
        out.append("")
        out.append("generated kernels (rank 0):")
        for k in report["kernels"]:
            bwd = {"generated": "; backward kernel", "pass-through": "; backward passes gradients through"}.get(
                k.get("backward"), "")
            out.append(f"  {k['name']:<36} {k['backend']:<4} {k['pattern']:<10} x{k['uses']:<3} replaces "
                       f"{' + '.join(k['ops'])}{bwd}")
    out.append("")
    head = f"  {'rank':>4}  {'coords':>10}  {'params':>12}  {'grads':>12}  {'optimizer':>12}  {'activations':>12}  {'comm/step':>12}"
    out.append("per-rank memory and communication:")
    out.append(head)
    for r in report["ranks"]:
        m = r["memory"]
        coords = ",".join(f"{k}{v}" for k, v in r.get("coords", {}).items())
        out.append(f"  {r['rank']:>4}  {coords:>10}  {_mib(m['params_bytes']):>12}  {_mib(m['grads_bytes']):>12}  "
                   f"{_mib(m['optimizer_bytes']):>12}  {_mib(m['activations_bytes']):>12}  "
                   f"{_mib(r['comm_bytes_per_step']):>12}")
    out.append("  (activations: upper bound, every forward intermediate kept for backward; "
               "comm: bytes each rank sends per optimizer step, ring algorithms)")
    return "\n".join(out)
