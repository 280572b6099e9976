"""One small call of every CUDA kernel (and of each of its paths), checked against the CPU: run under
`compute-sanitizer --tool memcheck` by gpu_validate.sh.  Odd sizes on purpose (partial
groups of 4, partial blocks)."""

import sys

import torch

import ddpm_fast as df


def main() -> int:
    if df.available_backends()["cuda"] is not True:
        print(f"cuda backend unavailable: {df.available_backends()['cuda']}")
        return 1
    failures = 0
    t = torch.tensor([0, 999, 17], device="cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        z = df.philox_randn((3, 3, 5, 7), 2**63 + 5, t=t, stream=1, sample_offset=9, dtype=dtype, backend="cuda")
        ref = df.philox_randn((3, 3, 5, 7), 2**63 + 5, t=t.cpu(), stream=1, sample_offset=9, backend="reference")
        err = (z.float().cpu() - ref).abs().max().item()
        ok = err <= 1e-6 + torch.finfo(dtype).eps * 4
        failures += not ok
        print(f"philox_randn {dtype}: max abs diff {err:.2e} {'ok' if ok else 'FAIL'}")
    c = torch.randint(0, 2**32, (37, 4))
    k = torch.randint(0, 2**32, (37, 2))
    same = torch.equal(torch.ops.ddpm_fast.philox4x32(c.cuda(), k.cuda()).cpu(), torch.ops.ddpm_fast.philox4x32(c, k))
    failures += not same
    print(f"philox4x32: {'ok' if same else 'FAIL'}")
    s = df.NoiseSchedule.linear(1000)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in ((3, 3, 5, 7), (2, 4, 8, 8)):  # odd (scalar path) and 16-byte multiples (vector path)
            for fmt in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt)
                out = torch.randn(shape[0], 2 * shape[1], *shape[2:], device="cuda").to(dtype)
                out = out.contiguous(memory_format=fmt)
                tt = torch.arange(shape[0], device="cuda") * 300
                y = df.p_step(x, out, tt, s, seed=3, variance="learned_range", backend="cuda")
                z = df.philox_randn(shape, 3, t=tt, backend="cuda")
                ref = df.reference.p_step(x.double(), out.double(), tt, s, noise=z.double(), variance="learned_range")
                err = ((y.double() - ref).norm() / ref.norm()).item()
                q, eps = df.q_sample(x, tt, s, seed=4, return_noise=True, backend="cuda")
                qref = df.reference.q_sample(x.double(), tt, s, noise=eps.double())
                qerr = ((q.double() - qref).norm() / qref.norm()).item()
                ok = max(err, qerr) < (1e-5 if dtype == torch.float32 else 1e-2)
                failures += not ok
                print(f"p_step/q_sample {dtype} {tuple(shape)} {fmt}: rel err {err:.1e} / {qerr:.1e} "
                      f"{'ok' if ok else 'FAIL'}")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        # on-chip, split-reduction and (channels_last, 3 channels a group: narrower than a sector) rows paths,
        # and 4096 channels a group: the backward's largest [3][CG] shared table (48 KiB, no opt-in)
        for shape, groups in (((17, 64, 5, 7), 32), ((1, 64, 33, 31), 8), ((2, 96, 9, 11), 32), ((1, 4096, 2, 3), 1)):
            for fmt in (torch.contiguous_format, torch.channels_last):
                B, C = shape[:2]
                x = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt)
                w, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
                add, sc, sh = (torch.randn(B, C, device="cuda") for _ in range(3))
                leaves = [t.requires_grad_() for t in (x, w, b, add, sc, sh)]
                y = df.group_norm(x, groups, w, b, add=add, scale=sc, shift=sh, silu=True, backend="cuda")
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
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        # windows [A, P + 1, C, H, W]: odd sizes, one window running past t = 0 (negative t: no step)
        x = torch.randn(3, 5, 3, 5, 7, device="cuda").to(dtype)
        out = torch.randn(3, 4, 6, 5, 7, device="cuda").to(dtype)
        tw = torch.tensor([[900], [2], [40]], device="cuda") - torch.arange(4, device="cuda")
        sample = torch.tensor([7, 0, 12], device="cuda")
        y, perr = df.picard_step(x, out, tw, s, sample, 5, variance="learned_range", backend="cuda")
        ry, rerr = df.reference.picard_step(x.double().cpu(), out.double().cpu(), tw.cpu(), s, sample.cpu(), 5,
                                            variance="learned_range")
        err = ((y.double().cpu() - ry).norm() / ry.norm()).item()
        eerr = ((perr.double().cpu() - rerr).norm() / rerr.norm()).item()
        ok = max(err, eerr) < (4e-5 if dtype == torch.float32 else 1e-2)  # the scan adds P = 4 steps' rounding
        failures += not ok
        print(f"picard_step {dtype}: rel err {err:.1e} / {eerr:.1e} {'ok' if ok else 'FAIL'}")
    for dtype in (torch.float16, torch.bfloat16):
        for (Lq, Lk, d) in ((70, 45, 33), (64, 64, 64), (17, 100, 256), (5, 1, 128)):  # tails, odd d, every D
            q = torch.randn(2, 3, Lq, d, device="cuda")
            k, v = (torch.randn(2, 3, Lk, d, device="cuda") for _ in range(2))
            ref = df.reference.attention(q.double(), k.double(), v.double())
            out = df.attention(q.to(dtype), k.to(dtype), v.to(dtype), backend="cuda")
            err = ((out.double() - ref).norm() / ref.norm()).item()
            ok = err < 1e-2
            failures += not ok
            print(f"attention {dtype} Lq={Lq} Lk={Lk} d={d}: rel err {err:.1e} {'ok' if ok else 'FAIL'}")
    torch.cuda.synchronize()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
