"""Sharded checkpoints that load on any number of ranks and under any ZeRO stage.

Layout of a checkpoint folder:

    DIR/latest                 the tag of the last complete checkpoint (replaced atomically)
    DIR/<tag>/meta.json        plan, ZeRO layout (buckets -> parameter slots), state_dict aliases
    DIR/<tag>/rank<R>.pt       rank R's shards: parameters, optimizer state, scheduler, steps, RNG
                               (rank 0 also holds the buffers)

Atomicity: every rank writes into DIR/<tag>.partial; once all ranks are done (barrier) rank 0
renames it to DIR/<tag> and then replaces DIR/latest. A crash at any point leaves `latest`
naming the previous complete checkpoint.

Resharding: parameters and Adam/SGD state are element-wise aligned, so any layout can be rebuilt
from the saved chunks: each bucket is the concatenation of its chunks in rank order, and each
parameter a slice of its bucket. Under tensor parallelism every tensor-parallel rank has its own
buckets (of its local slices): the whole parameter is the concatenation of the tp ranks' slices
(per segment, padding dropped), as recorded in meta.json's `tp_layout`. Loading rebuilds whole tensors by parameter name and cuts out
what this rank owns in its own layout. (Loading reads every rank's file, so one rank briefly holds
the whole model state; torch.distributed.checkpoint would read only the needed ranges, but our
shards are bucket chunks that cross parameter boundaries, which DCP cannot describe without
per-parameter sharding metadata. That is the planned next step.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

VERSION = 1
STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(engine, model_state: dict[str, torch.Tensor], aliases: dict[str, str], plan: Any,
                    directory: str | os.PathLike, tag: str | None = None) -> Path:
    """Write this rank's shards; all ranks must call it. Returns the checkpoint folder."""
    root = Path(directory)
    tag = tag or f"step{engine.global_step}"
    partial = root / f"{tag}.partial"
    me = _global_rank()
    if me == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    _barrier()
    layout = engine.layout
    shards = []
    for sp in engine.shard_params:
        state = engine.optimizer.state.get(sp, {}) if engine.optimizer is not None else {}
        shards.append({"param": sp.detach().clone(),
                       "state": {k: v.detach().clone() for k, v in state.items() if k in STATE_KEYS},
                       "step": float(state["step"]) if "step" in state else None})
    payload = {"version": VERSION, "rank": me, "shards": shards,
               "scheduler": engine.scheduler.state_dict() if engine.scheduler is not None else None,
               "global_step": engine.global_step, "micro_step": engine.micro_step,
               "loss_scaler": engine.scaler.state_dict(), "skipped_steps": engine.skipped_steps,
               "rng": torch.get_rng_state()}
    if me == 0:
        payload["buffers"] = {k: v.detach().clone() for k, v in model_state.items()}
    _atomic_write(partial / f"rank{me}.pt", lambda p: torch.save(payload, p))
    if me == 0:
        meta = {"version": VERSION, "stage": layout.stage, "dp": layout.dp, "shards": layout.shards,
                "tp": engine.tp, "tp_layout": engine.tp_layout,
                "buckets": [{"index": b.index, "padded": b.padded, "chunk": b.chunk,
                             "slots": [[s.name, list(s.shape), s.numel, s.offset] for s in b.slots]}
                            for b in layout.buckets],
                "aliases": aliases, "plan": plan.model_dump(mode="json"),
                "global_step": engine.global_step}
        _atomic_write(partial / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
    _barrier()
    final = root / tag
    if me == 0:
        old = root / f"{tag}.old"
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
        _atomic_write(root / "latest", lambda p: p.write_text(tag + "\n"))
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _folder(directory: str | os.PathLike, tag: str | None) -> Path:
    root = Path(directory)
    if tag is None:
        latest = root / "latest"
        if not latest.exists():
            raise FileNotFoundError(f"{root} has no 'latest' file: no complete checkpoint was saved there")
        tag = latest.read_text().strip()
    folder = root / tag
    if not (folder / "meta.json").exists():
        raise FileNotFoundError(f"{folder} is not a complete dsc checkpoint (no meta.json)")
    return folder


def read_whole(directory: str | os.PathLike, tag: str | None = None):
    """(meta, {name: {"param": t, state key: t, ...}}, step, rank-0 payload) rebuilt from all shards."""
    folder = _folder(directory, tag)
    meta = json.loads((folder / "meta.json").read_text())
    dp, tp = meta["dp"], meta.get("tp", 1)
    files = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(dp * tp)]
    parts, step = [], None
    for t in range(tp):  # ranks d * tp + t hold tensor-parallel slice t (dp-sharded)
        part, step = _rebuild(meta, [files[d * tp + t] for d in range(dp)])
        parts.append(part)
    whole = parts[0] if tp == 1 else _join_tp(parts, meta["tp_layout"], tp)
    return meta, whole, step, files[0]


def _join_tp(parts: list[dict], tp_layout: dict, tp: int) -> dict:
    """Whole tensors from the tensor-parallel ranks' slices (rank-major within each segment)."""
    out = {}
    for name, tensors in parts[0].items():
        info = tp_layout.get(name)
        if info is None:
            out[name] = tensors
            continue
        out[name] = {}
        for key in tensors:
            dim, segs = info["dim"], info["segments"]
            pieces = [p[name][key].split([s // tp for s in segs], dim) for p in parts]
            full = torch.cat([pieces[r][i] for i in range(len(segs)) for r in range(tp)], dim)
            out[name][key] = full.narrow(dim, 0, info["size"]) if info.get("size") is not None else full
    return out


def _rebuild(meta: dict, files: list) -> tuple[dict, float | None]:
    """Whole (local) tensors of one tensor-parallel rank from its data-parallel shards."""
    whole: dict[str, dict[str, torch.Tensor]] = {}
    step = None
    for i, b in enumerate(meta["buckets"]):
        owners = files if meta["shards"] > 1 else files[:1]
        keys = ["param", *files[0]["shards"][i]["state"].keys()]
        for key in keys:
            parts = [f["shards"][i]["param"] if key == "param" else f["shards"][i]["state"][key] for f in owners]
            bucket = torch.cat([p.reshape(-1) for p in parts])
            for name, shape, numel, offset in b["slots"]:
                whole.setdefault(name, {})[key] = bucket[offset: offset + numel].view(shape).clone()
        if files[0]["shards"][i]["step"] is not None:
            step = files[0]["shards"][i]["step"]
    return whole, step


def load_checkpoint(engine, directory: str | os.PathLike, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Load into `engine` (any stage, any world size). Returns the saved buffers (model state)."""
    meta, whole, step, first = read_whole(directory, tag)
    if engine.tp > 1:  # this rank's tensor-parallel slices of the whole tensors
        from dsc.passes.tensor_parallel import Shard, local_slice

        for name, info in engine.tp_layout.items():
            s = Shard(info["dim"], tuple(info["segments"]), info.get("size"))
            whole[name] = {k: local_slice(v, s, engine.tp, engine.tp_rank).contiguous()
                           for k, v in whole.get(name, {}).items()}
    mine = {s.name: tuple(s.shape) for b in engine.layout.buckets for s in b.slots}
    saved = {n: tuple(v["param"].shape) for n, v in whole.items()}
    if mine != saved:
        missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
        wrong = sorted(n for n in set(mine) & set(saved) if mine[n] != saved[n])
        raise ValueError(f"checkpoint does not match this model: missing {missing[:5]}, unexpected "
                         f"{extra[:5]}, shape differs {wrong[:5]}")
    rank_file = _folder(directory, tag) / f"rank{_global_rank()}.pt"
    same = meta["dp"] == engine.world and meta.get("tp", 1) == engine.tp
    own = torch.load(rank_file, weights_only=False) if rank_file.exists() and same else first
    with torch.no_grad():
        for sp, b in zip(engine.shard_params, engine.layout.buckets):
            params = _whole_bucket(whole, b, "param", sp.dtype)
            if engine.layout.stage < 3:  # whole parameters live in the flat buffer (sp is a view of it)
                engine.flat[b.offset: b.offset + b.padded].copy_(params)
            else:
                sp.copy_(engine.own_chunk(params, b))
            if engine.optimizer is not None and step is not None:
                state = {}
                for key in STATE_KEYS:
                    full = _whole_bucket(whole, b, key, sp.dtype)
                    if full is not None:
                        state[key] = engine.own_chunk(full, b).to(sp.device)
                state["step"] = torch.tensor(step, dtype=torch.float32)
                engine.optimizer.state[sp] = state
    if engine.scheduler is not None and own["scheduler"] is not None:
        engine.scheduler.load_state_dict(own["scheduler"])
        if engine.optimizer is not None:  # DeepSpeed's state is only the position: recompute its lr
            for group, lr in zip(engine.optimizer.param_groups, engine.scheduler.get_lr()):
                group["lr"] = lr
    if "loss_scaler" in own:
        engine.scaler.load_state_dict(own["loss_scaler"])
        engine.skipped_steps = own["skipped_steps"]
    engine.global_step = own["global_step"]
    engine.micro_step = own["micro_step"]
    torch.set_rng_state(own["rng"])
    engine.zero_grad()
    return first.get("buffers", {})


def _whole_bucket(whole, b, key: str, dtype) -> torch.Tensor | None:
    """Bucket `b` of tensor `key` ("param" or an optimizer state) rebuilt from whole parameters."""
    if any(key not in whole[s.name] for s in b.slots):
        return None
    full = torch.zeros(b.padded, dtype=dtype)
    for s in b.slots:
        full[s.offset: s.offset + s.numel] = whole[s.name][key].reshape(-1)
    return full


def consolidate(directory: str | os.PathLike, out: str | os.PathLike, tag: str | None = None) -> dict:
    """Write one plain fp32 state_dict (the model's own keys, tied weights included) to `out`."""
    meta, whole, _, first = read_whole(directory, tag)
    state = dict(first.get("buffers", {}))
    for key, name in meta["aliases"].items():
        state[key] = whole[name]["param"]
    _atomic_write(Path(out), lambda p: torch.save(state, p))
    return state
