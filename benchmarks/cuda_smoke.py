"""One small call of every kernel of a backend (and of each of its paths), checked against the
reference: run under `compute-sanitizer --tool memcheck` (and racecheck) by gpu_validate.sh, for the
CUDA kernels and then the Triton ones.  Odd sizes on purpose (partial groups of 4, partial blocks).

    python benchmarks/cuda_smoke.py [--backend cuda|triton|cpu] [--device cuda|cpu]

The CPU runs (--backend cpu, or triton under TRITON_INTERPRET=1, with --device cpu) check the
script itself where there is no GPU.  Exit status 1 if a check failed.
"""

import argparse
import sys

import torch

import ddpm_fast as df

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="cuda", choices=["cuda", "triton", "cpu"])
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cpu for --backend cpu, else cuda")
    args = p.parse_args(argv)
    backend = args.backend
    dev = args.device or ("cpu" if backend == "cpu" else "cuda")
    status = df.available_backends()[backend]
    if status is not True:
        print(f"{backend} backend unavailable: {status}")
        return 1
    failures = 0
    t = torch.tensor([0, 999, 17], device=dev)
    for dtype in DTYPES:
        z = df.philox_randn((3, 3, 5, 7), 2**63 + 5, t=t, stream=1, sample_offset=9, dtype=dtype, backend=backend)
        ref = df.philox_randn((3, 3, 5, 7), 2**63 + 5, t=t.cpu(), stream=1, sample_offset=9, backend="reference")
        err = (z.float().cpu() - ref).abs().max().item()
        ok = err <= 1e-6 + torch.finfo(dtype).eps * 4
        failures += not ok
        print(f"philox_randn {dtype}: max abs diff {err:.2e} {'ok' if ok else 'FAIL'}")
    if backend == "cuda":  # the raw counter-based words, against the C++ CPU op
        c = torch.randint(0, 2**32, (37, 4))
        k = torch.randint(0, 2**32, (37, 2))
        same = torch.equal(torch.ops.ddpm_fast.philox4x32(c.cuda(), k.cuda()).cpu(), torch.ops.ddpm_fast.philox4x32(c, k))
        failures += not same
        print(f"philox4x32 words, CUDA against CPU: {'ok' if same else 'FAIL'}")
    s = df.NoiseSchedule.linear(1000)
    for dtype in DTYPES:
        for shape in ((3, 3, 5, 7), (2, 4, 8, 8)):  # odd (scalar path) and 16-byte multiples (vector path)
            for fmt in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(shape, device=dev).to(dtype).contiguous(memory_format=fmt)
                out = torch.randn(shape[0], 2 * shape[1], *shape[2:], device=dev).to(dtype)
                out = out.contiguous(memory_format=fmt)
                tt = torch.arange(shape[0], device=dev) * 300
                y = df.p_step(x, out, tt, s, seed=3, variance="learned_range", backend=backend)
                z = df.philox_randn(shape, 3, t=tt, backend=backend)
                ref = df.reference.p_step(x.double(), out.double(), tt, s, noise=z.double(), variance="learned_range")
                err = ((y.double() - ref).norm() / ref.norm()).item()
                q, eps = df.q_sample(x, tt, s, seed=4, return_noise=True, backend=backend)
                qref = df.reference.q_sample(x.double(), tt, s, noise=eps.double())
                qerr = ((q.double() - qref).norm() / qref.norm()).item()
                ok = max(err, qerr) < (1e-5 if dtype == torch.float32 else 1e-2)
                failures += not ok
                print(f"p_step/q_sample {dtype} {tuple(shape)} {fmt}: rel err {err:.1e} / {qerr:.1e} "
                      f"{'ok' if ok else 'FAIL'}")
    for dtype in DTYPES:
        # the on-chip, split and (channels_last groups narrower than a sector) rows paths, each with
        # scalar, 4-value and (16-bit) 8-value accesses on a GPU of 65 to 192 SMs (tests/test_group_norm.py's
        # CUDA_GN_PATHS), 4096 channels a group: the backward's largest [3][CG] shared table (48 KiB), and
        # on CUDA 8192 on chip: its table in opted-in shared memory (96 KiB).  The parameters in x's
        # dtype (the kernels read float32 ones in the float32 rounds).
        wide = [((128, 8192, 1, 1), 1)] if backend == "cuda" else []
        for shape, groups in [((17, 128, 4, 4), 64), ((1, 64, 33, 31), 8), ((2, 96, 9, 11), 32), ((3, 64, 6, 5), 16),
                              ((1, 4096, 2, 4), 1)] + wide:
            for fmt in (torch.contiguous_format, torch.channels_last):
                B, C = shape[:2]
                x = torch.randn(shape, device=dev).to(dtype).contiguous(memory_format=fmt)
                w, b = torch.randn(C, device=dev).to(dtype), torch.randn(C, device=dev).to(dtype)
                add, sc, sh = (torch.randn(B, C, device=dev).to(dtype) for _ in range(3))
                leaves = [t.requires_grad_() for t in (x, w, b, add, sc, sh)]
                y = df.group_norm(x, groups, w, b, add=add, scale=sc, shift=sh, silu=True, backend=backend)
                dy = torch.randn_like(y)
                grads = torch.autograd.grad(y, leaves, dy)  # the backward kernels
                ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
                rx, rw, rb, ra, rs, rh = ref_leaves
                ref = df.reference.group_norm(rx, groups, rw, rb, add=ra, scale=rs, shift=rh, silu=True)
                ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())
                err = ((y.double() - ref).norm() / ref.norm()).item()
                gerr = max(((g.double() - r).norm() / r.norm()).item() for g, r in zip(grads, ref_grads))
                ok = max(err, gerr) < (1e-5 if dtype == torch.float32 else 1e-2)
                failures += not ok
                print(f"group_norm fwd/bwd {dtype} {tuple(shape)} G={groups} {fmt}: rel err {err:.1e} / {gerr:.1e} "
                      f"{'ok' if ok else 'FAIL'}")
    for dtype in DTYPES:
        # windows [A, P + 1, C, H, W]: odd sizes, one window running past t = 0 (negative t: no step)
        x = torch.randn(3, 5, 3, 5, 7, device=dev).to(dtype)
        out = torch.randn(3, 4, 6, 5, 7, device=dev).to(dtype)
        tw = torch.tensor([[900], [2], [40]], device=dev) - torch.arange(4, device=dev)
        sample = torch.tensor([7, 0, 12], device=dev)
        y, perr = df.picard_step(x, out, tw, s, sample, 5, variance="learned_range", backend=backend)
        ry, rerr = df.reference.picard_step(x.double().cpu(), out.double().cpu(), tw.cpu(), s, sample.cpu(), 5,
                                            variance="learned_range")
        err = ((y.double().cpu() - ry).norm() / ry.norm()).item()
        eerr = ((perr.double().cpu() - rerr).norm() / rerr.norm()).item()
        ok = max(err, eerr) < (4e-5 if dtype == torch.float32 else 1e-2)  # the scan adds P = 4 steps' rounding
        failures += not ok
        print(f"picard_step {dtype}: rel err {err:.1e} / {eerr:.1e} {'ok' if ok else 'FAIL'}")
    # the CUDA attention takes fp16/bf16, Triton's fp32 too; there is no CPU attention kernel
    attention_dtypes = {"cuda": (torch.float16, torch.bfloat16), "cpu": ()}.get(backend, DTYPES)
    for dtype in attention_dtypes:
        for (Lq, Lk, d) in ((70, 45, 33), (64, 64, 64), (17, 100, 256), (5, 1, 128)):  # tails, odd d, every D
            q = torch.randn(2, 3, Lq, d, device=dev)
            k, v = (torch.randn(2, 3, Lk, d, device=dev) for _ in range(2))
            ref = df.reference.attention(q.double(), k.double(), v.double())
            out = df.attention(q.to(dtype), k.to(dtype), v.to(dtype), backend=backend)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            ok = err < 1e-2
            failures += not ok
            print(f"attention {dtype} Lq={Lq} Lk={Lk} d={d}: rel err {err:.1e} {'ok' if ok else 'FAIL'}")
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"{backend} smoke: {'all ok' if not failures else f'{failures} FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
