"""Peak live tensor bytes of a computation, measured on the meta device: no weights, no arithmetic.

``measure(fn, autocast=...)`` runs ``fn`` under two modes and returns ``Usage(peak, end)``: the largest and the
final number of bytes held by the storages that ops allocated while ``fn`` ran. Tensors that existed before
(the parameters of a network, its optimizer states) are not counted; whatever ``fn`` creates is, including
the gradients that ``backward`` accumulates into ``.grad``.

- ``LiveBytes`` (a ``TorchDispatchMode``, below autograd) sees every aten op. An output whose storage is not
  one of the op's inputs' (a view or an in-place result shares it) is an allocation of ``storage.nbytes()``;
  a ``weakref.finalize`` on the storage frees those bytes when it dies. Autograd's saved tensors keep their
  storages alive, so a forward under grad holds exactly what backward will read. On the meta device the
  kernels only compute shapes, so each op's output metadata is memoised by (op, the arguments' shapes,
  strides, dtypes and values): the repeated blocks of a transformer cost one real meta-kernel call each.
- ``CudaKernels`` (a ``TorchFunctionMode``, above autograd) stands in for the two things a CUDA device does
  that meta's reference kernels do not: ``scaled_dot_product_attention`` runs a fused kernel (flash for
  fp16/bf16 without a mask, else memory-efficient: output and log-sum-exp only, never the N×N matrix the
  meta math path materialises, unless ``torch.nn.attention.sdpa_kernel`` allows only the math backend), and
  ``torch.autocast`` is emulated with CUDA's op policy (meta tensors have no autocast dispatch key): the ops
  of ``LOWER_PRECISION`` cast fp32 floating inputs to the autocast dtype (a leaf that requires grad is cast
  once, with its graph, and cached for the whole region, as autocast's weight cache, even under no_grad), the
  ops of ``FP32`` cast fp16/bf16 inputs up.

What is not modelled (bytes outside PyTorch's tensors): cuBLAS/cuDNN workspaces, the CUDA context, NCCL
buffers, allocator rounding and fragmentation; ``bench.plan`` adds a fixed reserve for them.

Validated in tests/test_plan.py: closed forms on a chain of Linear layers (forward with and without grad,
backward, AdamW's step), and the CPU allocator's own record (torch.profiler memory events) of a tiny diffusers
UNet's forward and training step, which the tracker matches to the byte in fp32.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

# torch.autocast's CUDA op policy (the PyTorch AMP docs, "CUDA Ops that can autocast to float16 / float32"), by
# the __name__ of the torch function (F.linear's is "linear"; Tensor.__matmul__'s "__matmul__")
LOWER_PRECISION = frozenset({
    "__matmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul", "multi_dot", "conv1d",
    "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear", "matmul", "mm", "mv",
    "prelu", "scaled_dot_product_attention"})
FP32 = frozenset({
    "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits", "cosh",
    "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum", "dist", "erfinv",
    "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss", "layer_norm", "log", "log_softmax",
    "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss", "multilabel_margin_loss", "multi_margin_loss",
    "nll_loss", "norm", "normalize", "pdist", "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh",
    "smooth_l1_loss", "soft_margin_loss", "softmax", "softmin", "softplus", "sum", "renorm", "tan",
    "triplet_margin_loss"})
# the CPU policy (docs, "CPU Ops that can autocast to bfloat16 / float32"; the ops a diffusion network calls), used
# only to compare the emulation with a real CPU autocast run in the tests
CPU_LOWER_PRECISION = frozenset({
    "conv1d", "conv2d", "conv3d", "bmm", "mm", "baddbmm", "addmm", "addbmm", "linear", "matmul", "__matmul__",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "prelu", "scaled_dot_product_attention"})
CPU_FP32 = frozenset({
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "nll_loss", "cross_entropy", "kl_div",
    "binary_cross_entropy_with_logits", "cdist", "prod"})
POLICIES = {"cuda": (LOWER_PRECISION, FP32), "cpu": (CPU_LOWER_PRECISION, CPU_FP32)}
HALF = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Usage:
    """Bytes allocated inside a measured computation: ``peak`` (the most held at once) and ``end`` (still held
    when it returned: outputs it kept, gradients, the autocast weight cache)."""

    peak: int
    end: int


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


class _Uncacheable(Exception):
    pass


def _meta_key(x):
    """A hashable description of an op argument: meta tensors by shape, strides and dtype (all a meta kernel reads),
    plain values as they are; anything else (a script object, a generator) makes the op uncacheable."""
    if isinstance(x, torch.Tensor):
        return (x.shape, x.stride(), x.dtype, x.is_conj() or x.is_neg())
    if isinstance(x, (list, tuple)):
        return (type(x), *map(_meta_key, x))
    if isinstance(x, _PLAIN):
        return (type(x), x)
    raise _Uncacheable


def _tensors(args, kwargs):
    """The tensors among an op's arguments (top level, and inside lists / tuples)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (v for v in a if isinstance(v, torch.Tensor))


def _outputs(out):
    """The tensors an op returned (a tensor, or a tuple / list of them and other values)."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (list, tuple)):
        return tuple(o for o in out if isinstance(o, torch.Tensor))
    return ()


def _spec(o):
    return ("out", tuple(o.shape), o.stride(), o.dtype) if isinstance(o, torch.Tensor) else o


def _rebuild(spec):
    if isinstance(spec, tuple) and spec and spec[0] == "out":
        return torch.empty_strided(spec[1], spec[2], dtype=spec[3], device="meta")
    return spec


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op allocates while active; frees them when the storage dies.

    ``live`` and ``peak`` are bytes. Meta-kernel outputs are memoised process-wide (see the module docstring); ops
    with aliasing or mutable schemas, and ops on other devices, always run.
    """

    _meta_cache: dict = {}  # (op, argument metadata) -> output metadata: shape functions, the same for every tracker
    _fresh: dict = {}  # op -> whether its outputs are new tensors (no alias, not mutating)

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._bytes: dict[int, int] = {}  # id(storage) -> bytes, for the storages allocated here and still alive

    def bump(self, transient: int) -> None:
        """Account for a computation that held `transient` bytes on top of what is live now, then freed them."""
        self.peak = max(self.peak, self.live + transient)

    def _fresh_outputs(self, func) -> bool:
        fresh = self._fresh.get(func)
        if fresh is None:
            schema = func._schema
            fresh = self._fresh[func] = not schema.is_mutable and all(r.alias_info is None for r in schema.returns)
        return fresh

    def _run(self, func, args, kwargs, tensors):
        if not self._fresh_outputs(func) or any(t.device.type != "meta" for t in tensors):
            return func(*args, **kwargs)
        try:
            key = (func, _meta_key(args), _meta_key(tuple(kwargs.items())))
        except _Uncacheable:
            return func(*args, **kwargs)
        hit = self._meta_cache.get(key)
        if hit is not None:
            kind, specs = hit
            return _rebuild(specs) if kind == "one" else kind(_rebuild(s) for s in specs)
        out = func(*args, **kwargs)
        if all(o.device.type == "meta" for o in _outputs(out)):
            if isinstance(out, (list, tuple)):
                self._meta_cache[key] = (type(out), tuple(_spec(o) for o in out))
            elif isinstance(out, torch.Tensor):
                self._meta_cache[key] = ("one", _spec(out))
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = tuple(_tensors(args, kwargs))
        out = self._run(func, args, kwargs, tensors)
        inputs = {id(t.untyped_storage()) for t in tensors}
        for t in _outputs(out):
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._bytes:
                continue
            self._bytes[key] = n = storage.nbytes()
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._bytes.pop(key)


class CudaKernels(TorchFunctionMode):
    """Fused attention and (optionally) autocast as a CUDA device runs them; see the module docstring.

    `autocast`: the autocast dtype (torch.bfloat16 / torch.float16) or None (no autocast region); `policy`:
    "cuda" (the default) or "cpu" (to compare with a real CPU autocast run).
    """

    def __init__(self, autocast: torch.dtype | None = None, policy: str = "cuda"):
        super().__init__()
        self.autocast = autocast
        self.lower, self.fp32 = POLICIES[policy]
        self._weight_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(leaf) -> (leaf, its cast)

    def _down(self, t):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            return t
        if t.requires_grad and t.is_leaf and not t._is_view():  # autocast's weight cache, filled under no_grad too
            hit = self._weight_cache.get(id(t))
            if hit is None:
                with torch.enable_grad():  # as torch's: a cast cached under no_grad still leads back to the leaf
                    hit = self._weight_cache[id(t)] = (t, t.to(self.autocast))
            return hit[1]
        return t.to(self.autocast)

    @staticmethod
    def _up(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype in HALF else t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.autocast is not None and "dtype" not in kwargs:
            if name in self.lower:
                args, kwargs = tree_map(self._down, (args, kwargs))
            elif name in self.fp32:
                args, kwargs = tree_map(self._up, (args, kwargs))
        if name == "scaled_dot_product_attention" and _fused_attention_allowed():
            return fused_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _fused_attention_allowed() -> bool:
    """False inside ``sdpa_kernel(SDPBackend.MATH)`` (R1 penalties need the double-differentiable math kernel)."""
    return torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()


def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` through the kernel CUDA picks: flash (fp16/bf16, no mask, head dim ≤ 256)
    or memory-efficient attention; either keeps the output and a [B, H, N] float32 log-sum-exp for backward."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    if attn_mask is None and query.dtype in HALF and query.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  scale=scale)[0]
    grad = query.requires_grad or key.requires_grad or value.requires_grad
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(~attn_mask,
                                                                                                   float("-inf"))
    if attn_mask is not None:
        attn_mask = attn_mask.expand(*query.shape[:-1], key.shape[-2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, grad, dropout_p,
                                                                  is_causal, scale=scale)[0]


def backward(loss: torch.Tensor, inputs: tuple[torch.Tensor, ...] = (), create_graph: bool = False):
    """``loss.backward()`` (or ``torch.autograd.grad(loss, inputs, create_graph=...)`` when `inputs` are given) with
    the modes left active: ``Tensor.backward`` is a torch function, and a mode's handler runs a torch function with
    the mode popped, so gradient checkpointing would recompute without them. Returns the input gradients (or ())."""
    from torch.autograd.graph import _engine_run_backward

    ones = torch.ones_like(loss)
    if inputs:
        return _engine_run_backward((loss,), (ones,), create_graph, create_graph, inputs, True, False)
    _engine_run_backward((loss,), (ones,), False, False, (), True, True)
    return ()


def measure(fn, autocast: torch.dtype | None = None, policy: str = "cuda") -> Usage:
    """`fn(tracker)` run under ``CudaKernels(autocast, policy)`` and a ``LiveBytes`` `tracker`: the bytes it allocated.

    Gradients `fn` leaves in ``.grad`` count in ``end``; clear them before measuring again."""
    tracker, kernels = LiveBytes(), CudaKernels(autocast, policy)
    with kernels, tracker:
        fn(tracker)
    return Usage(tracker.peak, tracker.live)  # read while `kernels` (its weight cache) is alive
