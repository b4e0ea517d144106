"""`dsc.compile(model, plan)` and the `CompiledModel` it returns.

Public contract (later features keep it):
    compiled = dsc.compile(model, plan, example_inputs=..., optimizer=None, loss_fn=None)
    out = compiled(*inputs)        # forward through this rank's compiled graph
    compiled.backward(loss)        # divides by gradient_accumulation_steps, reduces at boundaries
    compiled.step()                # optimizer + scheduler + zero_grad at accumulation boundaries
    compiled.plan                  # the resolved Plan
    compiled.report()              # structured report (same object as `dsc compile --format json`)
    compiled.explain()             # the report as text
    compiled.full_state_dict()     # full parameters under the model's own state_dict keys
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from dsc.runtime.lr_schedules import build_scheduler
from dsc.runtime.mesh import build_mesh, init_distributed
from dsc.runtime.optim import build_optimizer
from dsc.runtime.precision import DTYPES, autocast, build_loss_scaler
from dsc.runtime.checkpoint import load_checkpoint, save_checkpoint
from dsc.runtime.collectives import bind_mesh_dim
from dsc.runtime.zero import ZeroEngine
from dsc.runtime.zero3 import Zero3Engine
from dsc.schemas import load_plan

from . import __version__
from dsc.passes.precision import relax_dtype_asserts

from .capture import call_args, capture
from .pass_manager import CompileContext
from .pipeline import RankProgram, compile_rank, rank_coords
from dsc.passes.fusion import fuse_kernels, inference as fused_inference
from dsc.passes.tensor_parallel import shard_tensor_parallel
from dsc.passes.zero3 import check_sharded, shard_attr, shard_parameters
from .report import build_report, explain


def tp_gather(local: torch.Tensor, info: dict, tp: int) -> torch.Tensor:
    """The whole parameter from every tensor-parallel rank's slice (collective over "tp")."""
    from dsc.runtime.collectives import all_gather_dim

    dim, segments = info["dim"], info["segments"]
    parts = all_gather_dim(local.contiguous(), dim, "tp", tp).split([s // tp for s in segments] * tp, dim)
    n = len(segments)  # parts are rank-major: rank r holds its piece of every segment, in order
    whole = torch.cat([parts[r * n + i] for i in range(n) for r in range(tp)], dim)
    return whole.narrow(dim, 0, info["size"]) if info.get("size") is not None else whole


class _WithLoss(nn.Module):
    """model + loss in one module, so the loss is part of the captured graph."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args):
        *inputs, target = args
        return self.loss_fn(self.model(*inputs), target)


def model_info(model: nn.Module) -> dict[str, Any]:
    """What plan resolution may use about the model ("auto" bucket sizes)."""
    cfg = getattr(model, "config", None)
    hidden = None
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        hidden = hidden or getattr(cfg, key, None)
    num = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"num_params": num, "hidden_size": hidden}


def compile(
    model: nn.Module,
    plan: Any,
    *,
    example_inputs: Any = None,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    loss_fn: Callable | None = None,
    strict: bool = False,
) -> "CompiledModel":
    """Compile `model` for the calling rank under `plan` (a Plan, dict, JSON path or ds_config).

    Under torchrun the process group is joined (or the existing one used) and the program is
    compiled for this rank; otherwise for world size 1. `example_inputs` is a tuple of positional
    inputs, a dict of keyword inputs, or `(args, kwargs)`; when omitted, capture happens at the
    first call. `optimizer` optionally replaces the plan's optimizer: a function from a list of
    parameters to a torch optimizer that updates element by element (shards are flat tensors).
    `loss_fn(output, target)` puts the loss into the graph: the compiled forward then takes
    `(*inputs, target)` and returns the loss.
    """
    init_distributed()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    resolved = load_plan(plan, world_size=world, strict=strict, model_info=model_info(model))
    if loss_fn is not None:
        model = _WithLoss(model, loss_fn)
    compiled = CompiledModel(model, resolved, rank, world, optimizer)
    if example_inputs is not None:
        compiled._compile(*call_args(example_inputs))
    return compiled


class CompiledModel(nn.Module):
    """A model compiled for one rank. Behaves as an nn.Module; adds the training API."""

    def __init__(self, model: nn.Module, plan, rank: int, world_size: int,
                 optimizer: Callable | None = None):
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: parameters are listed once
        self._plan = plan
        self.rank = rank
        self.world_size = world_size
        self._optimizer_fn = optimizer
        self._program: RankProgram | None = None
        self._captured = None
        self._eval_gm = None
        self._eval_check = None
        self._eval_fusion = None  # the fusion pass's record for the eval graph, once built
        self._engine: ZeroEngine | None = None
        self._device: str | None = None
        self.training = model.training

    # -- compile ----------------------------------------------------------------------------------
    def _compile(self, args: tuple, kwargs: dict) -> None:
        self._captured = capture(self._model, args, kwargs)
        if isinstance(self._model, _WithLoss):  # module names as the user knows them (rules, report)
            self._captured.gm.meta["dsc.module_prefix"] = "model."
        self._program = compile_rank(self._captured, self._plan, self.rank, self.world_size, args, kwargs)
        self.module = self._program.gm  # registered: named_parameters() keep the original names
        self._build_runtime()

    def _build_runtime(self) -> None:
        plan = self._plan
        layout = self._program.artifacts["zero_layout"]
        gm = self._program.gm
        params = {n: p for n, p in gm.named_parameters(remove_duplicate=True) if p.device.type != "meta"}
        groups = build_mesh(plan.parallel.data_parallel_size, plan.tensor_parallel.size)
        bind_mesh_dim("dp", groups["dp"])
        bind_mesh_dim("tp", groups["tp"])
        tp_layout = self._program.artifacts.get("tp_layout", {})
        for name in tp_layout:  # the graph reads this rank's slices: drop the whole parameters
            whole = self._captured.gm.get_parameter(name)
            # a zero-stride stand-in keeps the shape (an eval-mode capture needs it) in 4 bytes
            whole.data = torch.zeros((), dtype=whole.dtype, device=whole.device).expand(whole.shape)
            whole.requires_grad_(False)
        training = plan.optimizer is not None or self._optimizer_fn is not None
        if not training and layout.stage < 3:
            return  # inference on whole parameters: nothing to reduce, update or gather
        make_opt = None
        if self._optimizer_fn is not None:
            make_opt = self._optimizer_fn
        elif plan.optimizer is not None:
            make_opt = lambda ps: build_optimizer(ps, plan.optimizer)  # noqa: E731
        make_sched = (lambda opt: build_scheduler(opt, plan.scheduler)) if plan.scheduler else None
        args = (layout, make_opt, make_sched, groups["dp"], plan.batch.gradient_accumulation_steps,
                plan.gradient_clipping, DTYPES.get(plan.precision.grad_accum_dtype, torch.float32))
        self._engine = Zero3Engine(gm, params, *args) if layout.stage == 3 else ZeroEngine(params, *args)
        self._engine.set_tensor_parallel(tp_layout, groups["tp"], plan.tensor_parallel.size)
        if isinstance(self._engine, Zero3Engine):
            self._engine.set_gather_order(self._program.artifacts.get("zero3_gather_order", []))
        self._engine.scaler = build_loss_scaler(plan.precision)
        if isinstance(self._engine, Zero3Engine) and plan.precision.dtype != "fp32":
            self._engine.gather_dtype = DTYPES[plan.precision.dtype]

    @property
    def compiled(self) -> bool:
        return self._program is not None

    # -- nn.Module --------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self._program is None:
            self._compile(args, kwargs)
        if not self.training and self._captured.training:
            graph, hooks = self._eval_graph(args, kwargs), contextlib.nullcontext()
            check = self._eval_check
            if isinstance(self._engine, Zero3Engine):
                hooks = self._engine.forward_context(graph.meta["dsc.gather_order"])
        else:
            graph, check = self._program.gm, self._captured.check
            hooks = self._engine.forward_context() if self._engine is not None else contextlib.nullcontext()
        if check is not None:
            check(args, kwargs)
        with hooks, autocast(self._plan.precision, self._device_type()), fused_inference(not torch.is_grad_enabled()):
            return graph(*args, **kwargs)

    def _device_type(self) -> str:
        """Where the parameters live (decides the autocast device); looked up once."""
        if self._device is None:
            p = next((p for p in self._program.gm.parameters() if p.device.type != "meta"), None)
            self._device = p.device.type if p is not None else "cpu"
        return self._device

    def _eval_graph(self, args, kwargs):
        """Captured lazily: dropout and friends are baked into a graph as train or eval."""
        if self._eval_gm is None:
            was = self._model.training
            self._model.eval()
            try:
                cap = capture(self._model, args, kwargs)
                gm, self._eval_check = cap.gm, cap.check
            finally:
                self._model.train(was)
            ctx = CompileContext(self._plan, self.rank, self.world_size, rank_coords(self._plan, self.rank))
            if self._plan.tensor_parallel.size > 1:
                self._shard_eval_graph(gm, ctx)
            if isinstance(self._engine, Zero3Engine):
                self._zero3_eval_graph(gm, ctx)
            if relax_dtype_asserts(gm, ctx).changed_graph:  # (any plan: a caller's autocast, as in training)
                gm.recompile()
            if self._plan.fusion.enabled and self._plan.fusion.backend != "none":
                self._eval_fusion = fuse_kernels(gm, ctx)  # inference is where output buffers get reused
            self._eval_gm = gm
        return self._eval_gm

    def _shard_eval_graph(self, gm, ctx) -> None:
        """The eval graph gets the same tensor-parallel rewrite, reading the training graph's local
        parameters (the same objects, so it always sees the current weights)."""
        gm.meta["dsc.module_prefix"] = self._captured.gm.meta.get("dsc.module_prefix", "")
        train = self._program.gm
        ctx.artifacts["tp_local_params"] = dict(train.named_parameters(remove_duplicate=False))
        shard_tensor_parallel(gm, ctx)
        if ctx.artifacts["tp_layout"] != self._program.artifacts["tp_layout"]:
            raise RuntimeError("the eval graph shards differently from the training graph (the model's "
                               "structure depends on train/eval mode); set tensor_parallel.rules explicitly")

    def _zero3_eval_graph(self, gm, ctx) -> None:
        """The eval graph gets the same ZeRO-3 rewrite (gathers before use, over the same buckets),
        reading the runtime's shards: the same Parameter objects as the training graph."""
        ctx.artifacts["zero_layout"] = self._program.artifacts["zero_layout"]
        shard_parameters(gm, ctx)
        check_sharded(gm, ctx)
        for b, shard in enumerate(self._engine.shard_params):
            gm.register_parameter(shard_attr(b), shard)
        gm.meta["dsc.gather_order"] = ctx.artifacts["zero3_gather_order"]
        gm.recompile()

    def train(self, mode: bool = True):
        self.training = mode  # exported graphs refuse .train(); the graph choice happens in forward
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._engine is not None:
            self._engine.zero_grad()

    # -- training API -----------------------------------------------------------------------------
    @property
    def engine(self) -> ZeroEngine:
        if self._engine is None:
            raise RuntimeError("no training runtime: call the model once (or pass example_inputs), "
                               "and give the plan an 'optimizer' section")
        return self._engine

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, divided by gradient_accumulation_steps (and, for
        fp16, multiplied by the loss scale; the step divides the gradients by it again)."""
        engine = self.engine
        engine.begin_backward()
        (loss * (engine.scaler.cur_scale / engine.accumulation_steps)).backward()

    def step(self) -> bool:
        """Optimizer and scheduler step at an accumulation boundary; a no-op between them."""
        return self.engine.step()

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.engine.is_boundary

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @property
    def lr_scheduler(self):
        return self.engine.scheduler

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.engine.optimizer.param_groups]

    @property
    def global_steps(self) -> int:
        return self.engine.global_step if self._engine else 0

    # -- inspection -------------------------------------------------------------------------------
    @property
    def plan(self):
        """The resolved plan: every default, derived and "auto" value filled in."""
        return self._plan

    def report(self) -> dict[str, Any]:
        """What the compiler decided for this rank, as a JSON-serializable dict."""
        if self._program is None:
            raise RuntimeError("not compiled yet: call the model once or pass example_inputs")
        return build_report(self._model, self._plan, self._captured, [self._program])

    def explain(self) -> str:
        return explain(self.report())

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held right now for trainable params, grads and optimizer state (live tensors)."""
        return self.engine.live_bytes()

    def _state_names(self) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        """(state_dict key -> canonical trainable parameter name, the other state: buffers, frozen)."""
        user = self._model.model if isinstance(self._model, _WithLoss) else self._model
        sharded = {s.name for b in self.engine.layout.buckets for s in b.slots}
        canon = {id(p): n for n, p in self._model.named_parameters(remove_duplicate=True) if n in sharded}
        aliases, other = {}, {}
        for key, v in user.state_dict(keep_vars=True).items():
            if id(v) in canon:
                aliases[key] = canon[id(v)]
            else:
                other[key] = v
        return aliases, other

    def save_checkpoint(self, directory, tag: str | None = None):
        """Save this rank's shards, optimizer, scheduler, steps and RNG (every rank calls it).

        Written atomically: `directory/latest` names the last complete checkpoint. Loads on any
        number of ranks and any ZeRO stage (`load_checkpoint`); `dsc checkpoint consolidate`
        turns it into one plain state_dict.
        """
        aliases, other = self._state_names()
        return save_checkpoint(self.engine, other, aliases, self._plan, directory, tag)

    def load_checkpoint(self, directory, tag: str | None = None) -> None:
        """Load a checkpoint saved by `save_checkpoint` (any world size or stage; default: latest)."""
        _, other = self._state_names()
        load_checkpoint(self.engine, directory, tag, buffers=other)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full parameters and buffers under the original model's state_dict keys (copies).

        Under ZeRO-3 this gathers the shards: every rank must call it.
        """
        model = self._model.model if isinstance(self._model, _WithLoss) else self._model
        gm = self._program.gm
        gathered = self._engine.full_parameters() if isinstance(self._engine, Zero3Engine) else {}
        tp_layout = self._program.artifacts.get("tp_layout", {})
        canonical = {id(p): n for n, p in gm.named_parameters(remove_duplicate=True)}
        whole, done = {}, {}
        for name, p in gm.named_parameters(remove_duplicate=False):  # every alias of a tied weight
            canon = canonical[id(p)]
            if canon not in done:
                t = gathered.get(canon, p.detach())
                if canon in tp_layout:
                    t = tp_gather(t, tp_layout[canon], self._plan.tensor_parallel.size)
                done[canon] = t
            try:
                original = self._captured.gm.get_parameter(name)
            except AttributeError:
                continue
            whole[id(original)] = done[canon]
        return {k: whole[id(v)].clone() if id(v) in whole else v.detach().clone()
                for k, v in model.state_dict(keep_vars=True).items()}


__all__ = ["compile", "CompiledModel", "__version__"]
