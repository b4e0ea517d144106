"""Sharded checkpoints in torch.distributed.checkpoint (DCP) format: they load on any number of
ranks and under any ZeRO stage, and each rank reads only what it will own.

Layout of a checkpoint folder:

    DIR/latest                 the tag of the last complete checkpoint (replaced atomically)
    DIR/<tag>/.metadata        DCP's index of every saved tensor piece
    DIR/<tag>/__<R>_0.distcp   what rank R wrote
    DIR/<tag>/meta.json        dsc's description: plan, ZeRO layout, parameter shapes, aliases
    DIR/<tag>/state.pt         replicated small state: scheduler, loss scaler, step counters

What DCP holds, for each trainable parameter (canonical name; tied weights once):

    param/<name>, exp_avg/<name>, exp_avg_sq/<name>, momentum_buffer/<name>
        the flattened parameter (1-D) and its optimizer state, each a ShardedTensor. A ZeRO shard
        is a chunk of a bucket and may cut a parameter anywhere, so each rank holds one contiguous
        range of each flattened parameter, or none: a 1-D ShardedTensor with uneven shards says
        exactly that (DTensor's placements split evenly and cannot). What every data-parallel
        rank holds alike (ZeRO-0) is written by data-parallel rank 0 only. Under tensor
        parallelism a key ends in "@tp<t>" and holds tensor-parallel rank t's local slice.
    rng/rank<R>                rank R's CPU RNG state
    buffer/<key>               the model's buffers (replicated: written once)

Loading asks DCP for the same keys in the loading rank's own layout: the ranges of each flattened
parameter its shards cover. DCP reads those ranges from whichever files hold them, so resharding
N -> M ranks and across ZeRO stages needs no whole copy of the model state on any rank. Whole
tensors are read where the loading rank holds whole tensors (ZeRO-0/1/2 parameters), where the
tensor-parallel size changed (slices are joined, then cut again), and by `consolidate`.

Atomicity: every rank writes into DIR/<tag>.partial; once all ranks are done (barrier) rank 0
renames it to DIR/<tag> and then replaces DIR/latest. A crash at any point leaves `latest`
naming the previous complete checkpoint.

ShardedTensor is deprecated in favour of DTensor, whose even placements cannot describe bucket
chunks; its FutureWarning is silenced here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# torch.distributed.checkpoint is imported where it is used: importing it costs ~0.9 s (it pulls in
# DTensor), which every `import dsc` and every launched rank would pay.

VERSION = 2
STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ShardedTensor.*")
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        yield


def _key(kind: str, name: str, tp: int, t: int) -> str:
    return f"{kind}/{name}" + (f"@tp{t}" if tp > 1 else "")


# -- who owns what ----------------------------------------------------------------------------------
def _ranges(layout, d: int, writing: bool):
    """(bucket, slot, lo, hi, at) for data-parallel rank d: its range [lo, hi) of each flattened
    parameter, found at position `at` of its shard chunk. ZeRO-0 chunks are whole buckets that
    every rank holds alike: when writing, only rank 0 owns them."""
    if layout.stage == 0 and writing and d != 0:
        return
    for b in layout.buckets:
        c0 = d * b.chunk if layout.stage >= 1 else 0
        c1 = c0 + b.chunk
        for s in b.slots:
            a, z = max(c0, s.offset), min(c1, s.offset + s.numel)
            if a < z:
                yield b, s, a - s.offset, z - s.offset, a - c0


def _owners(layout, writing: bool) -> dict[str, list[tuple[int, int, int]]]:
    """{parameter: [(data-parallel rank, lo, hi), ...]}: who holds which range of it."""
    out: dict[str, list[tuple[int, int, int]]] = {}
    for d in range(layout.dp):
        for _, s, lo, hi, _ in _ranges(layout, d, writing):
            out.setdefault(s.name, []).append((d, lo, hi))
    return out


def _sharded(engine, owners: list[tuple[int, int, int]], numel: int, t: int, local: dict, dtype):
    """A 1-D ShardedTensor of `numel` elements whose pieces sit on the ranks that own them
    (`owners`, from `_owners`); `local` maps this rank's range start -> its tensor. The global
    metadata is computed from the layout (every data-parallel rank's buckets are the same), so no
    collective is needed."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    if not dist.is_initialized():  # one process owns all of it: a plain tensor
        return local[0]
    device = engine.flat.device.type
    metas, mine, me = [], [], _global_rank()
    for d, lo, hi in owners:
        g = d * engine.tp + t  # global rank: tensor-parallel ranks are adjacent
        m = ShardMetadata([lo], [hi - lo], f"rank:{g}/{device}")
        metas.append(m)
        if g == me and lo in local:
            mine.append(Shard(local[lo], m))
    props = TensorProperties(dtype=dtype)
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        mine, ShardedTensorMetadata(metas, torch.Size([numel]), props))


def _param_table(engine) -> dict[str, dict]:
    """{name: {"shape": local shape, "numel"}} of the trainable parameters, in layout order."""
    return {s.name: {"shape": list(s.shape), "numel": s.numel} for b in engine.layout.buckets for s in b.slots}


def _optimizer_state(engine) -> list[dict]:
    if engine.optimizer is None:
        return [{} for _ in engine.shard_params]
    return [engine.optimizer.state.get(sp, {}) for sp in engine.shard_params]


# -- save -------------------------------------------------------------------------------------------
def _write_shards(state: dict, folder: Path) -> None:
    """DCP's save of this rank's pieces (a function of its own so tests can interrupt it)."""
    import torch.distributed.checkpoint as dcp

    with _quiet():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(folder), no_dist=not dist.is_initialized())


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
    layout, table, states = engine.layout, _param_table(engine), _optimizer_state(engine)
    kinds = ["param", *[k for k in STATE_KEYS if any(k in st for st in states)]]
    local: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for b, s, lo, hi, at in _ranges(layout, engine.rank, writing=True):
        sp, st = engine.shard_params[b.index], states[b.index]
        for kind in kinds:
            src = sp.detach() if kind == "param" else st.get(kind)
            if src is not None:
                local.setdefault((kind, s.name), {})[lo] = src[at: at + hi - lo].clone()
    state: dict[str, Any] = {}
    owners = _owners(layout, writing=True)
    with _quiet():
        for name, info in table.items():
            for kind in kinds:
                for t in range(engine.tp):  # every rank describes every key (no collectives needed)
                    mine = local.get((kind, name), {}) if t == engine.tp_rank else {}
                    state[_key(kind, name, engine.tp, t)] = _sharded(engine, owners[name], info["numel"], t, mine,
                                                                     engine.flat.dtype)
    state[f"rng/rank{me}"] = torch.get_rng_state()
    for k, v in model_state.items():
        state[f"buffer/{k}"] = v.detach()
    step = next((float(st["step"]) for st in states if "step" in st), None)
    _write_shards(state, partial)
    if me == 0:
        extra = {"scheduler": engine.scheduler.state_dict() if engine.scheduler is not None else None,
                 "global_step": engine.global_step, "micro_step": engine.micro_step, "optimizer_step": step,
                 "loss_scaler": engine.scaler.state_dict(), "skipped_steps": engine.skipped_steps}
        torch.save(extra, partial / "state.pt")
        meta = {"version": VERSION, "format": "torch.distributed.checkpoint", "stage": layout.stage,
                "dp": layout.dp, "tp": engine.tp, "tp_layout": engine.tp_layout, "world": engine.world * engine.tp,
                "params": table, "kinds": kinds, "buffers": sorted(model_state),
                "buckets": [{"index": b.index, "padded": b.padded, "chunk": b.chunk,
                             "slots": [[s.name, list(s.shape), s.numel, s.offset] for s in b.slots]}
                            for b in layout.buckets],
                "aliases": aliases, "plan": plan.model_dump(mode="json"), "global_step": engine.global_step}
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


# -- read -------------------------------------------------------------------------------------------
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


def _meta(folder: Path) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("version") != VERSION:
        raise ValueError(f"{folder} was written in dsc checkpoint format {meta.get('version')}; this dsc reads "
                         f"format {VERSION} (torch.distributed.checkpoint)")
    return meta


def _read(folder: Path, state: dict) -> None:
    """Fill `state` in place from the checkpoint (plain tensors: whole; ShardedTensors: ranges)."""
    import torch.distributed.checkpoint as dcp

    with _quiet():
        dcp.load(state, storage_reader=dcp.FileSystemReader(folder), no_dist=not dist.is_initialized())


def _whole_shape(shape: list[int], info: dict | None, tp: int) -> tuple[int, ...]:
    if not info or tp == 1:
        return tuple(shape)
    out = list(shape)
    out[info["dim"]] = info["size"] if info.get("size") is not None else sum(info["segments"])
    return tuple(out)


def read_whole(folder: Path, meta: dict, kinds=None) -> dict[str, dict[str, torch.Tensor]]:
    """{name: {kind: whole tensor}}: tensor-parallel slices joined, padding dropped. Reads every
    saved piece of those tensors (consolidation, or a change of tensor-parallel size)."""
    tp = meta["tp"]
    kinds = kinds or meta["kinds"]
    names = list(meta["params"])
    parts = []
    for t in range(tp):
        want = {(n, k): torch.empty(meta["params"][n]["numel"]) for n in names for k in kinds}
        _read(folder, {_key(k, n, tp, t): v for (n, k), v in want.items()})
        part = {}
        for (n, k), v in want.items():
            part.setdefault(n, {})[k] = v.view(meta["params"][n]["shape"])
        parts.append(part)
    return parts[0] if tp == 1 else _join_tp(parts, meta["tp_layout"], tp)


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


# -- load -------------------------------------------------------------------------------------------
def _check_model(engine, meta: dict) -> None:
    mine = {n: _whole_shape(v["shape"], engine.tp_layout.get(n), engine.tp) for n, v in _param_table(engine).items()}
    saved = {n: _whole_shape(v["shape"], meta["tp_layout"].get(n), meta["tp"]) for n, v in meta["params"].items()}
    if mine != saved:
        missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
        wrong = sorted(n for n in set(mine) & set(saved) if mine[n] != saved[n])
        raise ValueError(f"checkpoint does not match this model: missing {missing[:5]}, unexpected "
                         f"{extra[:5]}, shape differs {wrong[:5]}")


def load_checkpoint(engine, directory: str | os.PathLike, tag: str | None = None,
                    buffers: dict[str, torch.Tensor] | None = None) -> None:
    """Load into `engine` (any stage, any world size), and the saved model buffers into `buffers`
    ({state_dict key: tensor}, filled in place)."""
    folder = _folder(directory, tag)
    meta = _meta(folder)
    _check_model(engine, meta)
    extra = torch.load(folder / "state.pt", weights_only=False)
    step = extra["optimizer_step"]
    kinds = [k for k in meta["kinds"] if k == "param" or (engine.optimizer is not None and step is not None)]
    opt_state = [{k: torch.zeros_like(sp.detach()) for k in kinds[1:]} for sp in engine.shard_params]
    if meta["tp"] == engine.tp:
        _load_own_layout(engine, folder, kinds, opt_state)
    else:
        _load_through_whole(engine, folder, meta, kinds, opt_state)
    if engine.optimizer is not None and step is not None:
        for sp, st in zip(engine.shard_params, opt_state):
            engine.optimizer.state[sp] = {**st, "step": torch.tensor(step, dtype=torch.float32)}
    if engine.scheduler is not None and extra["scheduler"] is not None:
        engine.scheduler.load_state_dict(extra["scheduler"])
        if engine.optimizer is not None:  # DeepSpeed's state is only the position: recompute its lr
            for group, lr in zip(engine.optimizer.param_groups, engine.scheduler.get_lr()):
                group["lr"] = lr
    engine.scaler.load_state_dict(extra["loss_scaler"])
    engine.skipped_steps = extra["skipped_steps"]
    engine.global_step = extra["global_step"]
    engine.micro_step = extra["micro_step"]
    me = _global_rank()
    rng = f"rng/rank{me}" if meta["world"] == engine.world * engine.tp else "rng/rank0"
    want: dict[str, torch.Tensor] = {rng: torch.get_rng_state().clone()}
    want.update({f"buffer/{k}": v for k, v in (buffers or {}).items() if k in meta["buffers"]})
    with torch.no_grad():
        _read(folder, want)
    torch.set_rng_state(want[rng])
    engine.zero_grad()


def _load_own_layout(engine, folder: Path, kinds: list[str], opt_state: list[dict]) -> None:
    """Same tensor-parallel size: each rank asks for its own ranges (whole parameters where it holds
    them whole) and DCP reads them straight into the engine's buffers."""
    layout, tp, t = engine.layout, engine.tp, engine.tp_rank
    state: dict[str, Any] = {}
    with _quiet():
        for kind in kinds:
            whole = kind == "param" and layout.stage < 3 or kind != "param" and layout.stage == 0
            if whole:  # every rank holds these whole: views of the flat buffer / state buckets
                for b in layout.buckets:
                    for s in b.slots:
                        if kind == "param":
                            dst = engine.flat[b.offset + s.offset: b.offset + s.offset + s.numel]
                        else:
                            dst = opt_state[b.index][kind][s.offset: s.offset + s.numel]
                        state[_key(kind, s.name, tp, t)] = dst
                continue
            local: dict[str, dict[int, torch.Tensor]] = {}
            for b, s, lo, hi, at in _ranges(layout, engine.rank, writing=False):
                src = engine.shard_params[b.index].detach() if kind == "param" else opt_state[b.index][kind]
                local.setdefault(s.name, {})[lo] = src[at: at + hi - lo]
            owners = _owners(layout, writing=False)
            for name, info in _param_table(engine).items():
                for tt in range(tp):
                    mine = local.get(name, {}) if tt == t else {}
                    state[_key(kind, name, tp, tt)] = _sharded(engine, owners[name], info["numel"], tt, mine,
                                                               engine.flat.dtype)
    with torch.no_grad():
        _read(folder, state)


def _load_through_whole(engine, folder: Path, meta: dict, kinds: list[str], opt_state: list[dict]) -> None:
    """Another tensor-parallel size: read whole tensors, cut this rank's slices, then its chunks."""
    whole = read_whole(folder, meta, kinds)
    if engine.tp > 1:
        from dsc.passes.tensor_parallel import Shard, local_slice

        for name, info in engine.tp_layout.items():
            s = Shard(info["dim"], tuple(info["segments"]), info.get("size"))
            whole[name] = {k: local_slice(v, s, engine.tp, engine.tp_rank).contiguous() for k, v in whole[name].items()}
    with torch.no_grad():
        for sp, b in zip(engine.shard_params, engine.layout.buckets):
            for kind in kinds:
                full = torch.zeros(b.padded, dtype=sp.dtype)
                for s in b.slots:
                    full[s.offset: s.offset + s.numel] = whole[s.name][kind].reshape(-1)
                if kind == "param" and engine.layout.stage < 3:  # whole parameters live in the flat buffer
                    engine.flat[b.offset: b.offset + b.padded].copy_(full)
                elif kind == "param":
                    sp.copy_(engine.own_chunk(full, b))
                else:
                    opt_state[b.index][kind].copy_(engine.own_chunk(full, b))


def consolidate(directory: str | os.PathLike, out: str | os.PathLike, tag: str | None = None) -> dict:
    """Write one plain fp32 state_dict (the model's own keys, tied weights included) to `out`."""
    folder = _folder(directory, tag)
    meta = _meta(folder)
    whole = read_whole(folder, meta, ["param"])
    buffers = {f"buffer/{k}": torch.empty(0) for k in meta["buffers"]}
    if buffers:  # shapes come from DCP's own index
        import torch.distributed.checkpoint as dcp

        md = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
        buffers = {k: torch.empty(tuple(md[k].size), dtype=md[k].properties.dtype) for k in buffers}
        _read(folder, buffers)
    state = {k[len("buffer/"):]: v for k, v in buffers.items()}
    for key, name in meta["aliases"].items():
        state[key] = whole[name]["param"]
    _atomic_write(Path(out), lambda p: torch.save(state, p))
    return state
