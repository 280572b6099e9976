"""Parallel-in-time sampling: Picard iterations over a sliding window of reverse steps (ParaDiGMS,
Shih et al., NeurIPS 2023).

Every image keeps a window of P + 1 states: x_0 (converged, the input to step k) and guesses of the
inputs to steps k - 1 .. k - P + 1 and of the output of step k - P + 1.  One round evaluates the model on
the first P states of every active image as ONE batch, then ops.picard_step applies all P fused
reverse steps (with the noise contract's z(seed, image, t), so the target is the sequential
trajectory itself) and the scan x_{j+1}' = S_j + (x_j' - x_j) (ddpm_fast/reference/picard.py).

Convergence, per image, as in the paper's Algorithm 1: the output of window step j has converged
when ||x_{j+1}' - x_{j+1}||^2 / D <= tol^2 * beta_{t_j} (D: elements per image; beta_t the step's
noise variance, which unlike the posterior variance is never 0).  The window slides past the
first position that has not (at least 1: the first output is exact), new positions start from
the last state, and an image whose window has passed t = 0 leaves the batch.  With max_iters, an
output refined that many times counts as converged whatever its error (a cap on the model
evaluations per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import ops


@dataclass(frozen=True)
class ParallelConfig:
    """window: steps refined at once (P); tol: the convergence tolerance (0: the sequential
    trajectory up to rounding); max_iters: Picard iterations after which an output counts as
    converged (None: no cap)."""
    window: int = 16
    tol: float = 0.1
    max_iters: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window: expected a positive int, got {self.window!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not 0 <= self.tol < float("inf"):
            raise ValueError(f"tol: expected a finite number >= 0, got {self.tol!r}")
        if self.max_iters is not None and (isinstance(self.max_iters, bool) or not isinstance(self.max_iters, int)
                                           or self.max_iters < 1):
            raise ValueError(f"max_iters: expected a positive int or None, got {self.max_iters!r}")


@dataclass
class ParallelStats:
    """Per image of the last run: rounds (batched model calls it took part in, the sequential
    depth) and evaluations (model evaluations spent on it: window positions summed over rounds)."""
    rounds: torch.Tensor
    evaluations: torch.Tensor


def run(sampler, x: torch.Tensor, tables, t_model: torch.Tensor, seed: int, i0: int, cfg: ParallelConfig,
        bar=None, graphs: Optional[dict] = None):
    """The final states of the images i0 .. i0 + B - 1 from their x_T [B, C, ...], and ParallelStats.
    graphs: the sampler's captures, which the rounds' captures join (keyed by window state shape)."""
    graphs = {} if graphs is None else graphs
    B, shape, device = x.shape[0], tuple(x.shape[1:]), x.device
    K = len(t_model)
    P = min(cfg.window, K)
    D = x[0].numel()
    betas = tables.row("betas")  # the step noise variances, as the kernels read them
    thresh_scale = float(cfg.tol) ** 2 * D
    state = x.float()[:, None].expand(B, P + 1, *shape).contiguous()
    k = torch.full((B,), K - 1, dtype=torch.long, device=device)  # the step whose input is window position 0
    refined = torch.zeros(B, P, dtype=torch.long, device=device)
    active = torch.arange(B, device=device)
    rounds = torch.zeros(B, dtype=torch.long)
    evals = torch.zeros(B, dtype=torch.long)
    out = torch.empty(B, *shape, dtype=torch.float32, device=device)
    pos = torch.arange(P, device=device)
    while active.numel():
        A = active.numel()
        w = min(P, int(k.max()) + 1)  # no position past the end of every window
        t = k[:, None] - pos[:w]
        if sampler.cuda_graphs and w == P and _kernel_backend(sampler, device):
            new, err = _graphed_round(sampler, graphs, state, t, tables, t_model, seed, i0 + active)
        else:
            new, err = _round(sampler, state[:, :w + 1], t, tables, t_model, seed, i0 + active)
        rounds[active.cpu()] += 1
        evals[active.cpu()] += w
        ok = err <= thresh_scale * betas[t.clamp(min=0)]
        refined[:, :w] += 1
        if cfg.max_iters is not None:
            ok |= refined[:, :w] >= cfg.max_iters
        # ParaDiGMS' stride: past every output whose input was stable (the first output is exact), at most w
        bad = torch.cat([~ok, torch.ones(A, 1, dtype=torch.bool, device=device)], dim=1)
        stride = (1 + bad.int().argmax(dim=1)).clamp(max=w)
        src = (stride[:, None] + torch.arange(P + 1, device=device)).clamp(max=w)
        state = new.gather(1, src.view(A, P + 1, *([1] * len(shape))).expand(A, P + 1, *shape))
        moved = stride[:, None] + pos
        refined = refined.gather(1, moved.clamp(max=P - 1)).masked_fill(moved >= w, 0)
        if bar is not None:
            bar.update(int(torch.minimum(stride, k + 1).sum()))
        k = k - stride
        done = k < 0
        if bool(done.any()):
            out[active[done]] = state[done, 0]
            keep = ~done
            active, state, k, refined = active[keep], state[keep].contiguous(), k[keep], refined[keep]
    return out, ParallelStats(rounds, evals)


def _kernel_backend(sampler, device) -> bool:
    # The reference draws its noise with host reads, which a CUDA graph cannot capture.
    return ops.pick_backend("picard_step", sampler.backend, device, torch.float32) != "reference"


def _model_input(sampler, states: torch.Tensor) -> torch.Tensor:
    x = states.reshape(-1, *states.shape[2:])
    return x.contiguous(memory_format=torch.channels_last) if sampler.channels_last else x.contiguous()


def _round(sampler, state, t, tables, t_model, seed, sample):
    """One Picard iteration: the model on every (image, position) of the windows as one batch, then
    the fused steps and scan."""
    A, w = t.shape
    x_in = _model_input(sampler, state[:, :w])
    eps = sampler._eps(x_in, t_model[t.clamp(min=0)].reshape(-1))
    sampler._check_output(eps, x_in)
    return ops.picard_step(state, eps.reshape(A, w, *eps.shape[1:]), t, tables, sample, seed,
                           backend=sampler.backend, **sampler.options)


def _graphed_round(sampler, graphs, state, t, tables, t_model, seed, sample):
    """_round as a CUDA graph over static buffers, captured once per window state shape
    [images, P + 1, C, ...] and replayed with the round's states, timesteps and image indices copied in."""
    key = state.shape
    if key not in graphs:
        g = dict(state=state.clone(), t=t.clone(), sample=sample.clone(), graph=torch.cuda.CUDAGraph())
        side = torch.cuda.Stream(state.device)
        side.wait_stream(torch.cuda.current_stream(state.device))
        with torch.cuda.stream(side):  # warm-up outside the graph (allocator, autotuning, lazy init)
            for _ in range(2):
                _round(sampler, g["state"], g["t"], tables, t_model, seed, g["sample"])
        torch.cuda.current_stream(state.device).wait_stream(side)
        with torch.cuda.graph(g["graph"]):
            g["new"], g["err"] = _round(sampler, g["state"], g["t"], tables, t_model, seed, g["sample"])
        graphs[key] = g
    g = graphs[key]
    g["state"].copy_(state)
    g["t"].copy_(t)
    g["sample"].copy_(sample)
    g["graph"].replay()
    return g["new"].clone(), g["err"].clone()
