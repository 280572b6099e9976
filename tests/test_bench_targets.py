"""ddpm_fast/bench/targets.py on hand-made records, and the backends suite it reads on this machine."""

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from ddpm_fast import ops
from ddpm_fast.bench import backends, harness, targets

FLOORS = {"copy_bytes": 1, "copy_gbps": 1000.0, "matmul_n": 1, "matmul_tflops": {"float32": 50.0, "bfloat16": 500.0}}


def row(op, size, impl, ms, baseline=False, numel=1 << 20, dtype="float32", status="ok", **kw):
    return harness.Row(op=op, size=size, impl=impl, numel=numel, dtype=dtype, bytes=numel * 12, flops=numel * 12,
                       baseline=baseline, median_ms=ms, status=status, **kw)


def record(*rows):
    """The rows as a bench run leaves them: derived figures and speed-ups filled in, as dicts."""
    rows = list(rows)
    harness.finish_rows(rows, dict(FLOORS))
    return [asdict(r) for r in rows]


def by_name(results):
    return {t["name"]: t for t in results}


def test_copy_fraction_takes_our_fastest_kernel_and_the_worst_large_size():
    big = 16 * 4 * 512 * 512
    rows = record(row("p_step", "16x4x512x512", "ddpm_fast[triton]", 0.30, numel=big),  # 12 B/element:
                  row("p_step", "16x4x512x512", "ddpm_fast[cuda]", 0.22, numel=big),    # 915 GB/s, 91.5%
                  row("p_step", "64x3x256x256", "ddpm_fast[cuda]", 0.01, numel=64 * 3 * 256 * 256),  # below 16M
                  row("q_sample", "16x4x512x512", "ddpm_fast[cuda]", 1.0, numel=big, status="failed: boom"))
    got = by_name(targets.evaluate(rows))
    p = got["p_step: copy bandwidth at >= 16M elements"]
    assert p["status"] == "met" and p["measured"] == pytest.approx(big * 12 / 0.22e-3 / 1e9 / 1000)
    assert p["where"] == "ddpm_fast[cuda] at 16x4x512x512"
    assert got["q_sample: copy bandwidth at >= 16M elements"]["status"] == "not measured"  # a failed row is no row
    assert sum(t["status"] == "not measured" for t in got.values()) == len(targets.TARGETS) - 1


def test_group_norm_targets_keep_the_cifar_shapes_and_report_the_worst():
    rows = []
    for size, ours, eager in [("64x128ch@32x32", 1.0, 2.5), ("256x256ch@8x8 channels_last", 1.0, 1.5),
                              ("64x512ch@64x64", 1.0, 1.1), ("1x256ch@4x4", 1.0, 0.9)]:
        rows += [row("group_norm", size, "ddpm_fast[cuda]", ours, dtype="bfloat16"),
                 row("group_norm", size, "eager GN+SiLU", eager, baseline=True, dtype="bfloat16")]
    got = by_name(targets.evaluate(record(*rows)))
    batch64 = got["GroupNorm+SiLU over eager, CIFAR shapes, batch >= 64"]
    assert batch64["status"] == "missed" and batch64["measured"] == pytest.approx(1.5)  # 512ch is not CIFAR's
    assert batch64["where"] == "ddpm_fast[cuda] at 256x256ch@8x8 channels_last"
    batch1 = got["GroupNorm+SiLU over eager, CIFAR shapes, batch 1"]
    assert batch1["status"] == "missed" and batch1["measured"] == pytest.approx(0.9)
    assert got["GroupNorm+SiLU over torch.compile, CIFAR shapes, batch >= 64"]["status"] == "not measured"


def test_attention_and_end_to_end_targets():
    rows = record(
        row("attention", "cifar b64", "ddpm_fast[triton]", 1.0, dtype="bfloat16"),
        row("attention", "cifar b64", "ddpm_fast[cuda]", 0.8, dtype="bfloat16"),
        row("attention", "cifar b64", "SDPA flash", 0.9, baseline=True, dtype="bfloat16"),
        row("attention", "cifar b64", "SDPA math", 4.0, baseline=True, dtype="bfloat16"),
        row("attention", "cifar b1", "ddpm_fast[cuda]", 0.8, dtype="float32"),  # not bf16: not the target's
        row("attention", "cifar b1", "SDPA flash", 0.1, baseline=True, dtype="float32"),
        row("e2e", "b256", "DDPMSampler bfloat16 graphs", 100.0, steps=10, images=256, dtype="bfloat16"),
        row("e2e", "b256", "DDPMSampler bfloat16 graphs channels_last", 120.0, steps=10, images=256, dtype="bfloat16"),
        row("e2e", "b256", "DDPMSampler float32", 50.0, steps=10, images=256),
        row("e2e", "b256", targets.EAGER_PIPELINE, 900.0, baseline=True, steps=10, images=256),
        row("e2e", "b1", "DDPMSampler bfloat16 graphs", 10.0, steps=10, images=1, dtype="bfloat16"),
        row("e2e", "b1", targets.EAGER_PIPELINE, 120.0, baseline=True, steps=10, images=1))
    got = by_name(targets.evaluate(rows))
    core = got["attention core over SDPA's fastest backend, bf16, d=256, L=256"]
    assert core["status"] == "met" and core["measured"] == pytest.approx(0.9 / 0.8) and "[cuda]" in core["where"]
    # the faster of the bf16 graphs rows (NCHW here), though the fp32 row is faster still
    e2e = got["sampling, b256 bf16 graphs, over diffusers DDPMPipeline fp32"]
    assert e2e["measured"] == pytest.approx(9.0) and e2e["where"] == "DDPMSampler bfloat16 graphs at b256"
    rows = record(row("e2e", "b256", "DDPMSampler bfloat16 graphs", 100.0, steps=10, images=256, dtype="bfloat16"),
                  row("e2e", "b256", "DDPMSampler bfloat16 graphs channels_last", 80.0, steps=10, images=256,
                      dtype="bfloat16"),
                  row("e2e", "b256", targets.EAGER_PIPELINE, 900.0, baseline=True, steps=10, images=256))
    e2e = by_name(targets.evaluate(rows))["sampling, b256 bf16 graphs, over diffusers DDPMPipeline fp32"]
    assert e2e["measured"] == pytest.approx(900 / 80) and e2e["where"].endswith("channels_last at b256")
    assert got["sampling, b256 bf16 graphs, over torch.compile(max-autotune) diffusers"]["status"] == "not measured"
    mfu = got["sampling, b256 bf16 graphs: MFU against the bf16 matmul floor"]
    assert mfu["measured"] == pytest.approx((1 << 20) * 12 / 100e-3 / 1e12 / 500)  # FLOP/s over the bf16 floor
    assert got["sampling latency, b1, over diffusers DDPMPipeline fp32"]["measured"] == pytest.approx(12.0)


def test_backend_choice_per_op_and_dtype():
    timings = [("fp16", "cuda", "256x3x32x32", 1.0), ("fp16", "triton", "256x3x32x32", 2.0),
               ("fp16", "cuda", "64x3x256x256", 4.0), ("fp16", "triton", "64x3x256x256", 2.0),
               ("fp32", "cuda", "256x3x32x32", 3.0), ("fp32", "triton", "256x3x32x32", 1.0),
               ("bf16", "cpu", "256x3x32x32", 1.0)]
    rows = record(*[row("backends", f"p_step {d} {shape}", f"ddpm_fast[{b}]", ms) for d, b, shape, ms in timings],
                  row("backends", "attention bf16 64x1x256x256", "ddpm_fast[triton]", 2.0),
                  row("backends", "attention bf16 64x1x256x256", "ddpm_fast[cuda]", 1.0))
    got = {(c["op"], c["dtype"]): c for c in targets.backend_choice(rows)}
    tie = got[("p_step", "fp16")]  # geometric means: cuda sqrt(1 * 4) = 2 = triton sqrt(2 * 2)
    assert tie["shapes"] == 2 and tie["ms"] == pytest.approx({"cuda": 2.0, "triton": 2.0})
    fp32 = got[("p_step", "fp32")]
    assert fp32["fastest"] == "triton" and fp32["margin"] == pytest.approx(3.0)
    assert fp32["auto"] == "cuda" == [b for b in ops.KERNELS["p_step"] if b != "cpu"][0]
    assert got[("p_step", "bf16")]["margin"] is None
    attn = got[("attention", "bf16")]
    assert attn["fastest"] == "cuda" == attn["auto"] == ops.KERNELS["attention"][0]
    lines = "\n".join(targets.markdown(rows, on_gpu=False))
    assert "Targets" not in lines and "| p_step | bf16 |" not in lines  # one kernel ran: nothing to choose
    assert "| attention | bf16 | cuda 1.0000, triton 2.0000 | cuda | 2.00x | cuda |" in lines
    assert "| p_step | fp32 | cuda 3.0000, triton 1.0000 | triton | 3.00x | cuda (the record says triton) |" in lines


def test_bench_markdown_carries_the_targets_of_a_gpu_record():
    rows = [row("p_step", "256x3x32x32", "ddpm_fast[cuda]", 0.01)]
    harness.finish_rows(rows, dict(FLOORS))
    meta = dict(device_name="H100", device="cuda", torch="t", triton="t", cuda="13", git_commit="c", date="d",
                command="c")
    text = harness.markdown(rows, dict(FLOORS), meta)
    assert "| p_step over diffusers' step, 256x3x32x32 |  | 10.00x | not measured |  |" in text
    assert "Targets" not in harness.markdown(rows, dict(FLOORS), dict(meta, device="cpu"))


def test_cli_reads_several_records_and_refuses_a_bad_one(tmp_path):
    meta = dict(device_name="H100", device="cuda", git_commit="abc", date="d")
    a = record(row("p_step", "256x3x32x32", "ddpm_fast[cuda]", 0.01),
               row("p_step", "256x3x32x32", "diffusers step", 0.2, baseline=True))
    b = record(row("e2e", "b1", "DDPMSampler bfloat16 graphs", 1.0, steps=1, images=1),
               row("e2e", "b1", targets.EAGER_PIPELINE, 5.0, baseline=True, steps=1, images=1))
    for name, rows in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(dict(meta=meta, floors=FLOORS, rows=rows)))
    run = [sys.executable, "-m", "ddpm_fast.bench.targets"]
    r = subprocess.run(run + [str(tmp_path / "a.json"), str(tmp_path / "b.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| p_step over diffusers' step, 256x3x32x32 | 20.00x | 10.00x | met |" in r.stdout
    assert "| sampling latency, b1, over diffusers DDPMPipeline fp32 | 5.00x | 10.00x | missed |" in r.stdout
    (tmp_path / "bad.json").write_text("{")
    r = subprocess.run(run + [str(tmp_path / "bad.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot read a bench record from" in r.stderr and "Traceback" not in r.stderr


def test_backends_suite_runs_every_op_and_dtype_here():
    """Each case of the quick suite is called once on the CPU (its kernels, or SDPA for attention)."""
    cases = list(backends.cases("backends", torch.device("cpu"), quick=True))
    sizes = {c.size for c in cases}
    assert sizes == {f"{op} {backends.SHORT[d]} {'x'.join(map(str, shapes[0]))}"
                     for op, shapes in backends.SHAPES.items() for d in backends.DTYPES}
    assert all(c.op == "backends" and not c.baseline for c in cases)
    for c in cases:
        out = c.fn()
        assert out.dtype == c.dtype and torch.isfinite(out).all(), c.size
