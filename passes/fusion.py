"""Kernel fusion: groups of memory-bound aten ops become one generated kernel each.

Requires: `meta["val"]` on every node (annotate_shapes). Runs after the parallelism passes, so it
fuses this rank's local ops.
Guarantees: every fused group is replaced by one call of a custom op `torch.ops.dsc_fused.<name>`
(a torch.library op with a fake implementation, so the graph stays traceable and `rankR.py`
shows the kernel by name) that returns the group's escaping values; ops it could not fuse stay as
they were and are listed, with the reason, in the pass record's `declined`. A group is declined
where a kernel could change the result (`_unsafe`: an input modified in place in the graph, an
output eager keeps non-row-major; ops a kernel does not compute as eager does stay out of groups).
At run time a kernel that cannot run (Triton's compile at the first launch, a dtype built at its
first call) makes its group run the original ops from then on, with a warning.
`ctx.artifacts["kernels"]`: one entry per generated kernel (name, backend, pattern, the ops it
replaced, its source file).
Reads node.meta: `val`. Writes node.meta: `val` on new nodes, `dsc.kernel` on fused nodes.

Patterns (plan `fusion.patterns`):
- pointwise: any connected group of pointwise ops (add/sub/mul/div, bias and residual adds,
  GELU exact/tanh and its decomposed form, SiLU, sigmoid, tanh, exp, ReLU, scale, pow by small
  integers, rsqrt, no-op casts, dropout) whose intermediate values are used only inside the
  group; operands may be full tensors, per-column vectors (biases), per-row values, trailing
  dimensions repeated over the leading ones (position embeddings) or
  scalars. Several escaping values make a multi-output kernel. Dequantize prologues: an integer
  tensor (int8, uint8, int16, int32) cast to the group's float dtype joins as an input the kernel
  converts as it loads it, so `(q.float() - zero) * scale` and its use are one pass over the
  integers (weight-only quantization); integer inputs get no gradient.
- layernorm: `aten.layer_norm` over the last dimension (weight and bias optional).
- rmsnorm: the decomposed RMSNorm of Llama-style models (pow 2, mean, add eps, rsqrt, mul, weight).
  Either norm takes the residual add that computes its input (h = x + r, two same-shape tensors)
  into its kernel, which then writes h and norm(h) in one pass (`_with_residual`).
- softmax: softmax over the last dimension with an optional scale and additive mask prologue.

Backward: every pattern has a generated backward kernel, in C and in Triton, applied when
autocast is off (pointwise groups: under autocast too):
- LayerNorm and RMSNorm (rownorm_bwd.c.j2 / .py.j2): dx and the weight/bias gradients in one pass
  over x and dy. With a residual add fused in front, it recomputes h = x + r and adds h's own
  gradient: the result is the gradient of both x and r.
- softmax (softmax_bwd.*): scale * y * (dy - sum(dy * y)) from the probabilities y the forward
  wrote, which autograd keeps in place of the inputs (eager keeps y too); where the kernel does
  not apply (autocast, a mask that needs a gradient, create_graph) eager's formula in torch ops.
- pointwise groups whose every op has a derivative rule (`_grad_terms`: all of the above): the
  backward is itself a pointwise kernel (pointwise.*.j2) that recomputes the forward's values from
  the saved inputs and applies the rules in reverse, one pass over memory; a broadcast input's
  gradient (a bias) is then summed to its shape by torch, as eager does. A group whose inputs'
  gradients are all an output's (an add after a dropout of p = 0) needs no kernel ("pass-through").
Where a kernel does not apply (autocast for norms and softmax, other dtypes or shapes, a compiler
that refused the backward), the group's original (unfused) ops are recomputed from the saved
inputs under autograd. Only inputs are saved, and only those a backward reads (a pointwise
group's backward is pruned to what its gradients need; a residual norm saves h = x + r in place of
x and r, as eager's norm saves h; softmax its output: `Kernel.for_backward`). Under create_graph=True the recompute always
runs, undetached, so second derivatives are eager's (the kernels have none).

Dropout (p > 0, training) draws from a counter-based RNG instead of torch's generator: element i
of a call with seed s is kept when a hash of (s, i) clears p (codegen/templates/common.h.j2). The
seed is drawn from torch's default generator once per call (so `torch.manual_seed` makes runs
repeatable) and returned as the op's last output; backward rebuilds the same mask from it (in
the backward kernel, or in PyTorch ops, `dropout_keep`, when it recomputes). The masks are not
eager's: they have the same distribution, not the same draws.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import operator
import re
import sys
import threading
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx

from dsc.codegen import cache, cpu
from dsc.codegen import triton as triton_backend
from dsc.pass_manager import CompileContext, PassResult

aten = torch.ops.aten
PATTERNS = ("pointwise", "layernorm", "rmsnorm", "softmax")


def _lit_c(v) -> str:
    v = float(v)
    if v != v:
        return "NAN"
    if v in (float("inf"), float("-inf")):
        return "INFINITY" if v > 0 else "(-INFINITY)"
    return f"{v!r}f"


def _lit_py(v) -> str:
    v = float(v)
    return f"float('{v!r}')" if v != v or v in (float("inf"), float("-inf")) else repr(v)


LITERALS = {"c": _lit_c, "triton": _lit_py}


# aten op -> function(args, kwargs, literal printer) -> expression, or None to decline. Node arguments
# arrive as expression strings, scalars raw. Expressions use only + - * / and the v_* helpers that
# both backends define (codegen/templates: common.h.j2 for C, triton_common.py.j2 for Triton).
def _args(a, L):
    return [x if isinstance(x, str) else L(x) for x in a]


def _binary(fmt):
    return lambda a, kw, L: fmt.format(*_args(a, L))


def _add(a, kw, L):
    alpha, (x, y) = kw.get("alpha", 1), _args(a[:2], L)
    return f"({x} + {y})" if alpha == 1 else f"({x} + {L(alpha)} * {y})"


def _sub(a, kw, L):
    alpha, (x, y) = kw.get("alpha", 1), _args(a[:2], L)
    return f"({x} - {y})" if alpha == 1 else f"({x} - {L(alpha)} * {y})"


_POW_CODE = {2.0: "({0} * {0})", 3.0: "({0} * {0} * {0})", 1.0: "({0})", 0.5: "v_sqrt({0})",
             -1.0: "v_recip({0})", -0.5: "v_rsqrt({0})"}  # the exponents a kernel computes


def _pow(a, kw, L):
    return _POW_CODE[float(a[1])].format(a[0]) if float(a[1]) in _POW_CODE else None


def _gelu(a, kw, L):
    return f"v_gelu_tanh({a[0]})" if kw.get("approximate", "none") == "tanh" else f"v_gelu_erf({a[0]})"


def _dropout(a, kw, L):
    return a[0] if not isinstance(a[1], str) and (a[1] == 0 or a[2] is False) else None  # p > 0: _pointwise_params


# -- dropout's counter-based RNG (the kernels' dsc_hash, common.h.j2) ----------------------------------
M32 = 0xFFFFFFFF
DROPOUT_SALT = 0x632BE59B  # dropout site k of a kernel draws with seed + k * DROPOUT_SALT


def _random_dropout(n: torch.fx.Node) -> bool:
    """A dropout node that drops something: p > 0 (or not a constant) in training."""
    if n.target is not aten.dropout.default:
        return False
    p, train = _dropout_args(n)
    return isinstance(p, torch.fx.Node) or isinstance(train, torch.fx.Node) or (p != 0 and train is not False)


def _dropout_args(n: torch.fx.Node) -> tuple:
    """(p, train) of an aten.dropout node."""
    p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
    train = n.args[2] if len(n.args) > 2 else n.kwargs.get("train", True)
    return p, train


def _dropout_constants(p: float) -> tuple[int, float]:
    """(threshold on the hash's top 24 bits, scale of kept values): torch's native dropout scales
    kept values by 1 / (1 - p) computed in fp32."""
    thresh = min(1 << 24, int(round(float(p) * (1 << 24))))
    keep = torch.tensor(1.0 - float(p), dtype=torch.float32)
    scale = 0.0 if float(p) >= 1.0 else float(torch.tensor(1.0, dtype=torch.float32) / keep)
    return thresh, scale


def _mul32(a: torch.Tensor, b: int) -> torch.Tensor:
    """(a * b) mod 2**32 for int64 tensors a in [0, 2**32) and constant b < 2**32, without
    overflowing int64."""
    return ((a & 0xFFFF) * b + ((((a >> 16) * b) & 0xFFFF) << 16)) & M32


def dropout_keep(shape, p: float, seed: int, device=None) -> torch.Tensor:
    """The mask a fused kernel draws for `seed` over an iteration space of `shape` (row-major
    element counter), as a bool tensor (True = kept): dsc_hash of common.h.j2 in PyTorch ops."""
    thresh, _ = _dropout_constants(p)
    i = torch.arange(_numel(shape), dtype=torch.int64, device=device)
    h = (int(seed) & M32) ^ _mul32(i >> 32, 0x85EBCA77)
    h = (h + _mul32(i & M32, 0x9E3779B1)) & M32
    h = _mul32(h ^ (h >> 16), 0x7FEB352D)
    h = _mul32(h ^ (h >> 15), 0x846CA68B)
    h = h ^ (h >> 16)
    return ((h >> 8) >= thresh).view(tuple(shape))


def _dropout_ref(x: torch.Tensor, p: float, seed: torch.Tensor, salt: int) -> torch.Tensor:
    """Dropout as the kernel computes it (the recompute for backward, and the fallback)."""
    _, scale = _dropout_constants(p)
    keep = dropout_keep(x.shape, p, (int(seed) + salt) & M32, x.device)
    return torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))


def _same(a, kw, L):
    return a[0]


OPS = {
    aten.add.Tensor: _add, aten.add.Scalar: _add, aten.sub.Tensor: _sub, aten.sub.Scalar: _sub,
    aten.mul.Tensor: _binary("({0} * {1})"), aten.mul.Scalar: _binary("({0} * {1})"),
    aten.div.Tensor: _binary("({0} / {1})"), aten.div.Scalar: _binary("({0} / {1})"),
    aten.rsub.Scalar: _binary("({1} - {0})"),
    aten.neg.default: _binary("(-{0})"), aten.relu.default: _binary("v_relu({0})"),
    aten.gelu.default: _gelu, aten.silu.default: _binary("v_silu({0})"),
    aten.sigmoid.default: _binary("v_sigmoid({0})"), aten.tanh.default: _binary("v_tanh({0})"),
    aten.exp.default: _binary("v_exp({0})"), aten.rsqrt.default: _binary("v_rsqrt({0})"),
    aten.sqrt.default: _binary("v_sqrt({0})"), aten.pow.Tensor_Scalar: _pow,
    aten.dropout.default: _dropout, aten.clone.default: _same, aten.alias.default: _same,
    aten.contiguous.default: _same, aten.to.dtype: _same, aten._to_copy.default: _same,
}
CASTS = (aten.to.dtype, aten._to_copy.default)
# integer tensors a group may read through a cast (a dequantize prologue: `(q.float() - zero) * scale`),
# with the C type the kernel reads them as
INT_TYPES = {torch.int8: "int8_t", torch.uint8: "uint8_t", torch.int16: "int16_t", torch.int32: "int32_t"}
TRANSCENDENTAL = {aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default, aten.exp.default}


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _short(target) -> str:
    return str(getattr(target, "__name__", target)).replace(".default", "")


@dataclass
class Group:
    pattern: str
    nodes: list[torch.fx.Node]
    inputs: list[torch.fx.Node]
    outputs: list[torch.fx.Node]
    params: dict = field(default_factory=dict)
    slots: list = field(default_factory=list)  # (node index, arg index) of each input, norms/softmax

    def refresh(self) -> None:
        """Re-read the inputs from the graph (an earlier rewrite may have renamed one)."""
        if self.slots:
            self.inputs = [self.nodes[i].args[j] if i is not None else None for i, j in self.slots]
        else:
            members, self.inputs = set(self.nodes), []
            for n in self.nodes:
                for x in n.all_input_nodes:
                    if x not in members and x not in self.inputs:
                        self.inputs.append(x)


class _CastProbe(torch.fx.Interpreter):
    """Runs a group's reference (on fake tensors) and notes whether a float cast in it changes the
    dtype: traced as a no-op, it casts under autocast when the ops before it ran in bf16, and the
    kernel, which would compute those ops in the cast's dtype, cannot round as eager does."""

    casts = False

    def call_function(self, target, args, kwargs):
        if target is _dropout_ref:  # it reads its seed's value, which a fake tensor has not
            return torch.empty_like(args[0])
        return super().call_function(target, args, kwargs)

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and n.target in CASTS and isinstance(n.args[0], torch.fx.Node):
            src = self.env[n.args[0]]
            if src.is_floating_point() and out.dtype != src.dtype:
                self.casts = True
        return out


class Kernel:
    """A fused group at run time: its generated kernel per dtype, and the unfused reference."""

    def __init__(self, name: str, group: Group, ref: torch.fx.GraphModule, kinds: list[str], shape, cols: int,
                 backend: str = "cpu"):
        self.name, self.pattern, self.params, self.backend = name, group.pattern, dict(group.params), backend
        self.ref, self.kinds, self.shape, self.cols = ref, kinds, tuple(shape), cols
        self.replaced = [_short(n.target) for n in group.nodes]
        self.input_shapes = [tuple(_val(x).shape) if x is not None else None for x in group.inputs]
        # integer inputs (read through a dequantizing cast) keep their dtype whatever the kernel's is
        self.input_dtypes = [_val(x).dtype if x is not None and _val(x).dtype in INT_TYPES else None
                             for x in group.inputs]
        self.has_int_inputs = any(d is not None for d in self.input_dtypes)
        # a float cast inside the group (a no-op when traced, `x.to(torch.float32)`) casts for real when
        # the call's dtype differs (bf16 inputs to an fp32 compile): the kernel runs only in the traced dtype
        self.casts = any(n.target in CASTS and _val(n).dtype not in INT_TYPES and isinstance(n.args[0], torch.fx.Node)
                         and _val(n.args[0]).dtype not in INT_TYPES for n in group.nodes)
        self.out_dtype = _val(group.outputs[0]).dtype  # the kernel's dtype when no input is a float
        self.n_out = len(group.outputs)
        self.seeded = bool(group.params.get("seeded"))  # draws dropout masks: the seed is an extra output
        self.compiled: dict[torch.dtype, object] = {}
        self.sources: dict[torch.dtype, str] = {}
        self.calls = {"kernel": 0, "fallback": 0, "backward": 0}  # forward kernel / unfused / backward kernel
        self._bwd: dict[torch.dtype, tuple | None] = {}  # dtype -> (backward fn, reduce fn, source), None: failed
        self._pool: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._autocast: dict = {}  # input dtypes + autocast dtype -> dtype the kernel runs in
        self._cargs: tuple | None = None  # the C kernel's constant arguments (_c_args)
        self._launched: set = set()  # dtypes whose Triton kernel has launched (compiled) once
        self.entry: dict | None = None  # its entry in the report's `kernels` (runtime fallbacks)
        self._last = threading.local()  # per thread: whether its last call ran the kernel (`ran`)

    def _autocast_inputs(self, xs: list) -> list | None:
        """Under autocast, eager would run the group's ops with autocast's casts (LayerNorm in fp32,
        say). The kernel computes in fp32 and rounds once, so it matches eager when its inputs are
        cast to the dtype the group's outputs would have: found once per input-dtype signature by
        running the unfused ops on fake tensors under the same autocast state."""
        device = next(x for x in xs if x is not None).device.type
        key = (tuple(x.dtype if x is not None else None for x in xs), torch.get_autocast_dtype(device))
        target = self._autocast.get(key)
        if target is None:
            from torch._subclasses.fake_tensor import FakeTensorMode

            probe = _CastProbe(self.ref)
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                outs = probe.run(*[mode.from_tensor(x) if x is not None else None for x in xs],
                                 *([torch.zeros((), dtype=torch.int64)] if self.seeded else []))
            dtypes = {o.dtype for o in (outs if isinstance(outs, (tuple, list)) else (outs,))}
            target = self._autocast[key] = dtypes.pop() if len(dtypes) == 1 and not probe.casts else False
        if not target:  # outputs of several dtypes (a bf16 h beside an fp32 norm), or a cast that casts
            return None
        return [x.to(target) if x is not None and x.is_floating_point() and x.dtype != target else x for x in xs]

    @property
    def ran(self) -> bool:
        """Whether this thread's last call ran the kernel (False: the unfused ops). Per thread: two
        threads calling one compiled model (serving) must not see each other's answer, or a backward
        would use the generated kernel for a forward that ran the unfused ops."""
        return getattr(self._last, "ran", True)

    @ran.setter
    def ran(self, value: bool) -> None:
        self._last.ran = value

    def _output(self, i: int, dtype: torch.dtype, device) -> torch.Tensor:
        """An output buffer. When the compiled model runs without autograd (inference) the previous
        call's buffer is reused if nothing else holds it (no Python reference, no view of its
        storage): a fresh large buffer costs page faults that can exceed the kernel's own time.
        With autograd on, a later op may have saved the old output for backward (a reference no
        count here can see), so every call gets a new buffer. The mode is the caller's, recorded by
        `inference()`: inside a custom op grad mode is always off."""
        if REUSE_OUTPUTS and getattr(_state, "inference", False):
            buf = self._pool.get((i, dtype))
            # Python references: the pool, `buf`, getrefcount's argument; storage references: the
            # tensor and the temporary storage object that untyped_storage() returns
            if buf is not None and sys.getrefcount(buf) == 3 and \
                    torch._C._storage_Use_Count(buf.untyped_storage()._cdata) == 2:
                return buf
            buf = self._pool[(i, dtype)] = self._empty(self.shape, dtype, device)
            return buf
        return self._empty(self.shape, dtype, device)

    @staticmethod
    def _empty(shape, dtype, device) -> torch.Tensor:
        """A new output buffer; on the CPU (`device` None or a CPU device) in huge pages where it
        is large (cpu.empty)."""
        if device is None or torch.device(device).type == "cpu":
            return cpu.empty(shape, dtype)
        return torch.empty(shape, dtype=dtype, device=device)

    def source(self, dtype: torch.dtype) -> str:

        common = {"name": self.name, "dtype": cpu.DTYPES[dtype], "replaced": ", ".join(self.replaced)}
        ext = ".py.j2" if self.backend == "triton" else ".c.j2"
        if self.pattern == "pointwise":
            return cpu.render("pointwise" + ext, inputs=self.kinds, in_types=self.in_types(), **self.params, **common)
        if self.pattern in ("layernorm", "rmsnorm"):
            return cpu.render("rownorm" + ext, kind=self.pattern, **self.params, **common)
        return cpu.render("softmax" + ext, **self.params, **common)

    def in_types(self, extra: int = 0) -> list[str]:
        """Each input's C element type: T (the kernel's float type) or an integer type; `extra`
        more T inputs (the backward kernel's incoming gradients)."""
        return [INT_TYPES[d] if d is not None else "T" for d in self.input_dtypes] + ["T"] * extra

    def float_dtype(self, xs: list) -> torch.dtype:
        """The dtype the kernel runs in for this call: its first float input's, or (a group whose
        inputs are all integers, a pure dequantize) its outputs'."""
        return next((x.dtype for x, d in zip(xs, self.input_dtypes) if x is not None and d is None), self.out_dtype)

    def build(self, dtype: torch.dtype) -> str:
        """Compile (or find in the cache) the kernel for `dtype`; returns the source path."""

        if self.backend == "triton":

            mod, src = triton_backend.load(self.source(dtype))
            self.compiled[dtype] = mod.launch
            self.sources[dtype] = str(src)
            return str(src)
        fn, _, src = cpu.compile_kernel(self.source(dtype), self.name)
        self.compiled[dtype] = fn
        self.sources[dtype] = str(src)
        return str(src)

    @functools.cached_property
    def rows(self) -> int:
        """The iteration space's rows: leading dimensions flattened."""
        return max(1, _numel(self.shape) // max(self.cols, 1))

    def _device(self, t: torch.Tensor) -> str:
        """The device type this kernel runs on for tensor `t`: Triton takes CUDA tensors (or CPU ones
        under TRITON_INTERPRET=1), the C backend CPU tensors."""
        return "cuda" if self.backend == "triton" and t.is_cuda else "cpu"

    # -- generated backward (LayerNorm, RMSNorm, with or without the residual add, softmax and the
    # pointwise groups whose every op has a derivative rule, in C and in Triton) ---------------------
    @functools.cached_property
    def saves_sum(self) -> bool:
        """A residual norm: autograd saves its output h = x + r in place of x and r."""
        return self.pattern in ("layernorm", "rmsnorm") and bool(self.params.get("has_residual"))

    @property
    def has_backward(self) -> bool:
        if self.pattern == "pointwise":
            return self.params.get("grad") is not None
        return self.pattern in ("layernorm", "rmsnorm", "softmax")

    def for_backward(self, xs: list, outs: list) -> list:
        """What autograd keeps for the backward, in the inputs' places: the inputs, except that a
        residual norm keeps its sum h (eager's norm keeps h; r, a projection's output, would
        otherwise stay alive too) and softmax its probabilities y (eager keeps y, and the next
        matmul the same tensor, where x would be one more activation: B x heads x T x T)."""
        if self.saves_sum:
            return [outs[0], None, *xs[2:]]
        if self.pattern == "softmax":
            return [outs[0], *[None] * (len(xs) - 1)]
        if self.pattern == "pointwise" and self.params.get("grad") is not None:  # what its backward reads
            reads = self.params["grad"]["reads"]
            return [x if i in reads else None for i, x in enumerate(xs)]
        return list(xs)

    @functools.cached_property
    def keeps_all_inputs(self) -> bool:
        """Whether autograd keeps every input for the backward (`for_backward`); a pointwise group
        whose backward reads fewer leaves the others' places empty (None)."""
        return self.pattern != "pointwise" or self.params.get("grad") is None or \
            len(self.params["grad"]["reads"]) == len(self.input_shapes)

    def build_backward(self, dtype: torch.dtype) -> str:
        """Compile (or find in the cache) the backward kernel for `dtype`; returns its source path."""
        triton = self.backend == "triton"
        if self.pattern == "softmax":
            src = cpu.render("softmax_bwd.py.j2" if triton else "softmax_bwd.c.j2", name=self.name,
                             dtype=cpu.DTYPES[dtype], replaced=", ".join(self.replaced), has_mask=self.params["has_mask"])
        elif self.pattern == "pointwise":  # itself a pointwise kernel: inputs + output grads -> input grads
            grad = self.params["grad"]
            if not grad["outputs"]:  # every input's gradient is an output's, passed through: no kernel
                self._bwd[dtype] = (None, None, None)
                return None
            reads = grad["reads"]  # the forward inputs the backward reads, then the outputs' gradients
            src = cpu.render("pointwise.py.j2" if triton else "pointwise.c.j2", name=f"{self.name}_bwd",
                             dtype=cpu.DTYPES[dtype], replaced="the backward of " + ", ".join(self.replaced),
                             inputs=[*[self.kinds[i] for i in reads], *["full"] * self.n_out],
                             in_types=[self.in_types()[i] for i in reads] + ["T"] * self.n_out, body=grad["body"],
                             outputs=grad["outputs"], seeded=self.seeded)
        if self.pattern in ("softmax", "pointwise"):
            if triton:
                mod, path = triton_backend.load(src)
                fn = mod.launch_backward if self.pattern == "softmax" else mod.launch
            else:
                fn, _, path = cpu.compile_kernel(src, f"{self.name}_bwd")
            self._bwd[dtype] = (fn, None, str(path))
            return str(path)
        norm = {"kind": self.pattern, "name": self.name, "replaced": ", ".join(self.replaced),
                "has_weight": self.params.get("has_weight", True), "has_bias": self.params.get("has_bias", False),
                "has_residual": self.params.get("has_residual", False)}
        if self.backend == "triton":
            mod, path = triton_backend.load(cpu.render("rownorm_bwd.py.j2", **norm))
            self._bwd[dtype] = (mod.launch_backward, None, str(path))
            return str(path)
        src = cpu.render("rownorm_bwd.c.j2", dtype=cpu.DTYPES[dtype], **norm)
        fn, _, path = cpu.compile_kernel(src, f"{self.name}_bwd")
        red, _, _ = cpu.compile_kernel(src, f"{self.name}_bwd_reduce")
        self._bwd[dtype] = (fn, red, str(path))
        return str(path)

    def _backward_kernel(self, dtype: torch.dtype):
        """(kernel, reduce kernel or None, source) of the backward for `dtype`, built on first use;
        None when the compiler refused it (the caller recomputes from then on)."""
        if dtype not in self._bwd:
            try:
                self.build_backward(dtype)
            except cache.CompileError:
                self._bwd[dtype] = None
        return self._bwd[dtype]

    def generated_backward(self, saved, n_in: int, grads, needs: tuple, autocast) -> list | None:
        """The inputs' gradients from this group's generated backward kernel, or None when there
        is none or it does not apply (the caller then recomputes the unfused ops). `saved` holds
        the forward's inputs, then the dropout seed if any; under autocast only pointwise groups
        take the kernel, with the inputs cast as the forward cast them."""
        device, enabled, dtype = autocast
        if not self.has_backward or (enabled and self.pattern != "pointwise"):
            return None
        xs = list(saved[:n_in])
        if self.pattern == "pointwise":
            if enabled:  # the forward cast its float inputs to its outputs' dtype (_autocast_inputs)
                to = next((g.dtype for g in grads if g is not None), None)
                xs = [x.to(to) if x is not None and to is not None and x.is_floating_point() else x for x in xs]
            return self.pointwise_backward(xs, list(saved[n_in:]), list(grads))
        if self.params.get("has_residual"):  # outputs h = x + r and norm(h): both may have gradients
            return self.residual_norm_backward(xs, *grads[:2])
        if grads[0] is None:
            return None
        return self.norm_backward(xs, grads[0])

    def pointwise_backward(self, xs: list, seeds: list, grads: list) -> list | None:
        """A pointwise group's input gradients from its generated backward kernel (the forward's
        inputs and the outputs' gradients in, one gradient per input over the iteration space out,
        summed to the input's shape where it was broadcast), or None when it does not apply."""
        grads = grads[:self.n_out]  # (the seed's "gradient" is a zero scalar)
        if all(g is None for g in grads):  # no output's value reached the loss
            return [None] * len(xs)
        spec = self.params["grad"]
        dtype = next(g.dtype for g in grads if g is not None)  # the outputs', which the kernel ran in
        first = next(g for g in grads if g is not None)
        device = self._device(first)
        ins = [xs[i] for i in spec["reads"]]  # the inputs the backward reads: autograd kept only these
        if dtype not in cpu.DTYPES or (self.has_int_inputs and dtype != self.out_dtype) or any(
                x is None or x.dtype != (dtype if self.input_dtypes[i] is None else self.input_dtypes[i]) or
                x.device.type != device or tuple(x.shape) != self.input_shapes[i] for i, x in zip(spec["reads"], ins)) or \
                any(g is not None and (g.dtype != dtype or tuple(g.shape) != self.shape) for g in grads):
            return None
        built = self._backward_kernel(dtype)
        if built is None:
            return None
        fn = built[0]
        ins = [x.contiguous() for x in ins]
        grads = [g.contiguous() if g is not None else torch.zeros(self.shape, dtype=dtype, device=first.device)
                 for g in grads]
        outs = [self._empty(self.shape, dtype, first.device) for _ in spec["outputs"]]
        if outs and self.backend == "triton":
            launch = lambda: fn([*ins, *grads], outs, self.rows, self.cols, **({"seed": seeds[0]} if seeds else {}))  # noqa: E731
            if not self._launch_triton_backward(launch, dtype):
                return None
        elif outs:
            ptrs = [t.data_ptr() for t in (*ins, *grads, *outs)]  # then the forward's constants
            fn(*ptrs, *self._c_args(fn, len(ptrs)), *[ctypes.c_uint32(int(t)) for t in seeds])
            self.calls["backward"] += 1
        got = [None if src is None else (outs if src[0] == "out" else grads)[src[1]] for src in spec["grads"]]
        return [g if g is None or kind == "full" else g.sum_to_size(shape)
                for g, shape, kind in zip(got, self.input_shapes, self.kinds)]

    def softmax_backward(self, y: torch.Tensor, dy: torch.Tensor | None, needs: tuple, autocast,
                         fused: bool = True) -> list:
        """x's (and the mask's) gradient from the probabilities y the forward wrote, which autograd
        keeps in place of x and the mask (eager's softmax keeps y too; the next matmul keeps the
        same tensor): dz = y * (dy - sum(dy * y)), dx = scale * dz, the mask's dz summed to its
        shape. The generated kernel computes dx where it applies: a forward that ran the kernel,
        no autocast, no second derivative, a mask that needs no gradient. Elsewhere eager's own
        formula does, in torch ops (differentiable under create_graph)."""
        n_in = len(self.input_shapes)
        if dy is None:
            return [None] * n_in
        scale, mask_grad = float(self.params["scale"]), self.params["has_mask"] and needs[1]
        dtype = y.dtype
        if fused and self.has_backward and not (torch.is_grad_enabled() or autocast[1] or mask_grad) and \
                dtype in cpu.DTYPES and dy.dtype == dtype \
                and y.device.type == self._device(y) and tuple(y.shape) == self.shape == tuple(dy.shape):
            built = self._backward_kernel(dtype)
            if built is not None:
                y, dy = y.contiguous(), dy.contiguous()
                dx = self._empty(self.shape, dtype, y.device)
                if self.backend == "triton":
                    launch = lambda: built[0](y, dy, dx, self.rows, self.cols, scale)  # noqa: E731
                    if self._launch_triton_backward(launch, dtype):
                        return [dx, None][:n_in]
                else:
                    built[0](y.data_ptr(), dy.data_ptr(), dx.data_ptr(), *self._c_args(built[0], 3))
                    self.calls["backward"] += 1
                    return [dx, None][:n_in]
        dz = torch._softmax_backward_data(dy.to(dtype), y, -1, dtype)
        return [dz * scale if scale != 1.0 else dz, dz.sum_to_size(self.input_shapes[1]) if mask_grad else None][:n_in]

    def _launch_triton_backward(self, launch, dtype: torch.dtype) -> bool:
        """Run a Triton backward kernel. Triton compiles at the first launch, so a compiler's
        refusal shows up here: the group then recomputes from this call on (False), with a warning."""
        try:
            launch()
        except Exception as exc:  # noqa: BLE001
            if self.calls["backward"]:
                raise  # it ran before: not a compile error
            warnings.warn(f"{self.name}: the Triton backward kernel failed ({exc}); recomputing instead")
            self._bwd[dtype] = None
            return False
        self.calls["backward"] += 1
        return True

    def residual_norm_backward(self, xs: list, dh: torch.Tensor | None, dy: torch.Tensor | None) -> list | None:
        """The residual add + norm group (x, r, w, b -> h = x + r, norm(h)), whose forward saved h
        in place of x and r (`xs` is h, None, w, b): x's and r's gradient is h's own (`dh`) plus
        the norm's input gradient, from the same kernel as `norm_backward`, which reads h and adds
        dh. Without a gradient for the norm, h's passes through."""
        if dy is None:
            return None if dh is None else [dh, dh, None, None][:len(xs)]
        h, _, w, b = (list(xs) + [None, None])[:4]
        if dh is not None and (dh.dtype != h.dtype or tuple(dh.shape) != self.shape):
            return None
        got = self.norm_backward([h, w, b], dy, dh)
        return None if got is None else [got[0], got[0], *got[1:]][:len(xs)]

    def norm_backward(self, xs: list, dy: torch.Tensor, dh: torch.Tensor | None = None) -> list | None:
        """LayerNorm's or RMSNorm's input, weight and bias gradients from the generated backward
        kernel, or None when it does not apply (then the caller recomputes the unfused ops). In the
        residual group, x is h = x + r and dh (None: none) is added to its gradient."""
        x, w, b = (list(xs) + [None, None])[:3]
        dtype = x.dtype
        if dtype not in cpu.DTYPES or dy.dtype != dtype or x.device.type != self._device(x) or \
                tuple(x.shape) != self.input_shapes[0] or any(t is not None and t.dtype != dtype for t in (w, b)):
            return None
        built = self._backward_kernel(dtype)
        if built is None:
            return None
        fn, red, _ = built
        cols = self.cols
        rows = self.rows
        w = w.contiguous() if w is not None else None  # (a weight sliced from a larger parameter)
        if self.backend == "triton":
            got = []
            residual = {"dh": dh.contiguous() if dh is not None else None} if self.params.get("has_residual") else {}
            launch = lambda: got.extend(fn(x.contiguous(), w, dy.contiguous(), rows, cols, float(self.params["eps"]),  # noqa: E731
                                           **residual))
            return got[:len(xs)] if self._launch_triton_backward(launch, dtype) else None
        blocks = min(rows, 64)  # fixed, not per thread: the weight gradient's sum order never changes
        x, dy = x.contiguous(), dy.contiguous()
        dx = cpu.empty(x.shape, x.dtype)
        part = torch.empty(blocks, 2, cols, dtype=torch.float32)
        dw = torch.empty(cols, dtype=dtype) if w is not None else None
        db = torch.empty(cols, dtype=dtype) if b is not None else None
        dh = dh.contiguous() if dh is not None else None  # (kept in a name: a pointer outlives no temporary)
        residual = [cpu.ptr(dh)] if self.params.get("has_residual") else []
        fn(cpu.ptr(x), *residual, cpu.ptr(w), cpu.ptr(dy), cpu.ptr(dx), cpu.ptr(part), _i64(rows), _i64(cols),
           _f32(self.params["eps"]), _i64(blocks))
        red(cpu.ptr(part), cpu.ptr(dw), cpu.ptr(db), _i64(cols), _i64(blocks))
        self.calls["backward"] += 1
        return [dx, dw, db][:len(xs)]

    def __call__(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        # the hot path of every fused call (a few microseconds of Python on top of the kernel):
        # device and autocast tests read tensor flags, never build `torch.device` objects or names
        first = xs[0] if xs[0] is not None else next(x for x in xs if x is not None)
        cast = xs
        if _any_autocast() and torch.is_autocast_enabled("cuda" if first.is_cuda else "cpu"):
            cast = self._autocast_inputs(xs)  # None: eager's outputs would differ in dtype (no one kernel dtype)
            if cast is not None:
                xs = cast
                first = xs[0] if xs[0] is not None else next(x for x in xs if x is not None)
        dtype = first.dtype if not self.has_int_inputs else self.float_dtype(xs)
        cuda = self.backend == "triton" and first.is_cuda  # where the kernel runs (see _device)
        # (a dequantizing group computes in its cast's target dtype, fixed when the graph was captured)
        usable = cast is not None and dtype in cpu.DTYPES and len(xs) == len(self.input_shapes) and \
            (not self.casts or dtype == self.out_dtype) and \
            (not self.has_int_inputs or dtype == self.out_dtype) and all(
            x is None or (x.dtype == (dtype if d is None else d) and (x.is_cuda if cuda else x.is_cpu) and x.shape == s)
            for x, s, d in zip(xs, self.input_shapes, self.input_dtypes))
        seeds = [torch.randint(0, 1 << 32, (), dtype=torch.int64, device=first.device)] if self.seeded else []
        if not usable:
            return self._unfused(xs, seeds)
        self.ran = True  # (False when the call ran the unfused ops: `_unfused`; read by _Fused.forward)
        fn = self.compiled.get(dtype)
        if fn is None:  # a dtype the compile did not build (autocast): built now
            try:
                self.build(dtype)
                fn = self.compiled[dtype]
            except Exception as exc:  # noqa: BLE001 - the unfused ops still compute the result
                fn = self._give_up(dtype, f"its {str(dtype).replace('torch.', '')} kernel did not compile ({exc})")
        if fn is False:
            return self._unfused(xs, seeds)
        self.calls["kernel"] += 1
        xs = [x.contiguous() if x is not None else None for x in xs]
        device = first.device if cuda or not first.is_cpu else None  # None: the CPU (cpu.empty)
        outs = [self._output(i, dtype, device) for i in range(self.n_out)]
        if self.backend == "triton":
            try:
                fn(xs, outs, self.rows, self.cols, **({"seed": seeds[0]} if seeds else {}), **self.params)
            except Exception as exc:  # noqa: BLE001 - Triton compiles at the first launch: a refusal shows here
                if dtype in self._launched:
                    raise  # it ran before: not a compile error
                self.calls["kernel"] -= 1
                self._give_up(dtype, f"its Triton kernel failed at the first launch ({exc})")
                return self._unfused(xs, seeds)
            self._launched.add(dtype)
            return outs + seeds
        # the C kernel's pointer arguments, in its order, then its constant arguments (made once)
        if self.pattern == "pointwise":
            ptrs = [*xs, *outs]
        elif self.pattern in ("layernorm", "rmsnorm") and self.params.get("has_residual"):
            ptrs = [*xs[:2], outs[0], *(xs + [None])[2:4], outs[1]]  # x, r -> h = x + r; w, b -> norm(h)
        elif self.pattern in ("layernorm", "rmsnorm"):
            ptrs = [*(xs + [None, None])[:3], outs[0]]  # x, w, b -> y
        else:
            ptrs = [*(xs + [None])[:2], outs[0]]  # x, mask -> y
        fn(*[p.data_ptr() if p is not None else None for p in ptrs], *self._c_args(fn, len(ptrs)),
           *[ctypes.c_uint32(int(t)) for t in seeds])
        return outs + seeds

    def _unfused(self, xs: list, seeds: list) -> list:
        """The group's original ops, for a call the kernel cannot take."""
        self.calls["fallback"] += 1
        self.ran = False
        out = self.ref(*xs, *seeds)
        return [o.contiguous() for o in (out if isinstance(out, (tuple, list)) else (out,))] + seeds

    def _give_up(self, dtype: torch.dtype, why: str) -> bool:
        """The kernel for `dtype` cannot run (a compiler refused it at run time): from now on the
        group runs its original ops, with a warning, and the report's entry says why."""
        warnings.warn(f"{self.name}: {why}; its ops run unfused from now on")
        self.compiled[dtype] = False
        if self.entry is not None:
            self.entry.setdefault("runtime_fallback", {})[str(dtype).replace("torch.", "")] = why
        return False

    def _c_args(self, fn, n_ptrs: int) -> tuple:
        """The C kernel's arguments after its pointers: sizes and the pattern's constants, which
        the shapes fix. Made once, with the pointers' argtypes declared so that plain addresses
        can be passed (making a c_void_p per pointer per call costs more than a small kernel).
        The pointwise and softmax backward kernels take the same constants after their own
        pointers."""
        args = self._cargs
        if args is None:
            rows, cols = _i64(self.rows), _i64(self.cols)
            if self.pattern == "pointwise":
                args = (rows, cols)
            elif self.pattern in ("layernorm", "rmsnorm"):
                args = (rows, cols, _f32(self.params["eps"]))
            else:
                mask_rows = max(1, _numel(self.input_shapes[1]) // self.cols) if len(self.input_shapes) > 1 else 1
                args = (rows, cols, _i64(mask_rows), _f32(self.params["scale"]))
            self._cargs = args
        if fn.argtypes is None:
            fn.argtypes = [ctypes.c_void_p] * n_ptrs + [type(a) for a in args] + \
                ([ctypes.c_uint32] if self.seeded and self.pattern == "pointwise" else [])
        return args


_any_autocast = torch._C._is_any_autocast_enabled  # one flag test before asking per device


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _i64(v):
    return ctypes.c_int64(int(v))


def _f32(v):
    return ctypes.c_float(float(v))


KERNELS: dict[str, Kernel] = {}  # name -> kernel, for the custom ops (one per process)
REUSE_OUTPUTS = True  # without autograd, reuse a kernel's free output buffer (benchmarks turn it off)
_state = threading.local()
_state.inference = False


class inference:  # noqa: N801 - used like a function: `with inference(not torch.is_grad_enabled()):`
    """Within this block, fused kernels may reuse output buffers (`enabled` = the caller runs
    without autograd). `CompiledModel.forward` wraps every call in it: a class, since a
    generator-based context manager costs a few microseconds a call."""

    __slots__ = ("enabled", "old")

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.old = getattr(_state, "inference", False)
        _state.inference = self.enabled

    def __exit__(self, *exc):
        _state.inference = self.old


_LIB = torch.library.Library("dsc_fused", "FRAGMENT")


class _Fused(torch.autograd.Function):
    """A fused call under autograd: forward runs the generated kernel, backward the generated
    backward kernel (norms) or a recompute of the unfused ops. Registered as the op's Autograd
    kernel: torch.library's `custom_op` wrapper (pytree flattening, redispatch) cost ~0.3 ms of
    host time per kernel per training step, more than the kernels themselves on a GPU."""

    @staticmethod
    def forward(ctx, name, *xs):
        kernel = KERNELS[name]
        outs = kernel(list(xs))
        ctx.name, ctx.n_in = name, len(xs)
        ctx.set_materialize_grads(False)  # an output without a gradient arrives as None, not zeros
        ctx.fused = kernel.ran  # the forward ran the kernel: a generated backward matches it
        kept = kernel.for_backward(list(xs), outs)
        ctx.save_for_backward(*kept, *outs[len(outs) - kernel.seeded:])
        # a pointwise group's inputs its backward does not read: their dtype and device, for a recompute
        ctx.dropped = () if kernel.keeps_all_inputs else \
            [(i, x.dtype, x.device) for i, (x, k) in enumerate(zip(xs, kept)) if x is not None and k is None]
        device = "cuda" if next(x for x in xs if x is not None).is_cuda else "cpu"
        ctx.autocast = (device, bool(_any_autocast() and torch.is_autocast_enabled(device)),
                        torch.get_autocast_dtype(device))
        if kernel.seeded:
            ctx.mark_non_differentiable(outs[-1])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_backward(ctx.name, ctx.saved_tensors, ctx.n_in, ctx.autocast, grads, ctx.needs_input_grad[1:],
                                 ctx.dropped, ctx.fused))


def _backward(name: str, saved, n_in: int, autocast, grads, needs: tuple, dropped=(), fused: bool = True) -> list:
    """The inputs' gradients: the group's generated backward kernel where it applies, else its
    original ops recomputed from the saved inputs (under the autocast the forward ran in; dropout
    redraws its mask from the saved seed) and differentiated. Under create_graph=True (grad mode on
    here: a gradient penalty) always the recompute, from the saved inputs themselves, not
    detached, so that the result can be differentiated again: the kernels have no second
    derivative. A residual norm saved h = x + r instead of x and r (`Kernel.saves_sum`); a
    pointwise group only the inputs its backward reads (`dropped`: the others' dtype and device).
    The others' values do not enter the gradients, so the recompute reads zeros in their place. A
    forward that ran the unfused ops (`fused` False) gets the recompute: eager's rounding."""
    kernel = KERNELS[name]
    if kernel.pattern == "softmax":  # from the saved probabilities: a kernel, or eager's formula
        return kernel.softmax_backward(saved[0], grads[0], needs, autocast, fused)
    if kernel.saves_sum and grads[1] is None:
        # only h's gradient: it is x's and r's. This is also what the recompute below asks of this
        # very op under create_graph: its graph starts from the saved h, whose grad_fn is this op
        return [grads[0], grads[0], None, None][:n_in]
    create_graph = torch.is_grad_enabled()
    got = None if create_graph or not fused else kernel.generated_backward(saved, n_in, grads, needs, autocast)
    if got is not None:
        return got
    xs = list(saved[:n_in]) if create_graph else \
        [x.detach().requires_grad_(x.is_floating_point()) if x is not None else None for x in saved[:n_in]]
    for i, dtype, device in dropped:
        xs[i] = torch.zeros(kernel.input_shapes[i], dtype=dtype, device=device).requires_grad_(dtype.is_floating_point)
    if kernel.saves_sum:  # h was saved for x and r: recompute from x = h, r = 0 (h + 0 is h)
        xs[1] = torch.zeros_like(xs[0])
        got = _recompute(kernel, xs, saved[n_in:], autocast, grads, create_graph)
        return [got[0], got[0], *got[2:]]  # the sum's two inputs get the same gradient
    return _recompute(kernel, xs, saved[n_in:], autocast, grads, create_graph)


def _recompute(kernel: Kernel, xs: list, seeds, autocast, grads, create_graph: bool) -> list:
    """The inputs' gradients from the group's original ops, run again on `xs` and differentiated."""
    device, enabled, dtype = autocast
    with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
        outs = kernel.ref(*xs, *seeds)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    need = [x for x in xs if x is not None and x.requires_grad]
    if not pairs or not need:
        return [None] * len(xs)
    got = iter(torch.autograd.grad([o for o, _ in pairs], need, [g for _, g in pairs], allow_unused=True,
                                   create_graph=create_graph))
    return [next(got) if x is not None and x.requires_grad else None for x in xs]


def _register_op(name: str) -> None:
    """torch.ops.dsc_fused.<name>(xs) -> list of outputs, differentiable (`_Fused`). Registered
    with torch.library directly: a schema, a fake (meta) implementation for tracing, and one
    Autograd kernel that serves every device."""
    if hasattr(torch.ops.dsc_fused, name):
        return
    _LIB.define(f"{name}(Tensor?[] xs) -> Tensor[]")

    def autograd_impl(xs):
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs):
            return list(_Fused.apply(name, *xs))
        return KERNELS[name](list(xs))  # nothing to differentiate: skip autograd.Function (~10 us a call)

    def fake(xs):
        k = KERNELS[name]
        dtype = k.float_dtype(xs)
        seeds = [xs[0].new_empty((), dtype=torch.int64)] if k.seeded else []
        return [xs[0].new_empty(k.shape, dtype=dtype) for _ in range(k.n_out)] + seeds

    _LIB.impl(name, autograd_impl, "Autograd")
    _LIB.impl(name, lambda xs: KERNELS[name](list(xs)), "CompositeExplicitAutograd")  # below autograd
    torch.library.register_fake(f"dsc_fused::{name}", fake, lib=_LIB)


# -- finding groups -----------------------------------------------------------------------------


def _float_tensor(n) -> bool:
    v = _val(n)
    return isinstance(v, torch.Tensor) and v.dtype in (torch.float32, torch.bfloat16)


def _pointwise_ok(n: torch.fx.Node) -> bool:
    if n.op != "call_function" or n.target not in OPS or not _float_tensor(n):
        return False
    if n.target is aten.pow.Tensor_Scalar and float(n.args[1]) not in _POW_CODE:
        return False  # no code for this exponent
    if n.target is aten.rsub.Scalar and (n.args[2] if len(n.args) > 2 else n.kwargs.get("alpha", 1)) != 1:
        return False  # other - alpha * x: not emitted
    dt = _val(n).dtype
    ins = [_val(x) for x in n.all_input_nodes if isinstance(_val(x), torch.Tensor)]
    if n.target in CASTS:
        device = n.kwargs.get("device")
        if device is not None and ins and torch.device(device) != ins[0].device:
            return False  # a copy to another device, not arithmetic
        if len(ins) == 1 and ins[0].dtype in INT_TYPES:
            return True  # a dequantize prologue: the kernel reads the integer tensor and converts it
    return all(v.dtype == dt for v in ins)


def _kind(shape, space) -> str | None:
    """How an operand of `shape` is read in the iteration space (rows x cols): "full", "vec" (per
    column), "row" (per row), "one" (a scalar) or "inner:R" (the trailing dimensions of the space,
    repeated over the leading ones: R rows of cols, like a position embedding over a batch)."""
    shape, space = list(shape), list(space)
    numel = _numel(shape)
    if shape == space:
        return "full"
    if numel == 1:
        return "one"
    if len(shape) > len(space):
        return None
    pad = [1] * (len(space) - len(shape)) + shape
    if pad[-1] == space[-1] and all(d == 1 for d in pad[:-1]):
        return "vec"
    if pad[-1] == 1 and pad[:-1] == space[:-1]:
        return "row"
    lead = next(k for k, d in enumerate(pad) if d != 1)
    if pad[lead:] == space[lead:] and lead < len(space) - 1:  # repeats over leading dims (positions)
        return f"inner:{numel // space[-1]}"  # element (r, c) reads row r % that, column c
    return None


def find_pointwise(graph: torch.fx.Graph, taken: set) -> tuple[list[Group], list[dict]]:
    """Connected groups of pointwise ops whose intermediates stay inside the group."""
    cand = [n for n in graph.nodes if n not in taken and _pointwise_ok(n)]
    cset = set(cand)
    parent = {n: n for n in cand}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in cand:
        if n.users and all(u in cset for u in n.users):
            for u in n.users:
                parent[find(u)] = find(n)
    comps: dict[torch.fx.Node, list] = {}
    for n in cand:
        comps.setdefault(find(n), []).append(n)
    order = {n: i for i, n in enumerate(graph.nodes)}
    groups, declined = [], []
    for nodes in comps.values():
        nodes.sort(key=order.get)
        members = set(nodes)
        outputs = [n for n in nodes if any(u not in members for u in n.users)]
        ops = [_short(n.target) for n in nodes]
        heavy = any(n.target in TRANSCENDENTAL or _random_dropout(n) for n in nodes)
        if len(nodes) < 2 and not heavy:
            if nodes[0].target not in (aten.clone.default, aten.alias.default, aten.contiguous.default,
                                       aten.to.dtype, aten._to_copy.default, aten.dropout.default):
                declined.append({"what": f"{nodes[0].name} ({ops[0]})", "reason": "a single cheap op: eager is "
                                 "already one pass over memory"})
            continue
        space = list(_val(outputs[0]).shape)
        if any(list(_val(o).shape) != space for o in outputs):
            declined.append({"what": ", ".join(n.name for n in nodes), "reason": "its escaping values have "
                             "different shapes (one kernel writes one iteration space)"})
            continue
        inputs = []
        for n in nodes:
            for x in n.all_input_nodes:
                if x not in members and x not in inputs:
                    inputs.append(x)
        kinds = [_kind(_val(x).shape, space) for x in inputs]
        bad = [x.name for x, k in zip(inputs, kinds) if k is None or not isinstance(_val(x), torch.Tensor)]
        if bad or not space:
            declined.append({"what": ", ".join(n.name for n in nodes), "reason": f"operand(s) {bad} broadcast in "
                             "a way the kernel does not index (only full, per-column, per-row, "
                             "repeated over leading dimensions or scalar)"})
            continue
        drops = [n for n in nodes if _random_dropout(n)]
        if any(isinstance(a, torch.fx.Node) for n in drops for a in _dropout_args(n)):
            declined.append({"what": ", ".join(n.name for n in nodes), "reason": "dropout whose p or train flag "
                             "is computed in the graph (the kernel needs constants)"})
            continue
        if any(list(_val(n).shape) != space for n in drops):
            declined.append({"what": ", ".join(n.name for n in nodes), "reason": "dropout of a broadcast operand "
                             "(its mask would be drawn per element of the iteration space)"})
            continue
        groups.append(Group("pointwise", nodes, inputs, outputs))
    return groups, declined


def rewrite_tanh_sums(graph: torch.fx.Graph) -> list[str]:
    """`1 + tanh(u)` -> `2 * sigmoid(2u)`, an identity: GPT-2's gelu_new (0.5 x (1 + tanh(u)), written
    out op by op) then keeps its relative accuracy where tanh(u) nears -1: 1 + tanh(u) cancels
    there, the sigmoid does not. When tanh had two branches (a polynomial, an exp and a division,
    both evaluated for every lane) the rewrite was also faster (gelu_new in cache 12.7 -> ~38 GB/s,
    fp32, 2 cores); against today's rational tanh (common.h.j2) the sigmoid's exp costs more
    (tanh-GELU's arithmetic from L1: 0.64 ns per element with 1 + tanh, 0.75 with the sigmoid), a
    price kept for the accuracy. Only a tanh whose one user is the sum is rewritten. Returns the
    rewritten nodes' names."""
    done = []
    for add in list(graph.nodes):
        if add.op != "call_function" or add.target not in (aten.add.Tensor, aten.add.Scalar) or \
                add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
            continue
        a, b = add.args
        tanh, one = (a, b) if isinstance(a, torch.fx.Node) else (b, a)
        if not isinstance(tanh, torch.fx.Node) or tanh.target is not aten.tanh.default or len(tanh.users) != 1 or \
                isinstance(one, torch.fx.Node) or one != 1 or not _float_tensor(tanh) or not _float_tensor(add):
            continue
        with graph.inserting_before(add):
            u2 = graph.call_function(aten.mul.Tensor, (tanh.args[0], 2.0))
            sig = graph.call_function(aten.sigmoid.default, (u2,))
            out = graph.call_function(aten.mul.Tensor, (sig, 2.0))
        for new, like in ((u2, tanh), (sig, tanh), (out, add)):
            new.meta.update({k: v for k, v in like.meta.items() if k in ("val", "tensor_meta", "nn_module_stack",
                                                                          "stack_trace", "source_fn_stack")})
        add.replace_all_uses_with(out)
        done.append(f"{tanh.name} + 1")
        graph.erase_node(add)
        graph.erase_node(tanh)
    return done


def remove_identities(graph: torch.fx.Graph) -> list[str]:
    """Dropout with p = 0 or outside training (GPT's `dropout(0.0)` after attention) returns its
    input itself in eager, at no cost. In a fused group it would be a copy: an extra pass over
    memory and, for autograd, extra saved activations (GPT's `x + dropout(attn)` kept x and attn)
    where eager has the same tensor. Its users read the input instead. Returns the removed nodes'
    names. (A cast to the dtype its input had when traced stays: under autocast, or with bf16
    inputs to an fp32 compile, it is a real cast at run time.)"""
    done = []
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is aten.dropout.default and not _random_dropout(n) and \
                n.args and isinstance(n.args[0], torch.fx.Node):
            n.replace_all_uses_with(n.args[0])
            done.append(f"{n.name} ({_short(n.target)})")
            graph.erase_node(n)
    return done


def _emit(n: torch.fx.Node, env: dict, lang: str = "c") -> str | None:
    args = [env.get(a, "0") if isinstance(a, torch.fx.Node) else a for a in n.args]
    return OPS[n.target](args, dict(n.kwargs), LITERALS[lang])


def find_layernorms(graph, taken, residual: bool = True) -> list[Group]:
    """layer_norm over the last dimension; with `residual`, a preceding `add` of two tensors of the
    same shape (the transformer's residual stream) joins it: the kernel writes the sum h and
    LN(h) in one pass (h usually feeds the next residual add too)."""
    out = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target is aten.layer_norm.default and n not in taken and _float_tensor(n):
            x, shape = n.args[0], n.args[1]
            w = n.args[2] if len(n.args) > 2 else None
            b = n.args[3] if len(n.args) > 3 else None
            eps = n.args[4] if len(n.args) > 4 else 1e-5
            if len(shape) != 1 or not all(_val(t).dtype == _val(n).dtype for t in (x, w, b) if t is not None):
                continue
            params = {"eps": eps, "has_weight": w is not None, "has_bias": b is not None, "has_residual": False}
            wb = [(0, 2) if w is not None else (None, None), (0, 3) if b is not None else (None, None)]
            group = Group("layernorm", [n], [x, w, b], [n], params, [(0, 0), *wb])
            out.append(_with_residual(group, n, taken, out) if residual else group)
    return out


def _with_residual(group: Group, norm: torch.fx.Node, taken, found: list) -> Group:
    """The norm group with the `add` of two same-shape tensors that computes its input (the
    transformer's residual stream: h = x + r) joined in front, where there is one: the kernel then
    reads x and r and writes h (which usually feeds the next residual add too) and norm(h), in
    one pass. The group's first input, x, must be its first node's first argument. A cast between
    the add and the norm, a no-op when traced, joins too: transformers' RMSNorm starts with
    `x.to(torch.float32)`, which in fp32 returns x itself, so the next residual add reads the cast;
    h then stands for the cast (the add's one user), or for the add where only the norm reads the
    cast. (At run time the kernel runs only in the cast's dtype: `Kernel.casts`.) `x + x` stays
    out: its two inputs are one tensor. So does an add that a group `found` before this one has
    joined already (one sum normalized twice): this norm is fused without it."""
    taken = set(taken).union(*(g.nodes for g in found))
    add, prefix, h = group.inputs[0], [], group.inputs[0]
    if getattr(add, "target", None) in CASTS and add not in taken and isinstance(add.args[0], torch.fx.Node) and \
            _val(add).dtype == _val(add.args[0]).dtype and _val(add).shape == _val(add.args[0]).shape:
        cast, add = add, add.args[0]
        outside = [u for u in cast.users if u not in group.nodes]
        if outside and len(add.users) > 1:  # both the sum and its cast leave the group: two names for h
            return group
        prefix, h = [cast], cast if outside else add
    if getattr(add, "target", None) is not aten.add.Tensor or add in taken or add.kwargs or \
            add.args[0] is add.args[1] or not all(isinstance(a, torch.fx.Node) and _val(a).shape == _val(add).shape
                                                  and _val(a).dtype == _val(norm).dtype for a in add.args[:2]):
        return group
    shift = 1 + len(prefix)
    slots = [(0, 0), (0, 1), *[(i + shift if i is not None else None, j) for i, j in group.slots[1:]]]
    return Group(group.pattern, [add, *prefix, *group.nodes], [add.args[0], add.args[1], *group.inputs[1:]],
                 [h, *group.outputs], {**group.params, "has_residual": True}, slots)


def _single(n) -> torch.fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def find_rmsnorms(graph, taken, residual: bool = True) -> list[Group]:
    """mul(w, [to](mul(x, rsqrt(add(mean(pow(x, 2), [-1], True), eps))))); with `residual`, the
    add that computes x joins in front (Llama's residual stream), as for LayerNorm."""
    out = []
    for r in graph.nodes:
        if r.target is not aten.rsqrt.default or r in taken:
            continue
        add = r.args[0]
        if getattr(add, "target", None) is not aten.add.Tensor or not isinstance(add.args[1], float):
            continue
        mean = add.args[0]
        if getattr(mean, "target", None) is not aten.mean.dim or list(mean.args[1]) not in ([-1],) or \
                not (len(mean.args) > 2 and mean.args[2]):
            continue
        pw = mean.args[0]
        if getattr(pw, "target", None) is not aten.pow.Tensor_Scalar or pw.args[1] != 2:
            continue
        x = pw.args[0]
        scaled = _single(r)
        if scaled is None or scaled.target is not aten.mul.Tensor or x not in scaled.args:
            continue
        last, chain = scaled, [pw, mean, add, r, scaled]
        nxt = _single(last)
        if nxt is not None and nxt.target in (aten.to.dtype, aten._to_copy.default) and \
                _val(nxt).dtype == _val(last).dtype:
            chain.append(nxt)
            last, nxt = nxt, _single(nxt)
        if nxt is None or nxt.target is not aten.mul.Tensor:
            continue
        w = nxt.args[0] if nxt.args[1] is last else nxt.args[1]
        cols = _val(x).shape[-1]
        if not isinstance(w, torch.fx.Node) or tuple(_val(w).shape) != (cols,) or _val(w).dtype != _val(x).dtype:
            continue
        if any(len(c.users) != 1 for c in (pw, mean, add, r)) or any(c in taken for c in chain):
            continue
        chain.append(nxt)
        params = {"eps": add.args[1], "has_weight": True, "has_bias": False, "has_residual": False}
        group = Group("rmsnorm", chain, [x, w], [nxt], params, [(0, 0), (len(chain) - 1, nxt.args.index(w))])
        out.append(_with_residual(group, nxt, taken, out) if residual else group)
    return out


def find_softmaxes(graph, taken) -> list[Group]:
    out = []
    for n in graph.nodes:
        if n in taken or n.target not in (aten._softmax.default, aten.softmax.int) or not _float_tensor(n):
            continue
        x = n.args[0]
        if n.args[1] not in (-1, _val(x).dim() - 1) or (n.target is aten._softmax.default and n.args[2]) or \
                _val(x).dtype != _val(n).dtype:  # (softmax(x, dtype=...) computes in another dtype)
            continue
        nodes, mask, scale = [n], None, 1.0
        if getattr(x, "target", None) is aten.add.Tensor and len(x.users) == 1 and x not in taken and \
                isinstance(x.args[1], torch.fx.Node) and x.kwargs.get("alpha", 1) == 1:
            m = x.args[1]
            ms = list(_val(m).shape)
            while ms and ms[0] == 1:
                ms.pop(0)  # leading 1s broadcast; what is left must be x's trailing dimensions
            xs = list(_val(x).shape)
            if ms and xs[-len(ms):] == ms and _val(m).dtype == _val(n).dtype and _val(x.args[0]).shape == _val(x).shape:
                mask, nodes, x = m, [x, n], x.args[0]  # mask row = flat row index modulo its row count
        if getattr(x, "target", None) in (aten.mul.Tensor, aten.mul.Scalar) and isinstance(x.args[1], (int, float)) \
                and len(x.users) == 1 and x not in taken:
            scale, nodes, x = float(x.args[1]), [x, *nodes], x.args[0]
        slots = [(0, 0)] + ([(nodes.index(n) - 1, 1)] if mask is not None else [])
        out.append(Group("softmax", nodes, [x, mask] if mask is not None else [x], [n],
                         {"scale": scale, "has_mask": mask is not None}, slots))
    return out


# -- rewriting ----------------------------------------------------------------------------------


def _reference(group: Group) -> torch.fx.GraphModule:
    """The group's original ops as a graph module: inputs (then the seed, if the group drops
    out) -> (outputs...). Dropout runs as the kernel draws it (`_dropout_ref`)."""
    g = torch.fx.Graph()
    env = {}
    for i, x in enumerate(group.inputs):  # one placeholder per slot: callers pass None for a missing one
        p = g.placeholder(f"in{i}")
        if x is not None and x not in env:  # (one tensor in two slots reads the first)
            env[x] = p
    drops = [n for n in group.nodes if _random_dropout(n)]
    seed = g.placeholder("seed") if drops else None
    for n in group.nodes:
        if n in drops:
            p, _ = _dropout_args(n)
            env[n] = g.call_function(_dropout_ref, (env[n.args[0]], float(p), seed, drops.index(n) * DROPOUT_SALT & M32))
        else:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in group.outputs))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _pointwise_params(group: Group, lang: str = "c") -> dict:
    """The group as straight-line code (C or Triton's Python): one temporary per op, in graph order;
    also its backward (`grad`, see _pointwise_grad), or None where an op has no derivative rule."""
    env, body, sites, drops = {}, [], 0, {}
    for i, x in enumerate(group.inputs):
        env[x] = f"v{i}"
    for j, n in enumerate(group.nodes):
        if _random_dropout(n):
            thresh, scale = _dropout_constants(_dropout_args(n)[0])
            salt, u = sites * DROPOUT_SALT & M32, "u" if lang == "c" else ""
            drops[n] = f"seed + {salt}{u}, i, {thresh}{u}, {LITERALS[lang](scale)}"
            expr = f"v_dropout({env[n.args[0]]}, {drops[n]})"
            sites += 1
        else:
            expr = _emit(n, env, lang)
        body.append(f"const float t{j} = {expr};" if lang == "c" else f"t{j} = {expr}")
        env[n] = f"t{j}"
    params = {"body": body, "outputs": [env[o] for o in group.outputs], "seeded": sites > 0}
    params["grad"] = _pointwise_grad(group, body, env, drops, lang)
    return params


# op -> the gradient of its one tensor input, from that input {x}, the op's value {y} and the
# gradient {g} flowing into it (eager's formulas, torch's derivatives.yaml, except tanh's 1 - y*y:
# v_tanh_grad computes it from x, with no cancellation near |y| = 1). Written in C; `_in_lang`
# drops the `f` of float literals for Triton, the rest (+ - * / and v_* helpers) reads the same in
# both.
_UNARY_GRADS = {
    aten.neg.default: "(-{g})", aten.relu.default: "v_relu_grad({y}, {g})",
    aten.silu.default: "({g} * v_silu_grad({x}))", aten.sigmoid.default: "({g} * {y} * (1.0f - {y}))",
    aten.tanh.default: "({g} * v_tanh_grad({x}))", aten.exp.default: "({g} * {y})",
    aten.rsqrt.default: "(-0.5f * {g} * {y} * {y} * {y})", aten.sqrt.default: "({g} * 0.5f / {y})",
    aten.clone.default: "{g}", aten.alias.default: "{g}", aten.contiguous.default: "{g}",
    aten.to.dtype: "{g}", aten._to_copy.default: "{g}",
}
_POW_GRADS = {2.0: "({g} * 2.0f * {x})", 3.0: "({g} * 3.0f * {x} * {x})", 1.0: "{g}", 0.5: "({g} * 0.5f / {y})",
              -1.0: "(-{g} * {y} * {y})", -0.5: "(-0.5f * {g} * {y} * {y} * {y})"}


def _in_lang(expr: str, lang: str) -> str:
    """A rule written in C, for `lang`: Triton's Python has no `f` suffix on float literals."""
    return expr if lang == "c" else re.sub(r"(?<=[0-9.])f\b", "", expr)


def _grad_terms(n: torch.fx.Node, a: list, y: str, g: str, drop: str | None, lang: str = "c") -> list | None:
    """Reverse-mode rule of one op: [(argument index, its gradient as an expression in `lang`)]
    given the argument expressions `a` (strings for tensors, raw scalars otherwise), the op's value
    `y` and the gradient `g` flowing into it; None when there is no rule (the group recomputes)."""
    rule = _grad_rule(n, a, y, g, drop, LITERALS[lang])
    return None if rule is None else [(i, _in_lang(e, lang)) for i, e in rule]


def _grad_rule(n: torch.fx.Node, a: list, y: str, g: str, drop: str | None, L) -> list | None:
    t, kw = n.target, n.kwargs
    if t in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
        alpha = kw.get("alpha", 1)
        second = g if alpha == 1 else f"({L(alpha)} * {g})"
        return [(0, g), (1, f"(-{second})" if t in (aten.sub.Tensor, aten.sub.Scalar) else second)]
    if t in (aten.mul.Tensor, aten.mul.Scalar):
        return [(0, f"({g} * {_args([a[1]], L)[0]})"), (1, f"({g} * {_args([a[0]], L)[0]})")]
    if t in (aten.div.Tensor, aten.div.Scalar):
        d = _args([a[1]], L)[0]
        return [(0, f"({g} / {d})"), (1, f"(-{g} * {y} / {d})")]
    if t is aten.rsub.Scalar and kw.get("alpha", 1) == 1:
        return [(0, f"(-{g})")]
    if t is aten.gelu.default:  # the derivatives of torch's gelu_backward, in common.h.j2
        fn = "v_gelu_tanh_grad" if kw.get("approximate", "none") == "tanh" else "v_gelu_erf_grad"
        return [(0, f"({g} * {fn}({a[0]}))")]
    if t is aten.dropout.default:
        return [(0, f"v_dropout({g}, {drop})" if drop else g)]  # the forward's mask, redrawn
    rule = _POW_GRADS.get(float(a[1])) if t is aten.pow.Tensor_Scalar else _UNARY_GRADS.get(t)
    return [(0, rule.format(x=a[0], y=y, g=g))] if rule else None


def _pointwise_grad(group: Group, body: list, env: dict, drops: dict, lang: str = "c") -> dict | None:
    """The group's backward as straight-line code: the forward's lines (recomputed from the saved
    inputs), then each op's rule in reverse order. The kernel's inputs are the forward's, then one
    gradient per output (v<n_in + k>); it writes each distinct input gradient once, over the whole
    iteration space (a broadcast input's is summed to its shape afterwards, as eager does).
    `grads[i]` says where input i's gradient comes from: ("out", j) the kernel's output j,
    ("dy", k) output k's incoming gradient as it is (a residual add passes it through: no copy),
    or None (no path from the input to an output)."""
    n_in = len(group.inputs)
    terms: dict = {x: [] for x in [*group.inputs, *group.nodes]}
    for k, o in enumerate(group.outputs):
        terms[o].append(f"v{n_in + k}")
    lines, alias = list(body), {}
    for j, n in reversed(list(enumerate(group.nodes))):
        if not terms[n]:
            continue
        total = " + ".join(terms[n])
        if len(terms[n]) == 1 and total.isidentifier():
            alias[n] = total  # the gradient passes through unchanged: no new value
        else:
            alias[n] = f"g{j}"
            lines.append(f"const float g{j} = {total};" if lang == "c" else f"g{j} = {total}")
        rule = _grad_terms(n, [env.get(x, x) if isinstance(x, torch.fx.Node) else x for x in n.args],
                           env[n], alias[n], drops.get(n), lang)
        if rule is None:
            return None
        for i, expr in rule:
            if i < len(n.args) and isinstance(n.args[i], torch.fx.Node):
                terms[n.args[i]].append(expr)
    outputs, grads = [], []
    for x in group.inputs:
        total = " + ".join(terms[x])
        if not total or _val(x).dtype in INT_TYPES:  # (an integer input, dequantized, has no gradient)
            grads.append(None)
        elif total.isidentifier() and total.startswith("v") and int(total[1:]) >= n_in:
            grads.append(("dy", int(total[1:]) - n_in))
        else:
            if total not in outputs:
                outputs.append(total)
            grads.append(("out", outputs.index(total)))
    lines, outputs, reads = _only_what_is_read(lines, outputs, n_in, len(group.outputs))
    return {"body": lines, "outputs": outputs, "grads": grads, "reads": reads}


_NAME = re.compile(r"\b[tgv]\d+\b")  # the straight-line code's values: inputs v, temporaries t, gradients g


def _only_what_is_read(lines: list, outputs: list, n_in: int, n_grads: int) -> tuple[list, list, list]:
    """Dead-code elimination of the backward's straight-line code: the lines the outputs need, and
    the forward inputs they read (`reads`), renumbered v0.. in that order, then the incoming
    gradients. The backward kernel takes only those inputs, and autograd keeps only those: a
    residual add or a dropout needs none of its inputs' values, where the whole group's inputs
    used to stay alive until backward."""
    live, kept = set(_NAME.findall(" ".join(outputs))), []
    for line in reversed(lines):
        lhs, rhs = line.split(" = ", 1)
        if lhs.split()[-1] in live:
            live |= set(_NAME.findall(rhs))
            kept.append(line)
    reads = [i for i in range(n_in) if f"v{i}" in live]
    index = {**{i: k for k, i in enumerate(reads)}, **{n_in + k: len(reads) + k for k in range(n_grads)}}
    renumber = lambda text: re.sub(r"\bv(\d+)\b", lambda m: f"v{index[int(m.group(1))]}", text)  # noqa: E731
    return [renumber(line) for line in reversed(kept)], [renumber(o) for o in outputs], reads


def _alias_base(n):
    """The tensor `n` is a view of (following ops whose result aliases their first argument:
    views, and in-place ops, which return their input), or `n` itself."""
    while isinstance(n, torch.fx.Node) and n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) \
            and n.args and n.target._schema.returns and n.target._schema.returns[0].alias_info is not None:
        n = n.args[0]
    return n


def _mutated_bases(graph: torch.fx.Graph) -> set:
    """The tensors the graph modifies in place (through any view of them): export's training
    graph keeps in-place ops such as `h.mul_(3)`."""
    out = set()
    for n in graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        for arg, spec in zip(n.args, n.target._schema.arguments):
            if spec.alias_info is not None and spec.alias_info.is_write and isinstance(arg, torch.fx.Node):
                out.add(_alias_base(arg))
    return out


def _unsafe(group: Group, mutated: set) -> str | None:
    """Why fusing `group` could change the result, or None. The fused call runs where `_place`
    puts it and saves its inputs for backward, so an input modified in place anywhere in the graph
    could be read after the change, or fail autograd's version check in backward. A kernel writes
    row-major outputs, where eager may keep a transposed or channels-last input's layout for a
    later view to rely on."""
    if any(x is not None and _alias_base(x) in mutated for x in group.inputs):
        return "an input (or a tensor it views) is modified in place in the graph: the fused call could read it " \
               "after the change, or save it for a backward that then fails"
    kept = group.outputs[:1] if group.pattern == "softmax" or group.params.get("has_residual") else []
    if any(_alias_base(o) in mutated for o in kept):
        return "an output that autograd keeps for the backward (h = x + r, or softmax's y) is modified in place " \
               "in the graph: the backward would fail"
    if any(not _val(o).is_contiguous() for o in group.outputs):
        return "an output keeps a non-row-major layout in eager (transposed or channels-last) that a kernel's " \
               "row-major output would change"
    return None


def _place(graph: torch.fx.Graph, group: Group) -> torch.fx.Node | None:
    """Where the fused call goes: before the first outside use of any output, after every input."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    members = set(group.nodes)
    first_use = min((order[u] for o in group.outputs for u in o.users if u not in members), default=None)
    last = max(order[n] for n in group.nodes)
    at = last + 1 if first_use is None else min(first_use, last + 1)
    if any(order[x] >= at for x in group.inputs if x is not None):
        return None
    return list(graph.nodes)[at]


def _graph_device(gm: torch.fx.GraphModule) -> str:
    """Where the graph's tensors live: its parameters', else its inputs' (a module without
    parameters, e.g. a softmax, called on GPU tensors)."""
    p = next((p for p in gm.parameters() if p.device.type != "meta"), None)
    if p is not None:
        return p.device.type
    for n in gm.graph.nodes:
        v = n.meta.get("val") if n.op == "placeholder" else None
        if isinstance(v, torch.Tensor) and v.device.type != "meta":
            return v.device.type
    return "cpu"


def fuse_kernels(gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Find fusible groups, generate and compile a kernel for each, and call it from the graph."""


    cfg = ctx.plan.fusion
    declined = []
    device = _graph_device(gm)
    backend = cfg.backend
    if backend == "auto":
        backend = "triton" if device == "cuda" and triton_backend.available("cuda")[0] else "cpu"
    ok, why = triton_backend.available(device) if backend == "triton" else cpu.available()
    if backend == "cpu" and device == "cuda":
        ok, why = False, "the C backend runs on CPU tensors and this graph's are on the GPU"
    if not ok:
        declined.append({"what": f"fusion.backend={backend}", "reason": f"{why}; the ops run unfused"})
        return PassResult(summary=f"fusion: declined ({why})", declined=declined, details={"kernels": []})

    graph = gm.graph
    for n in list(graph.nodes):  # export's dtype/device assertions would pin fused intermediates
        if n.target is aten._assert_tensor_metadata.default and not n.users:
            graph.erase_node(n)
    identities = remove_identities(graph)
    taken: set = set()
    groups: list[Group] = []
    for pattern, finder in (("rmsnorm", find_rmsnorms), ("layernorm", find_layernorms), ("softmax", find_softmaxes)):
        if pattern in cfg.patterns:
            for grp in finder(graph, taken):
                if not any(n in taken for n in grp.nodes):
                    groups.append(grp)
                    taken.update(grp.nodes)
    rewrites = rewrite_tanh_sums(graph) if "pointwise" in cfg.patterns else []
    if "pointwise" in cfg.patterns:
        pw, why_not = find_pointwise(graph, taken)
        groups += pw
        declined += why_not
    kernels = []
    mutated = _mutated_bases(graph)
    for grp in groups:
        grp.refresh()
        why = _unsafe(grp, mutated)
        if why:
            declined.append({"what": ", ".join(n.name for n in grp.nodes), "reason": why})
            continue
        ref = _reference(grp)
        space = tuple(_val(grp.outputs[0]).shape)
        cols = space[-1] if space else 1
        if grp.pattern == "pointwise":
            grp.params = _pointwise_params(grp, "triton" if backend == "triton" else "c")
            kinds = [_kind(_val(x).shape, space) for x in grp.inputs]
        else:
            kinds = ["full" for _ in grp.inputs]
        ops = "_".join(dict.fromkeys(_short(n.target).replace("_", "") for n in grp.nodes  # a C identifier
                                     if n.target in TRANSCENDENTAL or grp.pattern != "pointwise"))
        in_dtypes = [str(_val(x).dtype) if x is not None else None for x in grp.inputs]
        if any(_val(x).dtype in INT_TYPES for x in grp.inputs if x is not None):
            ops = "dequant" + ("_" + ops if ops else "")
        dtype = _val(grp.outputs[0]).dtype
        what = (backend, grp.pattern, grp.params, kinds, space, str(dtype), [_short(n.target) for n in grp.nodes]) \
            + ((in_dtypes,) if ops.startswith("dequant") else ()) \
            + ([tuple(_val(x).shape) if x is not None else None for x in grp.inputs],) \
            + ([grp.inputs.index(x) for x in grp.inputs], [grp.nodes.index(o) for o in grp.outputs])
        # (a softmax mask's rows; x + x: one tensor in two slots; a residual h that is the add or its cast)
        if backend == "cpu":  # compiled in: the streaming-store threshold and bf16 pairs (common.h.j2)
            what += (cpu.nt_bytes(), cpu.pairs())
        digest = hashlib.sha256(repr(what).encode()).hexdigest()[:8]  # same computation -> same kernel
        name = f"{grp.pattern}_{ops[:24].rstrip('_') + '_' if grp.pattern == 'pointwise' and ops else ''}{digest}"
        kernel = KERNELS.get(name) or Kernel(name, grp, ref, kinds, space, cols, backend)
        try:
            src = kernel.build(dtype)
        except Exception as exc:  # noqa: BLE001  (a compiler error declines the group, it never breaks training)
            declined.append({"what": ", ".join(n.name for n in grp.nodes), "reason": f"kernel did not compile: {exc}"})
            continue
        at = _place(graph, grp)
        if at is None:
            declined.append({"what": ", ".join(n.name for n in grp.nodes), "reason": "an input is computed after "
                             "an output is first used (no single place for the fused call)"})
            continue
        KERNELS[name] = kernel
        _register_op(name)
        dropout_p = [float(_dropout_args(n)[0]) for n in grp.nodes if _random_dropout(n)]
        with graph.inserting_before(at):
            call = graph.call_function(getattr(torch.ops.dsc_fused, name).default, ([*grp.inputs],))
            call.meta["val"] = [torch.empty(space, dtype=dtype, device="meta") for _ in grp.outputs] + \
                ([torch.empty((), dtype=torch.int64, device="meta")] if kernel.seeded else [])
            call.meta["dsc.kernel"] = name
            outs = []
            for i, o in enumerate(grp.outputs):
                item = graph.call_function(operator.getitem, (call, i))
                item.meta["val"] = _val(o)
                outs.append(item)
        for o, item in zip(grp.outputs, outs):
            o.replace_all_uses_with(item)
        for n in reversed(grp.nodes):
            if not n.users:
                graph.erase_node(n)
        entry = next((k for k in kernels if k["name"] == name), None)
        if entry is None:
            entry = {"name": name, "backend": backend, "pattern": grp.pattern,
                     "ops": [_short(n.target) for n in grp.nodes], "nodes": [], "uses": 0,
                     "inputs": kinds, "shape": list(space), "dtype": str(dtype).replace("torch.", ""), "source": src}
            if dropout_p:
                entry["dropout_p"] = dropout_p  # drawn with dsc's counter-based RNG, not torch's
            entry["backward"] = "recompute"
            if kernel.has_backward:
                try:
                    bwd_src = kernel.build_backward(dtype)
                    entry["backward"] = "generated" if bwd_src else "pass-through"  # (no kernel needed)
                    if bwd_src:
                        entry["backward_source"] = bwd_src
                except Exception as exc:  # noqa: BLE001  (the recompute still works)
                    kernel._bwd[dtype] = None
                    entry["backward_declined"] = f"backward kernel did not compile: {exc}"
            kernels.append(entry)
        kernel.entry = entry
        entry["uses"] += 1
        entry["nodes"].append([n.name for n in grp.nodes])
    graph.lint()
    gm.recompile()
    ctx.artifacts["kernels"] = kernels
    replaced = sum(len(k["ops"]) * k["uses"] for k in kernels)
    return PassResult(
        summary=f"fusion ({backend}): {len(kernels)} kernel(s) called {sum(k['uses'] for k in kernels)} times "
                f"replace {replaced} ops; {len(declined)} declined"
                + (f"; {len(rewrites)} `1 + tanh(u)` computed as `2 sigmoid(2u)`" if rewrites else "")
                + (f"; {len(identities)} dropout(s) of p=0 removed" if identities else ""),
        changed_graph=bool(kernels or rewrites or identities), declined=declined,
        details={"kernels": kernels, **({"rewrites": {k: v for k, v in (
            ("1 + tanh(u) -> 2 sigmoid(2u)", rewrites), ("dropout with p=0 or in eval -> its input", identities))
            if v}} if rewrites or identities else {})})
