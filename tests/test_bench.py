"""The benchmark harness writes what docs/architecture.md (Benchmarks) asks for; no timing is asserted."""

import json
import math
import subprocess
import sys

import pytest
import torch

import ddpm_fast.bench as bench
from ddpm_fast import cli
from ddpm_fast.bench import harness, readme, run
from ddpm_fast.bench.diffusion import Case

CPU = torch.device("cpu")
META = dict(device_name="x", device="cpu", torch="t", triton="t", cuda=None, git_commit="c", date="d", command="c")
FLOORS = {"copy_bytes": 1, "copy_gbps": 10.0, "matmul_n": 1, "matmul_tflops": {"float32": 1.0, "bfloat16": 2.0}}


def test_time_fn_and_floors():
    t = harness.time_fn(lambda: torch.ones(10).sum(), CPU, min_time_s=0.01)
    assert 0 < t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
    f = harness.measure_floors(CPU, quick=True)
    assert f["copy_gbps"] > 0 and set(f["matmul_tflops"]) == {"float32", "bfloat16"}
    assert all(t > 0 for t in f["matmul_tflops"].values())


def test_quick_gpu_runs_reach_the_bandwidth_targets_size():
    from ddpm_fast.bench import diffusion, targets

    largest = lambda device: max(math.prod(shape) for _, shape in diffusion.sizes(torch.device(device), True))  # noqa: E731
    assert largest("cuda") >= targets.LARGE > largest("cpu")
    assert diffusion.sizes(CPU, False) == diffusion.SIZES


@pytest.mark.slow
def test_bench_writes_json_markdown_png(tmp_path):
    out = run(["p_step"], quick=True, out_dir=str(tmp_path), device="cpu", command="test", echo=lambda *_: None)
    d = json.loads((tmp_path / "bench-cpu-quick.json").read_text())
    assert {"device_name", "torch", "triton", "cuda", "git_commit", "command", "date"} <= set(d["meta"])
    assert {"copy_gbps", "matmul_tflops"} <= set(d["floors"])
    impls = {r["impl"] for r in d["rows"]}
    assert {"reference eager", "torch.compile(reference)"} <= impls and any(i.startswith("ddpm_fast") for i in impls)
    for r in d["rows"]:
        assert {"median_ms", "bytes", "flops", "gbps", "frac_copy_floor", "tflops", "frac_matmul_floor", "vs"} <= set(r)
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["bytes"] > 0
    ours = [r for r in d["rows"] if not r["baseline"]][0]
    assert set(ours["vs"]) >= {"reference eager", "torch.compile(reference)"}
    assert (tmp_path / "bench-cpu-quick.md").read_text().count("|") > 10
    assert (tmp_path / "bench-cpu-quick.png").stat().st_size > 10_000
    assert "| p_step |" in readme.section(str(tmp_path / "bench-cpu-quick.json"))
    assert out["paths"]["json"].endswith(".json")


def test_mfu_divides_by_the_floor_of_the_rows_dtype():
    rows = [harness.Row(op="e2e", size="b1", impl=impl, numel=1, dtype=dtype, bytes=0, flops=10**12, steps=1,
                        images=1, median_ms=1000.0) for impl, dtype in [("a", "float32"), ("b", "bfloat16"),
                                                                         ("c", "float16")]]
    harness.finish_rows(rows, dict(FLOORS))
    assert [r.frac_matmul_floor for r in rows] == [1.0, 0.5, None]  # no float16 floor measured: no MFU
    fast = harness.Row(op="e2e", size="b1", impl="d", numel=1, dtype="float32", bytes=0, flops=10**12, steps=1,
                       images=1, median_ms=500.0)  # 2 TFLOP/s, twice the float32 matmul
    floors = dict(FLOORS)
    harness.finish_rows(rows + [fast], floors)
    assert floors["compute_tflops"] == {"float32": 2.0, "bfloat16": 2.0}
    assert [r.frac_matmul_floor for r in rows + [fast]] == [0.5, 0.5, None, 1.0]  # <= 100% by construction
    assert "rows beat the matmul, so the compute floors are float32 2.00" in harness.floors_text(floors)
    assert "| b1 | b | bfloat16 | 1000.00 | 0.0010 | 50.0% |" in harness.markdown(rows, FLOORS, META)


def test_cli_info_and_bad_bench_option():
    r = subprocess.run([sys.executable, "-m", "ddpm_fast", "info", "--json"], capture_output=True, text=True)
    assert r.returncode == 0
    info = json.loads(r.stdout)
    assert info["backends"]["reference"] is True and "torch" in info
    r = subprocess.run([sys.executable, "-m", "ddpm_fast", "bench", "--only", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "--only" in r.stderr


# ------------------------------------------------- failures, interrupts, optional packages
def case(op, impl, fn, baseline=False, size="8"):
    return Case(op=op, size=size, impl=impl, fn=fn, numel=8, dtype=torch.float32, bytes=64, flops=8,
                baseline=baseline)


def raises(e):
    def fn():
        raise e
    return fn


def unbuildable():
    raise OSError("no compiler")


def fake_suite(op, device, quick):
    x = torch.ones(8)
    yield case(op, "base", lambda: x * 2, baseline=True)
    yield case(op, "broken baseline", raises(ValueError("bad shape\nsecond line")), baseline=True)
    yield case(op, "unbuilt", harness.try_build(unbuildable))
    yield case(op, "ours", lambda: x + 1)


def dying_suite(op, device, quick):
    yield case(op, "before", lambda: None)
    raise RuntimeError("cannot build the model")


def ok_suite(op, device, quick):
    yield case(op, "fine", lambda: None)


@pytest.fixture
def fake_suites(monkeypatch):
    monkeypatch.setattr(bench, "SUITES", {"fake": fake_suite, "dying": dying_suite, "ok": ok_suite})
    monkeypatch.setattr(bench, "measure_floors", lambda device, quick: dict(FLOORS))


def test_failed_cases_are_kept_and_the_run_goes_on(tmp_path, fake_suites):
    out = run(quick=True, out_dir=str(tmp_path), device="cpu", command="test", echo=lambda *_: None)
    d = json.loads((tmp_path / "bench-cpu-quick.json").read_text())
    status = {(r["op"], r["impl"]): r["status"] for r in d["rows"]}
    assert status == {
        ("fake", "base"): "ok",
        ("fake", "broken baseline"): "failed: ValueError: bad shape",
        ("fake", "unbuilt"): "failed: OSError: no compiler",
        ("fake", "ours"): "ok",
        ("dying", "before"): "ok",
        ("dying", "(building cases)"): "failed: RuntimeError: cannot build the model",
        ("ok", "fine"): "ok",
    }
    for r in d["rows"]:
        if r["status"] != "ok":
            assert r["median_ms"] is None and r["gbps"] is None and r["vs"] == {}
    ours = next(r for r in d["rows"] if r["impl"] == "ours")
    assert list(ours["vs"]) == ["base"]  # the failed baseline is no ratio
    md = (tmp_path / "bench-cpu-quick.md").read_text()
    assert "| fake | 8 | broken baseline (baseline) | failed: ValueError: bad shape |" in md
    assert "| dying | - | (building cases) | failed: RuntimeError: cannot build the model |" in md
    section = readme.section(str(tmp_path / "bench-cpu-quick.json"))
    assert "| fake | 8 | unbuilt | failed: OSError: no compiler |" in section and "| ok | 8 | fine |" in section
    assert out["paths"]["md"].endswith(".md")


def test_cli_bench_exits_1_when_a_case_failed(tmp_path, fake_suites):
    args = ["bench", "--quick", "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(args + ["--only", "ok"]) == 0
    assert cli.main(args + ["--only", "ok,fake"]) == 1
    assert len(json.loads((tmp_path / "bench-cpu-quick.json").read_text())["rows"]) == 5


def test_an_interrupted_run_keeps_the_finished_cases(tmp_path, monkeypatch):
    path = tmp_path / "bench-cpu-quick.json"
    seen = []

    def interrupt():
        seen.append([r["impl"] for r in json.loads(path.read_text())["rows"]])  # what a kill now would leave
        raise KeyboardInterrupt

    def suite(op, device, quick):
        yield case(op, "first", lambda: None)
        yield case(op, "second", raises(ValueError("x")))
        yield case(op, "third", interrupt)
        yield case(op, "never", lambda: None)

    monkeypatch.setattr(bench, "SUITES", {"s": suite})
    monkeypatch.setattr(bench, "measure_floors", lambda device, quick: dict(FLOORS))
    with pytest.raises(KeyboardInterrupt):
        run(quick=True, out_dir=str(tmp_path), device="cpu", command="test", echo=lambda *_: None)
    assert seen == [["first", "second"]]
    assert [r["impl"] for r in json.loads(path.read_text())["rows"]] == ["first", "second"]
    assert "| s | 8 | second | failed: ValueError: x |" in (tmp_path / "bench-cpu-quick.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-cpu-quick.json", "bench-cpu-quick.md",
                                                           "bench-cpu-quick.png"]


def test_missing_optional_packages_skip_their_rows_and_are_reported_once(tmp_path, monkeypatch):
    def suite(op, device, quick):
        for impl in ("needs diffusers", "needs it too"):
            if harness.optional("diffusers") is not None:
                yield case(op, impl, lambda: None)
        yield case(op, "plain", lambda: None)

    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(bench, "SUITES", {"s": suite})
    monkeypatch.setattr(bench, "measure_floors", lambda device, quick: dict(FLOORS))
    said = []
    out = run(quick=True, out_dir=str(tmp_path), device="cpu", command="test", echo=said.append)
    assert [r.impl for r in out["rows"]] == ["plain"]
    assert sorted(out["paths"]) == ["json", "md"] and not (tmp_path / "bench-cpu-quick.png").exists()
    notes = [s for s in said if "diffusers" in s]
    assert len(notes) == 1
    assert [s for s in said if "matplotlib" in s] == ["no PNG plot: it needs matplotlib (pip install matplotlib)"]


# e2e's parallel-in-time rows on the CPU, for batch 1 and 8
PARALLEL_ROWS = 2 * ["DDPMSampler fp32 sequential",
                     *(f"DDPMSampler fp32 parallel window {w} tol 0.1" for w in (16, 32, 64))]


def test_suites_build_their_cases_without_diffusers(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    for op, suite in bench.SUITES.items():
        cases = list(suite(op, CPU, True))  # built, not timed
        impls = [c.impl for c in cases]
        assert impls and not any("diffusers" in i or "Scheduler" in i for i in impls), (op, impls)
        assert all(c.op != "attention block" for c in cases)  # diffusers' Attention module
        if op == "e2e":
            assert impls == ["DDPMSampler float32", "DDPMSampler bfloat16", *PARALLEL_ROWS]
        if op == "train":
            assert impls == ["ours fp32 (accelerate + eps_mse)", "ours bf16 autocast (accelerate + eps_mse)"]


@pytest.mark.slow
def test_e2e_builds_the_diffusers_rows_where_diffusers_imports():
    pytest.importorskip("diffusers")
    impls = [c.impl for c in bench.e2e.cases("e2e", CPU, True)]
    assert impls == ["DDPMSampler float32", "DDPMSampler bfloat16", "diffusers DDPMPipeline fp32",
                     "diffusers DDPMPipeline bf16 autocast", "FastDDPMScheduler", "accelerate + FastDDPMScheduler",
                     *PARALLEL_ROWS]


@pytest.mark.slow
def test_train_builds_every_variant_in_one_run():
    pytest.importorskip("diffusers")
    cases = list(bench.train.cases("train", CPU, True))
    assert [c.impl for c in cases] == ["eager fp32", "eager bf16 autocast", "torch.compile fp32",
                                       "ours fp32 (accelerate + eps_mse)", "ours bf16 autocast (accelerate + eps_mse)"]
    assert all(c.size == "b2 (CPU; paper: b128)" and c.images == 2 and c.steps == 1 for c in cases)
    assert [c.baseline for c in cases] == [True, True, True, False, False]


def test_training_rows_get_a_table_of_their_own(tmp_path, monkeypatch):
    def suite(op, device, quick):
        for impl, baseline in (("eager", True), ("ours", False)):
            yield Case(op=op, size="b2", impl=impl, fn=lambda: None, numel=6, dtype=torch.float32, bytes=0,
                       flops=10**9, baseline=baseline, steps=1, images=2)

    monkeypatch.setattr(bench, "SUITES", {"train": suite})
    monkeypatch.setattr(bench, "measure_floors", lambda device, quick: dict(FLOORS))
    run(quick=True, out_dir=str(tmp_path), device="cpu", command="test", echo=lambda *_: None)
    md = (tmp_path / "bench-cpu-quick.md").read_text()
    assert "Training (one step per call" in md and "End to end" not in md and "| b2 | ours |" in md
    rows = json.loads((tmp_path / "bench-cpu-quick.json").read_text())["rows"]
    assert all(r["images_per_s_1000_steps"] == 0.0 and r["ms_per_step"] == r["median_ms"] for r in rows)
    assert "ms/step" in readme.section(str(tmp_path / "bench-cpu-quick.json"))


def test_try_build():
    assert harness.try_build(lambda: len)("abc") == 3
    stand_in = harness.try_build(unbuildable)
    with pytest.raises(OSError, match="no compiler"):
        stand_in(1, key=2)


@pytest.mark.slow
def test_parallel_rows_report_rounds_evaluations_and_error(tmp_path, monkeypatch):
    """e2e's parallel-in-time rows, on a small U-Net: sequential baseline and windows 16/32/64 at batch 1
    and 8, each with its rounds, model evaluations and error against the sequential images."""
    from ddpm_fast.bench import e2e
    from ddpm_fast.models import DDPMUNet

    torch.manual_seed(0)
    net = DDPMUNet(in_channels=3, out_channels=3, ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                   dropout=0.0, image_size=8, num_groups=4)
    monkeypatch.setattr(bench, "SUITES", {"e2e": lambda op, dev, quick: e2e.parallel_cases(op, dev, net, 20)})
    monkeypatch.setattr(bench, "measure_floors", lambda device, quick: dict(FLOORS))
    out = run(["e2e"], quick=True, out_dir=str(tmp_path), device="cpu", command="test", echo=lambda *_: None)
    rows = out["rows"]
    assert [(r.size, r.baseline) for r in rows] == [(f"b{b} parallel", i == 0) for b in (1, 8) for i in range(4)]
    for r in rows:
        assert r.status == "ok", r.status
        assert 1 <= r.rounds_per_image <= 20 and r.evals_per_image >= r.rounds_per_image
        assert 0 <= r.max_err_vs_sequential < 0.5
    par = [r for r in rows if not r.baseline]
    assert all(r.rounds_per_image < 20 for r in par)  # windows of 16 and more take fewer rounds than steps
    assert all(set(r.vs) == {next(b.impl for b in rows if b.baseline)} for r in par)
    md = (tmp_path / "bench-cpu-quick.md").read_text()
    assert "Parallel-in-time sampling (20 steps per call" in md and "| b8 parallel | DDPMSampler fp32 parallel " \
        "window 64 tol 0.1 |" in md
