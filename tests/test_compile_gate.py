"""The Triton compile gate (ddpm_fast/triton/compile_gate.py): every kernel compiles for sm_80 and
sm_90, with the launchers' own specialisations, without spilling past the budget.  No GPU needed:
Triton's compiler and ptxas run on the CPU."""

import json
import os
import subprocess
import sys

import pytest

from ddpm_fast.triton import compile_gate as gate

pytestmark = pytest.mark.triton


def test_plans_cover_every_constexpr_combination():
    plans = gate.all_plans()
    p_step = {(p.args["dtype"], p.args["layout"], p.args["noise"], p.args["prediction"], p.args["variance"],
               p.args["form"], p.args["clip"]) for p in plans if p.op == "p_step"}
    assert len(p_step) == 3 * 2 * 3 * 3 * 3 * 2 * 2
    q_sample = {(p.args["dtype"], p.args["layout"], p.args["noise"], p.args["return_noise"])
                for p in plans if p.op == "q_sample"}
    assert len(q_sample) == 3 * 2 * 3 * 2
    gn = [p.args for p in plans if p.op == "group_norm"]
    for op in ("group_norm", "group_norm_backward"):
        for flag in ("weight", "bias", "add", "scale", "shift", "silu"):
            for dtype in gate.DTYPES:
                assert {(p.args["layout"], p.args["split"]) for p in plans
                        if p.op == op and p.args.get(flag) and p.args["dtype"] == dtype} == \
                    {(lay, s) for lay in ("nchw", "channels_last") for s in (1, 4)}
    # Ints that specialise to 1: HW, C, N, B, G = C, Lq, Lk, H, d; and T, seed, offset, stream.
    assert any(a["shape"][2:] == (1, 1) for a in gn) and any(a["groups"] == a["shape"][1] for a in gn)
    assert any(p.op == "p_step" and p.args["shape"] == (1, 1, 1, 1) and p.args.get("T") == 1
               and p.args.get("seed") == 1 and p.args.get("sample_offset") == 1 for p in plans)
    attn = [p.args for p in plans if p.op == "attention"]
    assert {a["d"] for a in attn} >= {1, 16, 32, 64, 128, 256}
    assert any(a["Lq"] == a["Lk"] == a["H"] == a["B"] == 1 for a in attn)


def test_problems_flags_failures_spills_and_shared_memory():
    ok = dict(op="p_step", kernel="k", label="x", ok=True, registers=40, spill_bytes=0, shared_bytes=0, plan=0)
    assert gate.problems([dict(ok, arch="sm_90")]) == []
    assert gate.problems([dict(ok, arch="sm_90", spill_bytes=gate.SPILL_BUDGET)]) == []
    assert "spilled" in gate.problems([dict(ok, arch="sm_90", spill_bytes=gate.SPILL_BUDGET + 4)])[0]
    assert "shared memory" in gate.problems([dict(ok, arch="sm_80", shared_bytes=200 * 1024)])[0]
    assert gate.problems([dict(ok, arch="sm_90", shared_bytes=200 * 1024)]) == []
    failed = dict(op="p_step", kernel="?", label="x", ok=False, error="CompilationError: NameError(...)", arch="sm_90",
                  plan=0)
    assert "NameError" in gate.problems([failed])[0]
    rows = {r["kernel"]: r for r in gate.summary([dict(ok, arch="sm_90", registers=72, spill_bytes=4), failed])}
    assert rows["k"]["failed"] == 0 and rows["k"]["max_registers"] == 72 and rows["k"]["max_spill_bytes"] == 4
    assert rows["?"]["failed"] == 1


def test_ptxas_usage_parses_the_log():
    log = ("ptxas info    : Function properties for k\n    40 bytes stack frame, 4 bytes spill stores, "
           "4 bytes spill loads\nptxas info    : Used 64 registers, used 1 barriers\n")
    assert gate.ptxas_usage(log) == {"registers": 64, "spill_bytes": 8}
    with pytest.raises(RuntimeError, match="no register count"):
        gate.ptxas_usage("")


@pytest.mark.slow
@pytest.mark.compile_only
def test_every_triton_kernel_compiles_for_sm80_and_sm90(tmp_path):
    """The gate itself, in a process without TRITON_INTERPRET (the kernels must be JIT functions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "gate.json"
    r = subprocess.run([sys.executable, "-m", "ddpm_fast.triton.compile_gate", "--arch", "80,90", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["problems"] == []
    kernels = {(s["kernel"], s["arch"]) for s in d["summary"]}
    for name in ("_philox_randn_kernel", "_philox4x32_kernel", "_q_sample_kernel", "_p_step_kernel", "_picard_kernel",
                 "_gn_onchip", "_gn_stats", "_gn_norm", "_gnb_onchip", "_gnb_sums", "_gnb_dx", "_attention_fwd"):
        assert {(name, "sm_80"), (name, "sm_90")} <= kernels, name
    assert len({r["plan"] for r in d["records"]}) == len(gate.all_plans())
    print("\n" + gate.markdown(d["summary"]))


def test_gate_refuses_to_run_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"):
        gate.run_gate()
