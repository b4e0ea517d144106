"""Translate a DeepSpeed ``ds_config.json`` into a native dsc plan dict.

Every key of the DeepSpeed config ends up in exactly one of three places: translated (recorded in
`Translation.sources` as ``deepspeed:<key path>``), reported as a `Problem` (unsupported,
deprecated, unknown, or not runnable), or listed in `Translation.notes` (no effect on training:
logging, implementation choices, settings of features that are off). Nothing is dropped silently.

Semantics follow DeepSpeed (deepspeed/runtime/config.py, zero/config.py, lr_schedules.py and
engine.py ``_configure_basic_optimizer``); "auto" values follow what HF Trainer/Accelerate fill in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Problem, did_you_mean
from .plan import auto_bucket_size

__all__ = ["Translation", "translate_deepspeed", "is_deepspeed_config", "DEEPSPEED_KEYS"]

BATCH_KEYS = {"train_batch_size": "batch.train_batch_size",
              "train_micro_batch_size_per_gpu": "batch.micro_batch_size",
              "gradient_accumulation_steps": "batch.gradient_accumulation_steps"}

# Top-level keys with no effect on what is trained: reported as notes.
NOTE_KEYS = {
    "steps_per_print": "only affects logging",
    "wall_clock_breakdown": "only affects logging (timing breakdown)",
    "memory_breakdown": "only affects logging (memory breakdown)",
    "dump_state": "only affects logging (prints the engine state)",
    "timers": "only affects logging (engine timers)",
    "comms_logger": "only affects logging (communication logger)",
    "zero_allow_untested_optimizer": "DeepSpeed's safety switch for client optimizers under ZeRO; "
                                     "dsc builds the optimizer itself",
    "zero_force_ds_cpu_optimizer": "selects DeepSpeed's CPU Adam for offload; dsc does not offload",
    "dataloader_drop_last": "dsc does not build the data loader",
    "aio": "asynchronous I/O settings for NVMe offload, which dsc does not do",
    "graph_harvesting": "CUDA-graph capture inside DeepSpeed's engine; ignored",
    "use_data_before_expert_parallelism": "MoE data-order switch; dsc has no expert parallelism yet",
    "disable_allgather": "legacy ZeRO switch; ignored",
}

# Top-level DeepSpeed features dsc does not have: a warning unless the section is disabled.
FEATURE_KEYS = {
    "activation_checkpointing": "activation checkpointing (recompute activations in backward)",
    "tensorboard": "TensorBoard monitoring output",
    "wandb": "Weights & Biases monitoring output",
    "csv_monitor": "CSV monitoring output",
    "comet": "Comet monitoring output",
    "flops_profiler": "the FLOPs profiler",
    "autotuning": "DeepSpeed's autotuner",
    "elasticity": "elastic training",
    "pipeline": "pipeline-engine settings (pipeline parallelism is planned)",
    "curriculum_learning": "curriculum learning",
    "data_efficiency": "data-efficiency sampling/routing",
    "compression_training": "compression training (quantization and pruning are planned)",
    "checkpoint": "checkpoint options",
    "sparse_attention": "sparse attention",
    "eigenvalue": "eigenvalue computation (legacy MoQ; current DeepSpeed reads it only together "
                  "with compression_training weight quantization)",
    "quantize_training": "MoQ quantize-aware training (legacy; current DeepSpeed ignores it)",
    "progressive_layer_drop": "progressive layer drop",
    "nebula": "Nebula checkpoint service",
    "hybrid_engine": "the RLHF hybrid engine",
    "expert_parallel": "expert parallelism (AutoEP; MoE is planned)",
    "sequence_parallel_size": "sequence parallelism",
    "amp": "NVIDIA Apex AMP mixed precision",
    "torch_autocast": "torch.autocast mixed precision",
    "sparse_gradients": "sparse embedding gradients",
    "weight_quantization": "weight quantization",
}

HANDLED_KEYS = {"optimizer", "scheduler", "zero_optimization", "fp16", "bf16", "bfloat16",
                "gradient_clipping", "prescale_gradients", "gradient_predivide_factor",
                "data_types", "communication_data_type", "seq_parallel_communication_data_type",
                "compile", "tensor_parallel", *BATCH_KEYS}
DEEPSPEED_KEYS = frozenset(HANDLED_KEYS | set(NOTE_KEYS) | set(FEATURE_KEYS))

ZERO_MAPPED = ("stage", "reduce_bucket_size", "allgather_bucket_size", "overlap_comm",
               "reduce_scatter", "contiguous_gradients")
ZERO_NOTES = {
    "allgather_partitions": "all-gather (true) or broadcast of updated partitions; same result, "
                            "dsc always all-gathers",
    "sub_group_size": "optimizer-step grouping used by ZeRO-3 and offload",
    "round_robin_gradients": "gradient-partition ordering for offload; same result",
    "ignore_unused_parameters": "ZeRO-2/3 tolerance for unused parameters; dsc reduces every gradient",
    "legacy_stage1": "legacy ZeRO-1 implementation switch",
    "elastic_checkpoint": "checkpoint layout option",
    "load_from_fp32_weights": "checkpoint loading option",
    "use_multi_rank_bucket_allreduce": "bucketing implementation choice",
    "memory_efficient_linear": "ZeRO-3 linear implementation choice",
    "override_module_apply": "ZeRO-3 module hook option",
    "pipeline_loading_checkpoint": "ZeRO-3 checkpoint loading option",
    "log_trace_cache_warnings": "only affects logging",
    "module_granularity_threshold": "ZeRO-3 hook granularity",
    "leaf_module": "ZeRO-3 leaf modules",
    "use_all_reduce_for_fetch_params": "ZeRO-3 fetch implementation choice",
    "stage3_gather_16bit_weights_on_model_save": "ZeRO-3 save option; dsc saves unsharded weights",
}
ZERO_FEATURES = {
    "offload_optimizer": "optimizer-state offload to CPU/NVMe",
    "offload_param": "parameter offload to CPU/NVMe",
    "cpu_offload": "optimizer-state offload to CPU",
    "cpu_offload_params": "parameter offload to CPU",
    "cpu_offload_use_pin_memory": "pinned memory for CPU offload",
    "zenflow": "ZenFlow asynchronous offloaded updates",
    "zero_hpz_partition_size": "ZeRO++ hierarchical partitioning",
    "zero_quantized_weights": "ZeRO++ quantized weight communication",
    "zero_quantized_gradients": "ZeRO++ quantized gradient communication",
    "zero_quantized_nontrainable_weights": "ZeRO++ quantized frozen weights",
    "mics_shard_size": "MiCS sharding",
    "mics_hierarchical_params_gather": "MiCS hierarchical gather",
}
ZERO_RENAMED = {  # deprecated or field-name spelling -> DeepSpeed's current key
    "cpu_offload": "offload_optimizer",
    "cpu_offload_params": "offload_param",
    "cpu_offload_use_pin_memory": "offload_param.pin_memory / offload_optimizer.pin_memory",
    "stage3_gather_fp16_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
    "gather_16bit_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
}
FP16_MAPPED = {"loss_scale": "loss_scale", "initial_scale_power": "initial_scale_power",
               "loss_scale_window": "loss_scale_window", "hysteresis": "hysteresis",
               "consecutive_hysteresis": "consecutive_hysteresis", "min_loss_scale": "min_loss_scale"}
ZERO3_MAPPED = {"stage3_prefetch_bucket_size": "prefetch_bucket_size",
                "stage3_param_persistence_threshold": "param_persistence_threshold",
                "stage3_max_live_parameters": "max_live_parameters"}
ZERO_KNOWN = {*ZERO_MAPPED, *ZERO3_MAPPED, *ZERO_NOTES, *ZERO_FEATURES, *ZERO_RENAMED}

OPTIMIZER_PARAMS = {"adam": ("lr", "betas", "eps", "weight_decay"),
                    "adamw": ("lr", "betas", "eps", "weight_decay"),
                    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov")}
HF_OPTIMIZER_DEFAULTS = {"lr": 5e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
SCHEDULER_PARAMS = {
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"),
    "WarmupDecayLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                      "total_num_steps"),
    "WarmupCosineLR": ("total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio",
                       "warmup_type"),
}

NATIVE_ONLY = {"schema_version", "zero", "batch", "parallel", "precision"}
SHARED_KEYS = {"optimizer", "scheduler", "gradient_clipping", "tensor_parallel", "pipeline", "checkpoint"}


@dataclass
class Translation:
    """Result of `translate_deepspeed`."""

    plan_dict: dict
    """A native plan dict (validate with ``Plan.model_validate``)."""
    problems: list[Problem] = field(default_factory=list)
    """Unsupported, deprecated or unknown DeepSpeed keys, by DeepSpeed key path."""
    notes: list[str] = field(default_factory=list)
    """``"<deepspeed key path>: <what happened>"`` for keys with no effect on training."""
    sources: dict[str, str] = field(default_factory=dict)
    """Native key path -> ``"deepspeed:<key path>"`` (plus how "auto" was filled)."""


def is_deepspeed_config(d: dict) -> bool:
    """True for a DeepSpeed config, False for a native dsc plan (see module docstring)."""
    if not isinstance(d, dict) or set(d) & NATIVE_ONLY:
        return False
    if set(d) & (DEEPSPEED_KEYS - SHARED_KEYS):
        return True
    tp = d.get("tensor_parallel")
    if isinstance(tp, dict) and "autotp_size" in tp:
        return True
    return any(isinstance(d.get(k), dict) and isinstance(d[k].get("params"), dict)
               for k in ("optimizer", "scheduler"))


def translate_deepspeed(cfg: dict | str | Path, *, world_size: int = 1,
                        model_info: dict | None = None) -> Translation:
    """Translate a DeepSpeed config (dict, JSON text or path) into a native plan dict.

    `world_size` is accepted for symmetry with `load_plan` (batch sizes are resolved later, by
    `Plan.resolve`); `model_info` (``{"hidden_size": ...}``) resolves "auto" bucket sizes.
    """
    if not isinstance(cfg, dict):
        from .load import read_json
        cfg = read_json(cfg)
    t = _Translator(model_info or {})
    t.run(cfg)
    return Translation(t.plan, t.problems, t.notes, t.sources)


def _int(v: Any) -> Any:
    """5e8 -> 500000000; anything else unchanged (plan validation reports bad values)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _disabled(v: Any) -> bool:
    """A feature section that is switched off: false/null, {"enabled": false}, or device none."""
    if v is None or v is False:
        return True
    if isinstance(v, dict):
        return v.get("enabled") is False or v.get("device") == "none"
    return False


class _Translator:
    """Walks a DeepSpeed config once, filling a plan dict, problems, notes and sources."""

    def __init__(self, model_info: dict):
        self.model_info = model_info
        self.plan: dict = {}
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self.sources: dict[str, str] = {}

    def warn(self, path: str, value: Any, message: str) -> None:
        self.problems.append(Problem(path, value, message, "warning"))

    def error(self, path: str, value: Any, message: str) -> None:
        self.problems.append(Problem(path, value, message, "error"))

    def note(self, path: str, message: str) -> None:
        self.notes.append(f"{path}: {message}")

    def put(self, native: str, value: Any, ds_path: str, how: str = "") -> None:
        section, _, key = native.rpartition(".")
        (self.plan.setdefault(section, {}) if section else self.plan)[key] = value
        self.sources[native] = f"deepspeed:{ds_path}" + (f" ({how})" if how else "")

    def run(self, cfg: dict) -> None:
        # The optimizer goes first: scheduler "auto" values read its learning rate.
        for key in sorted(cfg, key=lambda k: k != "optimizer"):
            value = cfg[key]
            if key in BATCH_KEYS:
                continue
            elif key == "optimizer":
                self.optimizer(value)
            elif key == "scheduler":
                self.scheduler(value)
            elif key == "zero_optimization":
                self.zero(value)
            elif key in ("fp16", "bf16", "bfloat16"):
                self.precision(key, value)
            elif key == "gradient_clipping":
                if value == "auto":
                    self.put("gradient_clipping", 1.0, key, "auto: 1.0, HF Trainer's max_grad_norm")
                    self.note(key, "'auto' — dsc uses 1.0 (HF Trainer's default max_grad_norm)")
                else:
                    self.put("gradient_clipping", value, key)
            elif key in NOTE_KEYS:
                self.note(key, f"ignored: {NOTE_KEYS[key]}")
            elif key in FEATURE_KEYS:
                self.feature(key, value, FEATURE_KEYS[key])
            else:
                self.other(key, value)
        self.batch(cfg)

    def feature(self, path: str, value: Any, what: str) -> None:
        if _disabled(value) or (path.endswith("_size") and value == 1):
            self.note(path, f"{what} is off; ignored")
        else:
            self.warn(path, value, f"{what} is not supported yet by dsc; ignored")

    def other(self, key: str, value: Any) -> None:
        """Top-level keys whose effect depends on their value, and unknown keys."""
        if key == "prescale_gradients":
            if value:
                self.warn(key, value, "prescaling gradients before the all-reduce is not supported "
                                      "yet; dsc averages after the reduction (DeepSpeed's default)")
            else:
                self.note(key, "ignored: false is DeepSpeed's default (average after reduction)")
        elif key == "gradient_predivide_factor":
            if value == 1 or value == 1.0:
                self.note(key, "ignored: 1.0 is DeepSpeed's default")
            else:
                self.warn(key, value, "gradient pre-division is not supported yet; ignored")
        elif key in ("communication_data_type", "seq_parallel_communication_data_type"):
            if value in (None, "fp32", "float32"):
                self.note(key, "ignored: dsc communicates in fp32")
            else:
                self.warn(key, value, "reduced-precision communication is not supported yet; "
                                      "dsc communicates in fp32")
        elif key == "data_types":
            for sub, v in (value or {}).items():
                dt = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
                      "float16": "fp16"}.get(v) if isinstance(v, str) else None
                if sub == "grad_accum_dtype" and dt:
                    self.put("precision.grad_accum_dtype", dt, f"{key}.{sub}")
                elif sub == "grad_accum_dtype" and v is None:
                    self.note(f"{key}.{sub}", "unset: dsc accumulates gradients in fp32")
                else:
                    self.warn(f"{key}.{sub}", v, "not supported; allowed grad_accum_dtype: fp32, bf16, fp16")
        elif key == "compile":
            for sub, v in (value or {}).items():
                if sub == "passes":
                    self.warn(f"{key}.{sub}", v, "DeepCompile passes are not supported; dsc "
                                                 "applies its own passes from the plan")
                else:
                    self.note(f"{key}.{sub}", "ignored: dsc compiles the model itself")
        elif key == "tensor_parallel":
            for sub, v in (value or {}).items():
                if sub == "autotp_size":
                    if v not in (None, 0):
                        self.put("tensor_parallel.size", v, f"{key}.{sub}",
                                 "dsc shards from the graph (rules: auto), no per-model policy needed")
                else:
                    self.note(f"{key}.{sub}", "AutoTP setting; ignored (dsc decides sharding from the graph; "
                                              "override per module with tensor_parallel.rules)")
        else:
            self.warn(key, value, f"unknown DeepSpeed key{did_you_mean(key, DEEPSPEED_KEYS)}; ignored")

    def batch(self, cfg: dict) -> None:
        given = {k: cfg[k] for k in BATCH_KEYS if k in cfg}
        numeric = {k: v for k, v in given.items() if v != "auto"}
        for k, v in numeric.items():
            self.put(BATCH_KEYS[k], _int(v), k)
        for k in (k for k, v in given.items() if v == "auto"):
            if k == "train_batch_size" or len(numeric) >= 2 or "train_batch_size" in numeric:
                self.note(k, "'auto' — derived by train_batch_size = micro × accumulation × "
                             "data-parallel size (as HF Trainer fills it)")
            else:
                self.put(BATCH_KEYS[k], 1, k, "auto: 1, HF Trainer's default")
                self.note(k, "'auto' — dsc uses 1 (HF Trainer's default per_device_train_batch_size "
                             "/ gradient_accumulation_steps)")
        if not {"train_batch_size", "train_micro_batch_size_per_gpu"} & set(given):
            if "gradient_accumulation_steps" not in given:
                self.warn("train_micro_batch_size_per_gpu", None,
                          "no batch size given; DeepSpeed refuses this ('Either train_batch_size or "
                          "train_micro_batch_size_per_gpu needs to be provided'); dsc uses "
                          "micro batch size 1 and gradient accumulation 1")

    def precision(self, key: str, value: Any) -> None:
        name = "bf16" if key == "bfloat16" else key
        if key == "bfloat16":
            self.warn(key, value, "deprecated DeepSpeed name; the current key is 'bf16' (read as bf16)")
        if not isinstance(value, dict):
            self.warn(key, value, "expected an object like {\"enabled\": true}; ignored")
            return
        enabled = value.get("enabled", False) is True
        for sub, v in value.items():
            path = f"{key}.{sub}"
            if sub == "enabled":
                if v is True:
                    self.put("precision.dtype", name, path, "autocast compute, fp32 master weights")
                elif v == "auto":
                    self.note(path, "'auto' (HF Trainer fills it from --fp16/--bf16); dsc trains in fp32")
                else:
                    self.note(path, f"{name} off")
            elif name == "fp16" and sub in FP16_MAPPED:
                if enabled:
                    self.put(f"precision.{FP16_MAPPED[sub]}", v, path)
                else:
                    self.note(path, "ignored: fp16 is off")
            elif enabled and sub in ("fp16_master_weights_and_grads", "bf16_master_weights_and_grads",
                                     "bf16_optimizer_states", "immediate_grad_update", "auto_cast"):
                self.warn(path, v, f"{name} option not supported yet; dsc keeps fp32 master weights, "
                                   "gradients and optimizer state and computes under autocast")
            else:
                self.note(path, f"ignored: {name} setting" + ("" if enabled else f" ({name} is off)"))

    def zero(self, cfg: Any) -> None:
        if not isinstance(cfg, dict):
            self.error("zero_optimization", cfg, "expected an object like {\"stage\": 2}")
            return
        stage = _int(cfg.get("stage", 0))
        for key, v in cfg.items():
            path = f"zero_optimization.{key}"
            if key == "gather_16bit_weights_on_model_save":
                self.warn(path, v, "DeepSpeed's internal field name; the documented key is "
                                   f"'{ZERO_RENAMED[key]}'")
            elif key in ZERO_RENAMED:
                self.warn(path, v, f"deprecated DeepSpeed name; the current key is "
                                   f"'{ZERO_RENAMED[key]}'")
            if key == "stage":
                self.put("zero.stage", _int(v), path)
            elif key in ("reduce_bucket_size", "allgather_bucket_size") and v == "auto":
                size, why = auto_bucket_size(self.model_info)
                self.put(f"zero.{key}", size, path, f"auto: {why}")
            elif key in ZERO3_MAPPED:
                native = ZERO3_MAPPED[key]
                if v == "auto" and native == "prefetch_bucket_size":
                    size, why = auto_bucket_size(self.model_info)
                    self.put(f"zero.{native}", size, path, f"auto: {why}")
                elif v == "auto":
                    self.note(path, "'auto' (HF fills it from the model); dsc keeps its default")
                elif stage == 3:
                    self.put(f"zero.{native}", _int(v), path)
                else:
                    self.note(path, f"ignored: ZeRO-3 setting; no effect at stage {stage}")
            elif key in ZERO_MAPPED:
                self.put(f"zero.{key}", _int(v), path)
            elif key in ZERO_FEATURES:
                if _disabled(v) or v in (0, 1) and key in ("zero_hpz_partition_size", "mics_shard_size"):
                    self.note(path, f"{ZERO_FEATURES[key]} is off; ignored")
                else:
                    self.warn(path, v, f"{ZERO_FEATURES[key]} is not supported yet by dsc; ignored")
            elif stage == 3 and key.startswith("stage3_") and key not in ZERO_NOTES and key not in ZERO_RENAMED:
                self.warn(path, v, "this ZeRO-3 knob is not supported yet by dsc; ignored (dsc gathers "
                                   "whole buckets, prefetched one ahead when overlap_comm is on)")
            elif key in ZERO_NOTES or key.startswith("stage3_") or key in ZERO_RENAMED:
                what = ZERO_NOTES.get(key, "ZeRO-3 setting")
                auto = " ('auto' is filled by HF from the model)" if v == "auto" else ""
                effect = "not supported yet" if stage == 3 else f"no effect at stage {stage}"
                self.note(path, f"ignored: {what}{auto}; {effect}")
            else:
                self.warn(path, v, f"unknown ZeRO key{did_you_mean(key, ZERO_KNOWN)}; ignored")

    def optimizer(self, cfg: Any) -> None:
        if not isinstance(cfg, dict):
            self.error("optimizer", cfg, "expected an object like {\"type\": \"AdamW\", \"params\": {...}}")
            return
        for key in cfg:
            if key not in ("type", "params"):
                self.warn(f"optimizer.{key}", cfg[key],
                          f"unknown key{did_you_mean(key, ['type', 'params'])}; ignored")
        typ, params = cfg.get("type"), cfg.get("params") or {}
        kind = typ.lower() if isinstance(typ, str) else None
        if kind not in OPTIMIZER_PARAMS:
            self.error("optimizer.type", typ, f"{typ!r} is not supported by dsc; supported: "
                                              "Adam, AdamW, SGD (any case)")
            if params:
                self.note("optimizer.params", f"not translated: optimizer type {typ!r} is not supported")
            return
        native, how = kind, ""
        if kind == "adam":  # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false (engine.py)
            native = "adam" if params.get("adam_w_mode", True) is False else "adamw"
            how = ("adam_w_mode false: L2 weight decay" if native == "adam"
                   else "DeepSpeed Adam defaults to adam_w_mode true: decoupled weight decay")
        self.put("optimizer.type", native, "optimizer.type", how)
        for key, v in params.items():
            path = f"optimizer.params.{key}"
            if key in OPTIMIZER_PARAMS[kind]:
                if v == "auto" and key in HF_OPTIMIZER_DEFAULTS:
                    v = HF_OPTIMIZER_DEFAULTS[key]
                    self.warn(path, "auto", f"'auto' is normally filled by HF Trainer; dsc uses "
                                            f"{key} = {v} (HF Trainer's default)")
                    self.put(f"optimizer.{key}", v, path, f"auto: HF Trainer default {v}")
                else:
                    self.put(f"optimizer.{key}", v, path)
            elif key == "adam_w_mode" and kind in ("adam", "adamw"):
                self.note(path, f"{v!r} -> dsc optimizer type {native!r}")
            elif key == "torch_adam":
                self.note(path, "ignored: implementation choice (torch.optim or DeepSpeed's fused "
                                "kernel); dsc uses torch.optim")
            elif key in ("fused", "foreach", "capturable"):
                self.note(path, "ignored: implementation choice")
            elif key == "bias_correction" and v is True:
                self.note(path, "ignored: true is the default")
            elif key == "amsgrad" and v is False:
                self.note(path, "ignored: false is the default")
            elif key == "max_grad_norm":
                self.error(path, v, "DeepSpeed rejects this optimizer parameter; use the "
                                    "top-level 'gradient_clipping' instead")
            elif key in ("bias_correction", "amsgrad"):
                self.warn(path, v, f"{key}={v!r} is not supported by dsc; ignored (torch.optim "
                                   "defaults apply)")
            else:
                self.warn(path, v, f"not a parameter dsc knows for {typ}"
                                   f"{did_you_mean(key, OPTIMIZER_PARAMS[kind])}; ignored")

    def scheduler(self, cfg: Any) -> None:
        if not isinstance(cfg, dict):
            self.error("scheduler", cfg, "expected an object like {\"type\": \"WarmupLR\", \"params\": {...}}")
            return
        for key in cfg:
            if key not in ("type", "params"):
                self.warn(f"scheduler.{key}", cfg[key],
                          f"unknown key{did_you_mean(key, ['type', 'params'])}; ignored")
        typ, params = cfg.get("type"), cfg.get("params") or {}
        if typ not in SCHEDULER_PARAMS:
            self.error("scheduler.type", typ, f"{typ!r} is not supported by dsc; supported: "
                                              f"{', '.join(SCHEDULER_PARAMS)}")
            if params:
                self.note("scheduler.params", f"not translated: scheduler type {typ!r} is not supported")
            return
        self.put("scheduler.type", typ, "scheduler.type")
        lr = self.plan.get("optimizer", {}).get("lr", HF_OPTIMIZER_DEFAULTS["lr"])
        hf_auto = {"warmup_min_lr": (0.0, "HF Trainer's value"),
                   "warmup_max_lr": (lr, "the optimizer's learning rate, as HF Trainer does"),
                   "warmup_num_steps": (1, "HF Trainer's default warmup of 0 steps is rejected by "
                                           "DeepSpeed; 1 is the smallest accepted value")}
        for key, v in params.items():
            path = f"scheduler.params.{key}"
            if key == "last_batch_iteration":
                if v == -1:
                    self.note(path, "ignored: -1 (start from the beginning) is the default")
                else:
                    self.warn(path, v, "resuming a schedule mid-way is not supported yet; ignored")
            elif key not in SCHEDULER_PARAMS[typ]:
                self.warn(path, v, f"not a parameter of {typ} (DeepSpeed would fail with a "
                                   f"TypeError){did_you_mean(key, SCHEDULER_PARAMS[typ])}; ignored")
            elif v == "auto" and key == "total_num_steps":
                self.error(path, v, "'auto' cannot be resolved: dsc does not know the run length; "
                                    "give the number of optimizer steps")
                self.sources["scheduler.total_num_steps"] = f"deepspeed:{path} (auto: unresolved)"
            elif v == "auto" and key in hf_auto:
                value, why = hf_auto[key]
                self.warn(path, "auto", f"'auto' is normally filled by HF Trainer; dsc uses "
                                        f"{key} = {value} ({why})")
                self.put(f"scheduler.{key}", value, path, f"auto: {value}, {why}")
            else:
                self.put(f"scheduler.{key}", _int(v), path)
