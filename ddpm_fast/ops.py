"""The one dispatch point: validate arguments, pick a backend, call it.

backend="auto" picks the CUDA extension for CUDA tensors (else Triton), the C++ CPU
extension for CPU tensors, and the reference wherever an op has no kernel yet or the
input is float64.  Where autograd needs a graph, ops whose kernels have a backward
(DIFFERENTIABLE) keep their kernels; the others run the reference.  Naming a backend that
cannot run the call raises BackendUnavailableError saying why.  Backends never call each other.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import _checks, _ext
from . import reference as ref
from .reference.attention import MAX_KERNEL_HEAD_DIM, attention_math, check_attention
from .reference.group_norm import check_group_norm, group_norm_math
from .reference.p_step import check_p_step, p_step_math
from .reference.picard import check_picard_step, picard_step_math
from .reference.philox import STREAM_Q_SAMPLE, STREAM_STEP, split_seed
from .reference.q_sample import check_q_sample, draw_seed, q_sample_math
from .schedule import DeviceTables, NoiseSchedule

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

# Which backends have a kernel for each op, in "auto"'s order of preference on a device.  The
# reference has every op.
KERNELS = {
    "philox_randn": ("cpu", "cuda", "triton"),
    "q_sample": ("cpu", "cuda", "triton"),
    "p_step": ("cpu", "cuda", "triton"),
    "picard_step": ("cpu", "cuda", "triton"),
    "group_norm": ("cpu", "cuda", "triton"),
    # CUDA first: on an H200 it ran 3.3x (fp16) and 3.4x (bf16) faster than Triton at 64x1x256x256
    # (benchmarks/results/bench-cuda-quick.json); fp32 and GPUs before sm_80, which it refuses, go on
    # to Triton.
    "attention": ("cuda", "triton"),
}


# Ops whose kernels have a backward (registered with torch.library.register_autograd below).
DIFFERENTIABLE = ("group_norm",)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message says why."""


_STATUS: Optional[dict] = None


def available_backends() -> dict:
    """{backend: True or the reason it cannot run here}."""
    return dict(_statuses())


def _statuses() -> dict:
    # Fixed for the life of the process (TRITON_INTERPRET is read when the kernels are imported)
    # and asked on every op call, so worked out once.
    global _STATUS
    if _STATUS is None:
        _STATUS = {"reference": True, "cpu": _ext.cpu_status(), "cuda": _ext.cuda_status(),
                   "triton": _ext.triton_status()}
    return _STATUS


def _status(backend: str):
    return _statuses()[backend]


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _forward_ad() -> bool:
    """Inside a forward-mode AD level (torch.autograd.forward_ad.dual_level, torch.func.jvp): dual
    tensors do not require grad, and the ops' kernels would drop their tangents without a word."""
    return torch.autograd.forward_ad._current_level >= 0


def pick_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype, grad: bool = False) -> str:
    """The backend that runs this call.  Where autograd needs a graph (``grad``), an op outside
    DIFFERENTIABLE runs the reference, which is plain differentiable PyTorch; so does every op
    inside forward-mode AD, which no kernel implements."""
    _checks.choice(backend, "backend", BACKENDS)
    kernels = KERNELS[op]
    forward_ad = _forward_ad()
    grad = (grad and op not in DIFFERENTIABLE) or forward_ad
    if backend == "auto":
        if dtype == torch.float64 or grad:
            return "reference"
        here = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        for b in kernels:
            if b in here and _status(b) is True:
                return b
        return "reference"
    if backend == "reference":
        return backend
    if forward_ad:
        raise BackendUnavailableError(f"backend={backend!r}: the {op} kernels have no forward-mode AD "
                                      "(torch.func.jvp, torch.autograd.forward_ad); use backend='auto' or 'reference'")
    if grad:
        raise BackendUnavailableError(f"backend={backend!r}: the {op} kernels are forward-only (no autograd); "
                                      "use backend='auto' or 'reference' for inputs that require grad")
    if backend not in kernels:
        raise BackendUnavailableError(f"backend={backend!r}: {op} has no {backend} kernel yet; use 'auto' or 'reference'")
    status = _status(backend)
    if status is not True:
        raise BackendUnavailableError(f"backend={backend!r} is not available: {status}")
    if dtype == torch.float64:
        raise BackendUnavailableError(f"backend={backend!r}: {op} kernels take float32/float16/bfloat16, not float64; "
                                      "use backend='reference' for float64")
    if backend == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(f"backend='cpu' needs CPU tensors, got {device}")
    if backend == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(f"backend='cuda' needs CUDA tensors, got {device}")
    if backend == "triton" and device.type not in ("cuda", "cpu"):
        raise BackendUnavailableError(f"backend='triton' needs CUDA tensors (or CPU ones under TRITON_INTERPRET=1), got {device}")
    if backend == "triton" and device.type == "cpu" and not _interpreting():
        raise BackendUnavailableError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return backend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------- philox
def philox_randn(
    shape: Sequence[int],
    seed: int,
    t: Union[int, torch.Tensor] = 0,
    stream: int = STREAM_STEP,
    sample_offset: int = 0,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """Standard normals [B, *sample] under the noise contract (docs/architecture.md): exactly the noise
    the fused kernels draw in-kernel.  ``t`` is a scalar or a per-sample tensor [B]; sample i
    has global index ``sample_offset + i``."""
    if isinstance(shape, int) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape) \
            or len(shape) < 1:
        raise ValueError(f"shape: expected a sequence of non-negative ints with a batch dimension, got {shape!r}")
    split_seed(seed)
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < 2**32:
        raise ValueError(f"stream: expected an int in [0, 2**32), got {stream!r}")
    _checks.nonneg_int(sample_offset, "sample_offset")
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
    if device is None:
        device = t.device if isinstance(t, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    t_vec = _checks.timesteps(t, shape[0], 2**32, device)
    which = pick_backend("philox_randn", backend, device, dtype)
    if which == "reference":
        return ref.philox_randn(shape, seed, t_vec, stream, sample_offset, device, dtype)
    if which == "triton":
        from .triton.philox import philox_randn as tri

        return tri(t_vec, tuple(shape[1:]), seed, stream, sample_offset, dtype)
    return torch.ops.ddpm_fast.philox_randn(t_vec.contiguous(), list(shape[1:]), _kernel_seed(seed, None), stream,
                                            sample_offset, dtype)


# ----------------------------------------------------------------- diffusion steps
def _layout(x: torch.Tensor):
    """(x in a layout the kernels take, channels_last?): NCHW-contiguous and channels_last pass as
    they are; anything else is copied to contiguous NCHW."""
    if x.is_contiguous():
        return x, False
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def _like_layout(a: Optional[torch.Tensor], x: torch.Tensor, channels_last: bool) -> Optional[torch.Tensor]:
    """a in x's dtype and layout (a copy only when it differs)."""
    if a is None:
        return None
    a = a.to(x.dtype)
    return a.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def seed_bits(seed: int) -> int:
    """A uint64 seed as the int64 with the same bits, the form the op schemas and rng tensors carry."""
    return seed - 2**64 if seed >= 2**63 else seed


def _kernel_seed(seed: Optional[int], noise: Optional[torch.Tensor], rng: Optional[torch.Tensor] = None) -> int:
    """The seed argument of the op schemas: 0 when noise or rng is passed in, else seed (a fresh one
    when None)."""
    if noise is not None or rng is not None:
        return 0
    return seed_bits(draw_seed() if seed is None else seed)


def rng_tensor(seed: int, sample_offset: int = 0, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """The ``rng`` argument of q_sample and p_step: (seed, sample_offset) as an int64 [2] tensor."""
    split_seed(seed)
    _checks.nonneg_int(sample_offset, "sample_offset")
    return torch.tensor([seed_bits(seed), sample_offset], dtype=torch.int64, device=device)


def _rng_values(rng: torch.Tensor):
    """(seed, sample_offset) out of an rng tensor, on the host (the reference's path)."""
    seed, offset = rng.tolist()
    return seed % 2**64, offset


def _contract_noise(noise, seed, like, t_vec, stream, sample_offset):
    """Until an op has a fused kernel, its noise comes from the fastest philox_randn backend
    (the same numbers the reference would draw, to ~1e-6) and its math from the reference."""
    if noise is not None:
        return noise
    seed = draw_seed() if seed is None else seed
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return philox_randn(like.shape, seed, t_vec, stream, sample_offset, like.device, dtype)


def q_sample(
    x0: torch.Tensor,
    t: Union[int, torch.Tensor],
    schedule: Union[NoiseSchedule, DeviceTables],
    noise: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    sample_offset: int = 0,
    return_noise: bool = False,
    backend: str = "auto",
    *,
    rng: Optional[torch.Tensor] = None,
):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (see ddpm_fast.reference.q_sample).

    ``rng`` (see ``rng_tensor``) passes the seed and sample offset as a device tensor that the
    kernel reads when it runs: a captured CUDA graph then replays with whatever it holds."""
    t_vec, sched = check_q_sample(x0, t, schedule, noise, seed, sample_offset)
    _checks.rng(rng, seed, noise, sample_offset, x0)
    which = pick_backend("q_sample", backend, x0.device, x0.dtype, _needs_grad(x0, noise))
    if which == "reference":
        if rng is not None:
            seed, sample_offset = _rng_values(rng)
        noise = _contract_noise(noise, seed, x0, t_vec, STREAM_Q_SAMPLE, sample_offset)
        return q_sample_math(x0, t_vec, sched, noise, None, sample_offset, return_noise)
    scalars = x0.dim() == 1  # [B]: the kernels' [B, C, ...] with C = 1, whose contract draws are the same
    if scalars:
        x0, noise = x0[:, None], None if noise is None else noise[:, None]
    x0, channels_last = _layout(x0)
    noise = _like_layout(noise, x0, channels_last)
    args = (x0, t_vec.contiguous(), sched.to(x0.device).table, noise, _kernel_seed(seed, noise, rng), sample_offset,
            rng, bool(return_noise), channels_last)
    if which == "triton":
        from .triton.q_sample import q_sample as kernel
    else:
        kernel = torch.ops.ddpm_fast.q_sample
    x_t, eps = kernel(*args)
    if scalars:
        x_t, eps = x_t[:, 0], eps[:, 0] if return_noise else eps
    return (x_t, eps) if return_noise else x_t


def p_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    t: Union[int, torch.Tensor],
    schedule: Union[NoiseSchedule, DeviceTables],
    noise: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    sample_offset: int = 0,
    prediction: str = "epsilon",
    variance: str = "fixed_small",
    clip_sample: bool = True,
    clip_range: float = 1.0,
    form: str = "posterior",
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    backend: str = "auto",
    *,
    rng: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x_{t-1} from x_t and the model output (see ddpm_fast.reference.p_step for the math).

    ``rng`` (see ``rng_tensor``) passes the seed and sample offset as a device tensor that the
    kernel reads when it runs: a captured CUDA graph then replays with whatever it holds."""
    args = (noise, seed, sample_offset, prediction, variance, clip_sample, clip_range, form, thresholding,
            dynamic_thresholding_ratio, sample_max_value)
    t_vec, sched = check_p_step(x_t, model_output, t, schedule, *args)
    _checks.rng(rng, seed, noise, sample_offset, x_t)
    which = pick_backend("p_step", backend, x_t.device, x_t.dtype, _needs_grad(x_t, model_output, noise))
    if thresholding and which != "reference":
        if backend != "auto":
            raise BackendUnavailableError(f"backend={backend!r}: dynamic thresholding needs a per-sample quantile "
                                          "and runs on the reference; use backend='auto' or 'reference'")
        which = "reference"
    if which == "reference":
        if rng is not None:
            seed, sample_offset = _rng_values(rng)
            args = (noise, seed, sample_offset, *args[3:])
        noise = _contract_noise(noise, seed, x_t, t_vec, STREAM_STEP, sample_offset)
        return p_step_math(x_t, model_output, t_vec, sched, noise, None, *args[2:])
    x_t, channels_last = _layout(x_t)
    kernel_args = (x_t, _like_layout(model_output, x_t, channels_last), t_vec.contiguous(),
                   sched.to(x_t.device).table, _like_layout(noise, x_t, channels_last), _kernel_seed(seed, noise, rng),
                   sample_offset, rng, _checks.PREDICTIONS.index(prediction), _checks.VARIANCES.index(variance),
                   _checks.FORMS.index(form), bool(clip_sample), float(clip_range), channels_last)
    if which == "triton":
        from .triton.p_step import p_step as kernel
    else:
        kernel = torch.ops.ddpm_fast.p_step
    return kernel(*kernel_args)


def picard_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    t: torch.Tensor,
    schedule: Union[NoiseSchedule, DeviceTables],
    sample: torch.Tensor,
    seed: int,
    prediction: str = "epsilon",
    variance: str = "fixed_small",
    clip_sample: bool = True,
    clip_range: float = 1.0,
    form: str = "posterior",
    backend: str = "auto",
):
    """One Picard iteration over windows of reverse steps: (x', err) for window states x [A, P + 1, C, ...],
    model outputs [A, P, C, ...] at t [A, P] (negative: past the last step), images sample [A]
    (see ddpm_fast.reference.picard for the math).  x' has x's dtype, err is float32 [A, P]."""
    opts = (prediction, variance, clip_sample, clip_range, form)
    sched = check_picard_step(x, model_output, t, schedule, sample, seed, *opts)
    which = pick_backend("picard_step", backend, x.device, x.dtype, _needs_grad(x, model_output))
    if which == "reference":
        return picard_step_math(x, model_output, t, sched, sample, seed, *opts,
                                noise=_window_noise(x, t, sample, seed))
    kernel_args = (x.contiguous(), model_output.to(x.dtype).contiguous(), t.contiguous(), sched.to(x.device).table,
                   sample.contiguous(), seed_bits(seed), _checks.PREDICTIONS.index(prediction),
                   _checks.VARIANCES.index(variance), _checks.FORMS.index(form), bool(clip_sample), float(clip_range))
    if which == "triton":
        from .triton.picard import picard_step as kernel
    else:
        kernel = torch.ops.ddpm_fast.picard_step
    return kernel(*kernel_args)


def _window_noise(x, t, sample, seed):
    """The contract's step noise for every window position, from the fastest philox_randn backend
    (the numbers p_step's reference path draws, so a window of 1 matches it bit for bit)."""
    A, P = t.shape
    shape = x.shape[2:]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = t.clamp(min=0)
    first = int(sample[0]) if A else 0
    if torch.equal(sample.cpu(), torch.arange(first, first + A)):  # a run of consecutive images: one draw per position
        cols = [philox_randn((A, *shape), seed, t[:, j], STREAM_STEP, first, x.device, dtype) for j in range(P)]
        return torch.stack(cols, dim=1)
    rows = [torch.stack([philox_randn((1, *shape), seed, t[a, j:j + 1], STREAM_STEP, int(sample[a]), x.device, dtype)[0]
                         for j in range(P)]) for a in range(A)]
    return torch.stack(rows)


# ------------------------------------------------------------------- U-Net layers
def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    add: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    silu: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """y = act(GroupNorm(x + add) * (1 + scale) + shift) (see ddpm_fast.reference.group_norm).

    Differentiable in x, weight, bias, add, scale and shift on every backend: the kernels save the
    group statistics (float32 mean and rstd [B, G]) and their backward recomputes the rest."""
    check_group_norm(x, num_groups, weight, bias, eps, add, scale, shift)
    grad = _needs_grad(x, weight, bias, add, scale, shift)
    which = pick_backend("group_norm", backend, x.device, x.dtype, grad)
    functorch = grad and not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()
    if which != "reference" and functorch and _func_grad_active():
        if backend != "auto":
            raise BackendUnavailableError(f"backend={backend!r}: the group_norm kernels' autograd does not run "
                                          "under torch.func transforms; use backend='auto' or 'reference'")
        which = "reference"
    if which == "reference":
        return group_norm_math(x, num_groups, weight, bias, eps, add, scale, shift, silu)
    x, channels_last = _layout(x)
    # The kernels read parameters in float32 or in x's dtype (as they come from a bf16 model, or a
    # projection under autocast: no cast to launch); others are cast to float32, and .to() carries
    # their gradients back to the callers' dtypes.
    w, b, a, sc, sh = (p if p is None or (p.dtype in (torch.float32, x.dtype) and p.is_contiguous())
                       else p.to(torch.float32).contiguous() for p in (weight, bias, add, scale, shift))
    kernel = _triton_group_norm_op() if which == "triton" else torch.ops.ddpm_fast.group_norm
    args = (x, num_groups, w, b, float(eps), a, sc, sh, bool(silu), channels_last)
    if torch.compiler.is_compiling() or functorch:  # vmap: the registered op, through vmap's fallback
        return kernel(*args)[0]
    if grad:
        return _GN_FUNCTIONS[kernel].apply(*args)[0]
    # Nothing to record: past the autograd wrapper that torch.library puts around the op, as that
    # wrapper itself would go (a third of a small call's host time, which at batch 1 is all of it).
    with torch._C._AutoDispatchBelowAutograd():
        return kernel(*args)[0]


def _func_grad_active() -> bool:
    """Inside torch.func.grad/vjp, which torch.library's registered autograd does not take (it
    raises inside torch); vmap alone it does."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Grad for i in retrieve_all_functorch_interpreters())


def _gn_setup_context(ctx, inputs, output):
    x, num_groups, w, b, _eps, add, scale, shift, silu, channels_last = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, w, b, add, scale, shift, mean, rstd)
    ctx.num_groups, ctx.silu, ctx.channels_last = num_groups, silu, channels_last
    ctx.mark_non_differentiable(mean, rstd)


def _gn_backward_with(backward_op):
    """The autograd backward of a group_norm kernel op over its backend's backward op."""

    def backward(ctx, dy, _dmean, _drstd):
        x, w, b, add, scale, shift, mean, rstd = ctx.saved_tensors
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        dy = dy.to(x.dtype).contiguous(memory_format=fmt)
        # The backward ops take float32 parameters (the CUDA one reads them in its hot loop), and so does
        # the [B, C] work below: 1 + scale must not round in a 16-bit dtype.
        w, b, add, scale, shift = (None if p is None else p.float() for p in (w, b, add, scale, shift))
        dx, sums = backward_op(dy, x, mean, rstd, ctx.num_groups, w, b, add, scale, shift, ctx.silu, ctx.channels_last)
        need = ctx.needs_input_grad
        dw, db, dadd, dscale, dshift = group_norm_param_grads(sums, w, b, scale, need[2], need[3], need[5], need[6],
                                                              need[7])
        return dx if need[0] else None, None, dw, db, None, dadd, dscale, dshift, None, None

    return backward


def group_norm_param_grads(sums: torch.Tensor, w: Optional[torch.Tensor], b: Optional[torch.Tensor],
                           scale: Optional[torch.Tensor], need_w: bool, need_b: bool, need_add: bool,
                           need_scale: bool, need_shift: bool) -> Tuple[Optional[torch.Tensor], ...]:
    """(dweight, dbias, dadd, dscale, dshift) from a group_norm backward op's per (sample, channel)
    sums [4, B, C] (S1 = sum dz, S2 = sum dz xhat, S3 = sum xhat, and dadd, which needs the group
    sums the kernels have; formulas in csrc/include/ddpm_fast/group_norm.h): None where not needed,
    views where the sums hold the gradient, else [B, C]-sized work."""
    S1, S2, _, dadd = sums.unbind(0)
    dw = (S2 if scale is None else S2 * (1 + scale)).sum(0) if need_w else None
    db = (S1 if scale is None else S1 * (1 + scale)).sum(0) if need_b else None
    dscale = None
    if need_scale:
        dscale = S2 if w is None else S2 * w
        dscale = dscale if b is None else dscale + S1 * b
    return dw, db, dadd if need_add else None, dscale, S1 if need_shift else None


def _gn_function(kernel, backward_op):
    """The kernel op's registered autograd (the same forward, setup_context and backward) as a plain
    torch.autograd.Function, for eager calls that record a graph: torch.library's autograd wrapper
    costs more host time than the kernel op itself (a 2x64ch@2x2 forward with grad on one CPU
    thread: 50 us through the registered op, 22 us through this).  torch.compile takes the
    registered op, which it traces."""

    # forward(ctx, ...) rather than a setup_context: apply() binds a setup_context Function's arguments
    # with inspect.signature on every call (17 us of them on that CPU).
    class GroupNormFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                out = kernel(*args)
            _gn_setup_context(ctx, args, out)
            return out

        backward = staticmethod(_gn_backward_with(backward_op))

    return GroupNormFunction


_GN_FUNCTIONS = {}  # kernel op -> its _gn_function
if _ext._C is not None:
    torch.library.register_autograd("ddpm_fast::group_norm", _gn_backward_with(torch.ops.ddpm_fast.group_norm_backward),
                                    setup_context=_gn_setup_context)
    _GN_FUNCTIONS[torch.ops.ddpm_fast.group_norm] = _gn_function(torch.ops.ddpm_fast.group_norm,
                                                                 torch.ops.ddpm_fast.group_norm_backward)

_TRITON_GN = None


def _triton_group_norm_op():
    """ddpm_fast_triton::group_norm (ddpm_fast/triton/group_norm.py), its autograd registered on first use."""
    global _TRITON_GN
    if _TRITON_GN is None:
        from .triton import group_norm as tri

        tri.group_norm_op.register_autograd(_gn_backward_with(tri.group_norm_backward_op),
                                            setup_context=_gn_setup_context)
        _GN_FUNCTIONS[tri.group_norm_op] = _gn_function(tri.group_norm_op, tri.group_norm_backward_op)
        _TRITON_GN = tri.group_norm_op
    return _TRITON_GN


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
              backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T * scale) v on [B, heads, L, d]; scale defaults to 1/sqrt(d)."""
    check_attention(q, k, v, scale)
    which = pick_backend("attention", backend, q.device, q.dtype, _needs_grad(q, k, v))
    if which in ("triton", "cuda"):
        # auto goes on down KERNELS past a kernel that refuses q (the CUDA one: fp32, before sm_80)
        tried = KERNELS["attention"][KERNELS["attention"].index(which):] if backend == "auto" else (which,)
        for which in (b for b in tried if _status(b) is True):
            refusal = _attention_refusal(which, q)
            if refusal is None:
                break
        if refusal is None:
            scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
            if which == "triton":
                from .triton.attention import attention as kernel

                return kernel(q, k, v, scale)
            return torch.ops.ddpm_fast.attention(q, k, v, scale)
        if backend != "auto":
            raise BackendUnavailableError(f"backend={backend!r}: {refusal}; use backend='auto' or 'reference'")
        _warn_once(f"ddpm_fast.attention: {refusal}, falling back to "
                   "torch.nn.functional.scaled_dot_product_attention")
        which = "sdpa"
    if which == "sdpa" or (backend == "auto" and which == "reference" and q.dtype != torch.float64
                           and not _forward_ad()):
        # Where no kernel of ours runs (the CPU; d above the kernels' limit) torch's SDPA is the fast path;
        # not in forward-mode AD, which SDPA's fused kernels do not implement.
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return attention_math(q, k, v, scale)


def _attention_refusal(backend: str, q: torch.Tensor) -> Optional[str]:
    """Why this attention kernel cannot take q (None when it can)."""
    d = q.shape[-1]
    if d > MAX_KERNEL_HEAD_DIM:
        return f"head dimension d={d} is above the kernels' {MAX_KERNEL_HEAD_DIM}"
    if backend == "cuda":
        if q.dtype not in (torch.float16, torch.bfloat16):
            return (f"the CUDA attention kernel runs fp16/bf16 on tensor cores, got {q.dtype} "
                    "(backend='triton' takes float32)")
        major, minor = torch.cuda.get_device_capability(q.device)
        if major < 8:
            return f"the CUDA attention kernel needs compute capability 8.0 or newer (mma.sync), got {major}.{minor}"
    return None


_WARNED = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)
