"""The dsc plan: typed sections, validation, and resolution for a world size.

A `Plan` is what a user writes (or what a DeepSpeed config translates to). `Plan.resolve` fills
everything that depends on the world size or the model (data-parallel size, the batch triple,
"auto" bucket sizes) and records in `Plan.sources` where every value came from.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, field_validator

from .errors import PlanError, Problem

__all__ = ["Plan", "Parallel", "TensorParallel", "Fusion", "Zero", "Optimizer", "Scheduler", "Precision", "Batch",
           "DEFAULT_BUCKET_SIZE", "auto_bucket_size"]

DEFAULT_BUCKET_SIZE = 500_000_000


def _integral(v: Any) -> Any:
    """Accept 5e8-style floats for int fields (DeepSpeed configs write them); refuse booleans."""
    if isinstance(v, bool):
        raise ValueError(f"{v!r} — expected an integer, not a boolean")
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


PositiveInt = Annotated[int, BeforeValidator(_integral), Field(gt=0)]


def _bucket(v: Any) -> Any:
    """A positive element count (5e8 accepted) or "auto"."""
    if v == "auto":
        return v
    v = _integral(v)
    if not isinstance(v, int) or v <= 0:
        raise ValueError(f"{v!r} — expected a positive integer number of elements, or \"auto\"")
    return v


BucketSize = Annotated[int | Literal["auto"], BeforeValidator(_bucket)]


class Section(BaseModel):
    """Base of every plan section: immutable, unknown keys rejected, docstrings as descriptions."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class Parallel(Section):
    """How ranks are arranged: world_size = data_parallel_size × tensor_parallel.size, on a
    2-D mesh ("dp", "tp") with tensor-parallel ranks adjacent (rank = dp_index × tp + tp_index)."""

    data_parallel_size: PositiveInt | None = None
    """Number of data-parallel replicas. Omit to use world_size / tensor_parallel.size."""
    world_size: PositiveInt | None = None
    """Total number of ranks. Filled by `Plan.resolve`; leave it out of plan files."""


class Zero(Section):
    """ZeRO data parallelism (DeepSpeed's ``zero_optimization``)."""

    stage: int = 0
    """0: plain data parallel (all-reduce). 1: optimizer states sharded. 2: optimizer states and
    gradients sharded. 3: parameters sharded too, gathered just before use. Allowed: 0-3."""
    reduce_bucket_size: BucketSize = DEFAULT_BUCKET_SIZE
    """Gradient elements reduced per collective (DeepSpeed meaning: elements, not bytes).
    "auto": hidden_size² when the model's hidden size is known, else 500,000,000."""
    allgather_bucket_size: BucketSize = DEFAULT_BUCKET_SIZE
    """Parameter elements all-gathered per collective after a sharded step. "auto" as above."""
    prefetch_bucket_size: BucketSize = 50_000_000
    """ZeRO-3: parameter elements gathered together (and gradient elements reduce-scattered
    together), DeepSpeed's stage3_prefetch_bucket_size. "auto": hidden_size² as above."""
    param_persistence_threshold: Annotated[int, BeforeValidator(_integral), Field(ge=0)] = 100_000
    """ZeRO-3: parameters of at most this many elements are grouped into persistent buckets,
    gathered once per forward and kept for backward instead of re-gathered (still stored as
    shards between steps). DeepSpeed's stage3_param_persistence_threshold."""
    max_live_parameters: Annotated[int, BeforeValidator(_integral), Field(ge=1)] = 1_000_000_000
    """ZeRO-3: most parameter elements whole (gathered) at once, persistent buckets aside; fewer
    means less memory and more gathers. Below 3 buckets' worth dsc stops prefetching, below 2 it
    keeps one bucket whole at a time. DeepSpeed's stage3_max_live_parameters."""
    overlap_comm: bool = False
    """Overlap communication with compute: stages 0-2 reduce gradient buckets asynchronously
    during backward; stage 3 also prefetches each gather one bucket ahead."""
    reduce_scatter: bool = True
    """Reduce gradients with reduce-scatter (True) or all-reduce (False)."""
    contiguous_gradients: bool = True
    """Copy gradients into one contiguous buffer as they are produced. dsc always does (its
    gradient buckets are flat buffers); false is accepted for DeepSpeed configs and the ZeRO pass
    reports that it was declined."""

    @field_validator("stage", mode="before")
    @classmethod
    def _stage(cls, v: Any) -> Any:
        v = _integral(v)
        if v not in (0, 1, 2, 3):
            raise ValueError(f"{v!r} — not allowed; allowed: 0, 1, 2, 3")
        return v


class Optimizer(Section):
    """The optimizer, built by dsc (sharded under ZeRO)."""

    type: Literal["adamw", "adam", "sgd"]
    """"adamw": torch.optim.AdamW (decoupled weight decay). "adam": torch.optim.Adam (L2 weight
    decay added to the gradient). "sgd": torch.optim.SGD. Any case is accepted."""
    lr: float = Field(1e-3, ge=0)
    """Learning rate (the peak rate when a scheduler warms up to it)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW moment decay rates."""
    eps: float = Field(1e-8, ge=0)
    """Adam/AdamW denominator epsilon."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay (decoupled for adamw, L2 for adam and sgd)."""
    momentum: float = Field(0.0, ge=0)
    """SGD momentum."""
    dampening: float = Field(0.0, ge=0)
    """SGD dampening."""
    nesterov: bool = False
    """SGD Nesterov momentum."""

    @field_validator("type", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class Scheduler(Section):
    """Learning-rate schedule with DeepSpeed's semantics (deepspeed/runtime/lr_schedules.py)."""

    type: Literal["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"]
    """WarmupLR: warm up then hold. WarmupDecayLR: warm up then decay linearly to 0 at
    total_num_steps. WarmupCosineLR: warm up (as ratios of the optimizer lr) then cosine decay."""
    warmup_min_lr: float = Field(0.0, ge=0)
    """Learning rate at step 0 (WarmupLR, WarmupDecayLR)."""
    warmup_max_lr: float = Field(0.001, ge=0)
    """Learning rate at the end of warmup (WarmupLR, WarmupDecayLR)."""
    warmup_num_steps: PositiveInt = 1000
    """Warmup length in optimizer steps (DeepSpeed clamps it to at least 2)."""
    warmup_type: Literal["log", "linear"] = "log"
    """Warmup shape: logarithmic or linear."""
    total_num_steps: PositiveInt | None = Field(None, validate_default=True)
    """Run length in optimizer steps; required for WarmupDecayLR and WarmupCosineLR."""
    warmup_min_ratio: float = Field(0.0, ge=0)
    """WarmupCosineLR: start of warmup as a fraction of the optimizer lr."""
    cos_min_ratio: float = Field(0.0001, ge=0)
    """WarmupCosineLR: end of the cosine decay as a fraction of the optimizer lr."""

    @field_validator("total_num_steps")
    @classmethod
    def _needs_total(cls, v: int | None, info) -> int | None:
        kind = info.data.get("type")
        if v is None and kind in ("WarmupDecayLR", "WarmupCosineLR"):
            raise ValueError(f"required for {kind} (the decay needs the run length in steps)")
        return v


class Precision(Section):
    """Numeric precision of training (DeepSpeed's ``fp16`` / ``bf16`` / ``data_types``).

    bf16 and fp16 run the compiled graph under torch.autocast: matmuls and attention compute in
    the low dtype, precision-sensitive ops (softmax, norms, losses) in fp32, exactly as eager
    autocast does. Parameters, gradients and optimizer state stay fp32 — they are the master
    weights, held as shards under ZeRO-3 — so there is no second copy of the weights. fp16 adds
    loss scaling with DeepSpeed's semantics: an overflowed step is skipped and reported.
    """

    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute dtype of matmuls and attention. Allowed: fp32, bf16, fp16."""
    grad_accum_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Dtype gradients are accumulated (over micro-steps) and reduced (over data-parallel ranks)
    in: DeepSpeed's data_types.grad_accum_dtype. bf16/fp16 halve the gradient memory and the
    reduction traffic of ZeRO-0/1/2; the optimizer still updates fp32 master weights, converting
    one bucket's gradient at a time. Allowed: fp32, bf16, fp16."""
    loss_scale: float = Field(0.0, ge=0)
    """fp16: a fixed loss scale, or 0 for dynamic loss scaling."""
    initial_scale_power: int = Field(16, ge=0)
    """fp16 dynamic scaling: the first scale is 2**initial_scale_power."""
    loss_scale_window: PositiveInt = 1000
    """fp16 dynamic scaling: steps without overflow before the scale doubles."""
    hysteresis: PositiveInt = 2
    """fp16 dynamic scaling: overflows tolerated before the scale halves."""
    consecutive_hysteresis: bool = False
    """fp16 dynamic scaling: refill the hysteresis after every step without overflow."""
    min_loss_scale: float = Field(1.0, gt=0)
    """fp16 dynamic scaling: the scale never goes below this."""

    @field_validator("dtype", "grad_accum_dtype", mode="before")
    @classmethod
    def _aliases(cls, v: Any, info) -> Any:
        return {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}.get(v, v)


class Batch(Section):
    """Batch sizes, related by train_batch_size = micro_batch_size × gradient_accumulation_steps
    × data_parallel_size (DeepSpeed's rule). Give any two, or one; `Plan.resolve` derives the rest."""

    train_batch_size: PositiveInt | None = None
    """Samples per optimizer step, summed over all data-parallel ranks."""
    micro_batch_size: PositiveInt | None = None
    """Samples per forward/backward on one rank (DeepSpeed's train_micro_batch_size_per_gpu)."""
    gradient_accumulation_steps: PositiveInt | None = None
    """Micro-batches accumulated per optimizer step."""


TP_STYLES = ("colwise", "rowwise", "vocab", "replicate")


class TensorParallel(Section):
    """Tensor parallelism: weights split over `size` ranks, decided from the captured graph."""

    size: PositiveInt = 1
    """Ranks that split each sharded weight (1: off). Must divide world_size; the heads, hidden
    and vocabulary sizes of the sharded modules must divide by it."""
    rules: Literal["auto"] | dict[str, Literal["colwise", "rowwise", "vocab", "replicate"]] = "auto"
    """"auto": column-parallel for the first linear of each pair (q/k/v or fused qkv, up/gate),
    row-parallel for the second (output projection, down), vocabulary-parallel token embedding
    and LM head, everything else replicated. A table {module pattern: style} (fnmatch patterns
    over module names, e.g. "transformer.h.*.mlp.c_fc") overrides auto for the modules it
    matches. Styles: colwise, rowwise, vocab, replicate."""

    @field_validator("rules", mode="before")
    @classmethod
    def _rules(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for k, style in v.items():
                if style not in TP_STYLES:
                    raise ValueError(f"rules[{k!r}] = {style!r} — not a style; allowed: {', '.join(TP_STYLES)}"
                                     f"{_did_you_mean(style, TP_STYLES)}")
        elif v != "auto":
            raise ValueError(f"{v!r} — expected \"auto\" or a table {{module pattern: style}}")
        return v


def _did_you_mean(value: Any, allowed) -> str:
    import difflib
    close = difflib.get_close_matches(str(value), list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


FUSION_PATTERNS = ("pointwise", "layernorm", "rmsnorm", "softmax")


class Fusion(Section):
    """Kernel fusion: groups of memory-bound ops become one generated kernel each."""

    enabled: bool = False
    """Fuse (off by default)."""
    backend: Literal["auto", "triton", "cpu", "none"] = "auto"
    """"cpu": C/OpenMP kernels compiled with the system C compiler. "triton": Triton kernels
    (GPU; on CPU only under TRITON_INTERPRET=1, for testing). "auto": Triton for a model on the
    GPU, else cpu. "none": fuse nothing. An unavailable backend is declined in the report and
    the ops run unfused."""
    patterns: list[Literal["pointwise", "layernorm", "rmsnorm", "softmax"]] = list(FUSION_PATTERNS)
    """Which patterns to fuse: pointwise (chains of pointwise ops: bias/residual adds, GELU,
    SiLU, scale, ...), layernorm, rmsnorm, softmax (with scale and additive mask)."""


RESERVED = ("pipeline", "moe", "quantization", "pruning", "checkpoint")


class Plan(Section):
    """A dsc training plan. Load one with `dsc.schemas.load_plan`; resolve it for a world size
    with `Plan.resolve`; `Plan.sources` says where every resolved value came from."""

    schema_version: Literal[1] = 1
    """Version of this schema."""
    parallel: Parallel = Parallel()
    """Rank layout (data-parallel size)."""
    zero: Zero = Zero()
    """ZeRO sharding of optimizer states and gradients."""
    optimizer: Optimizer | None = None
    """Optimizer; None leaves the optimizer to the training script."""
    scheduler: Scheduler | None = None
    """Learning-rate schedule; None means a constant learning rate."""
    precision: Precision = Precision()
    """Numeric precision."""
    batch: Batch = Batch()
    """Batch sizes (resolved with the data-parallel size)."""
    gradient_clipping: float = Field(0.0, ge=0)
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    tensor_parallel: TensorParallel = TensorParallel()
    """Tensor parallelism (size 1: off)."""
    pipeline: Any = None
    """Reserved for pipeline parallelism; not supported yet in this dsc version."""
    moe: Any = None
    """Reserved for mixture-of-experts / expert parallelism; not supported yet in this dsc version."""
    quantization: Any = None
    """Reserved for weight quantization; not supported yet in this dsc version."""
    pruning: Any = None
    """Reserved for pruning; not supported yet in this dsc version."""
    fusion: Fusion = Fusion()
    """Kernel fusion and code generation (off by default)."""
    checkpoint: Any = None
    """Reserved for checkpointing options; not supported yet in this dsc version."""

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator(*RESERVED)
    @classmethod
    def _reserved(cls, v: Any, info) -> Any:
        if v is not None:
            raise ValueError("not supported yet in this dsc version (remove the section)")
        return v

    @property
    def sources(self) -> dict[str, str]:
        """Origin of every leaf key path: "plan", "default", "derived (...)", "deepspeed:<key>",
        or "auto: ...". Complete after `resolve`."""
        return dict(self._sources) or leaf_sources(self)

    def with_sources(self, given: dict[str, str]) -> "Plan":
        """A copy whose sources are `given` over what the plan itself says (given or default)."""
        new = self.model_copy()
        new._sources = {**leaf_sources(self), **given}
        return new

    def resolve(self, world_size: int, *, model_info: dict | None = None) -> "Plan":
        """Fill world and data-parallel size, the batch triple and "auto" values for `world_size`.

        Raises PlanError naming the keys and numbers when they cannot be made consistent.
        `model_info` may hold ``{"num_params": int, "hidden_size": int | None}``.
        """
        sources = {**leaf_sources(self), **self._sources}
        problems: list[Problem] = []
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise PlanError([Problem("parallel.world_size", world_size,
                                     f"{world_size!r} — must be a positive integer")])
        dp = self.parallel.data_parallel_size
        tp = self.tensor_parallel.size
        if world_size % tp:
            raise PlanError([Problem("tensor_parallel.size", tp,
                                     f"{tp} does not divide world_size {world_size}; allowed: "
                                     f"{[d for d in range(1, world_size + 1) if world_size % d == 0]}")],
                            f"plan cannot be resolved for world_size {world_size}")
        if dp is None:
            dp = world_size // tp
            sources["parallel.data_parallel_size"] = (f"derived (= world_size {world_size})" if tp == 1 else
                                                      f"derived (world_size {world_size} / tensor_parallel.size {tp})")
        elif dp * tp != world_size:
            problems.append(Problem(
                "parallel.data_parallel_size", dp,
                f"{dp} × tensor_parallel.size {tp} does not match world_size {world_size} (every rank is "
                f"one data-parallel replica's tensor-parallel part: use {world_size // tp} or omit it)"))
        sources["parallel.world_size"] = f"derived (world size {world_size} given to resolve)"

        b = self.batch
        batch, reasons, batch_problems = resolve_batch(
            b.train_batch_size, b.micro_batch_size, b.gradient_accumulation_steps, dp)
        problems += batch_problems
        for key, why in reasons.items():
            sources[f"batch.{key}"] = why

        zero_update = {}
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self.zero, key) == "auto":
                zero_update[key], why = auto_bucket_size(model_info)
                sources[f"zero.{key}"] = f"auto: {why}"
        if problems:
            raise PlanError(problems, f"plan cannot be resolved for world_size {world_size}")

        new = self.model_copy(update={
            "parallel": self.parallel.model_copy(
                update={"world_size": world_size, "data_parallel_size": dp}),
            "batch": self.batch.model_copy(update=batch),
            "zero": self.zero.model_copy(update=zero_update),
        })
        new._sources = sources
        return new

    @classmethod
    def from_deepspeed(cls, cfg: Any, world_size: int = 1, strict: bool = False,
                       model_info: dict | None = None) -> "Plan":
        """Translate a DeepSpeed config (dict, JSON text or path), validate and resolve it."""
        from .load import load_plan
        return load_plan(cfg, world_size=world_size, strict=strict, model_info=model_info,
                         deepspeed=True)


def leaf_sources(model: BaseModel, prefix: str = "") -> dict[str, str]:
    """"plan" or "default" for every leaf key path, from pydantic's record of the keys given."""
    out = {}
    for name in type(model).model_fields:
        path, value = prefix + name, getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(leaf_sources(value, path + ".") if name in model.model_fields_set
                       else {k: "default" for k in leaf_sources(value, path + ".")})
        else:
            out[path] = "plan" if name in model.model_fields_set else "default"
    return out


def auto_bucket_size(model_info: dict | None) -> tuple[int, str]:
    """A ZeRO bucket size for "auto": hidden_size² (what HF Trainer/Accelerate fill in)."""
    hidden = (model_info or {}).get("hidden_size")
    if hidden:
        return hidden * hidden, f"hidden_size² = {hidden}² = {hidden * hidden}"
    return DEFAULT_BUCKET_SIZE, f"{DEFAULT_BUCKET_SIZE} (default; the model's hidden_size is unknown)"


def resolve_batch(tbs: int | None, micro: int | None, gas: int | None, dp: int
                  ) -> tuple[dict[str, int], dict[str, str], list[Problem]]:
    """DeepSpeed's rule train_batch_size = micro × gas × dp: derive what is missing.

    Returns (values, reasons for derived values, problems).
    """
    def bad(path, value, msg):
        return {}, {}, [Problem(f"batch.{path}", value, msg)]

    reasons = {}
    if tbs is not None and micro is not None and gas is not None:
        if tbs != micro * gas * dp:
            return bad("train_batch_size", tbs,
                       f"train_batch_size {tbs} != micro_batch_size {micro} × "
                       f"gradient_accumulation_steps {gas} × data_parallel_size {dp} = {micro * gas * dp}")
    elif tbs is not None and micro is not None:
        if tbs % (micro * dp):
            return bad("train_batch_size", tbs,
                       f"train_batch_size {tbs} is not divisible by micro_batch_size {micro} × "
                       f"data_parallel_size {dp}")
        gas = tbs // (micro * dp)
        reasons["gradient_accumulation_steps"] = (
            f"derived (train_batch_size {tbs} / (micro_batch_size {micro} × data_parallel_size {dp}))")
    elif tbs is not None:
        if gas is None:
            gas = 1
            reasons["gradient_accumulation_steps"] = "derived (1: only train_batch_size given)"
        if tbs % (gas * dp):
            return bad("train_batch_size", tbs,
                       f"train_batch_size {tbs} is not divisible by gradient_accumulation_steps "
                       f"{gas} × data_parallel_size {dp}")
        micro = tbs // (gas * dp)
        reasons["micro_batch_size"] = (
            f"derived (train_batch_size {tbs} / (gradient_accumulation_steps {gas} × "
            f"data_parallel_size {dp}))")
    elif micro is not None:
        if gas is None:
            gas = 1
            reasons["gradient_accumulation_steps"] = "derived (1: only micro_batch_size given)"
    elif gas is not None:
        return bad("gradient_accumulation_steps", gas,
                   f"gradient_accumulation_steps {gas} given alone; also give micro_batch_size or train_batch_size "
                   "(DeepSpeed: 'Either train_batch_size or train_micro_batch_size_per_gpu needs "
                   "to be provided')")
    else:
        micro, gas = 1, 1
        reasons["micro_batch_size"] = "derived (1: no batch size given)"
        reasons["gradient_accumulation_steps"] = "derived (1: no batch size given)"
    if tbs is None:
        tbs = micro * gas * dp
        reasons["train_batch_size"] = (
            f"derived (micro_batch_size {micro} × gradient_accumulation_steps {gas} × "
            f"data_parallel_size {dp})")
    values = {"train_batch_size": tbs, "micro_batch_size": micro, "gradient_accumulation_steps": gas}
    return values, reasons, []
