"""Chunked sampling runs (ddpm_fast/runs.py) and `ddpm-fast sample` / `ddpm-fast verify` over them: atomic
chunks, resume after SIGKILL / SIGTERM with another batch size and process count, corrupted chunks,
refused resumes, streamed assembly in bounded memory, and the CLI's errors and progress bar."""

import io
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch

import ddpm_fast as df
from ddpm_fast import cli, runs
from ddpm_fast.models import DDPMUNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread in every process: the U-Net's CPU GEMMs round differently with another number of threads (as
# torchrun's workers have), and on a busy 2-core machine two OpenMP threads each run many times slower.
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
# The embedded digits model, few steps.  Byte-identical images at another batch size need the U-Net's kernels
# to be batch-invariant: on the CPU they are for batches of 4 and 8 (MKL's GEMM rounds the time embedding
# differently for fewer than 4 rows, and so would cuBLAS/cuDNN on a GPU between sizes), hence chunks of 8
# computed in batches of 4 or 8, on the CPU.
RUN = ["--steps", "4", "--num-images", "64", "--chunk-size", "8", "--seed", "7", "--device", "cpu"]


def sample_cmd(out, *args):
    return [sys.executable, "-m", "ddpm_fast", "sample", *RUN, "--out", str(out), *args]


def snapshot(d):
    """Every file under d: (mtime_ns, bytes); and every directory."""
    files, dirs = {}, []
    for root, ds, fs in os.walk(d):
        dirs += [os.path.relpath(os.path.join(root, x), d) for x in ds]
        for f in fs:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                files[os.path.relpath(p, d)] = (os.stat(p).st_mtime_ns, fh.read())
    return files, sorted(dirs)


def chunk_files(out):
    d = os.path.join(out, "chunks")
    return sorted(f for f in os.listdir(d) if f.endswith(".sha256")) if os.path.isdir(d) else []


def start_and_stop(out, sig, *args):
    """Start a run, wait for its first complete chunk, send sig; the completed process."""
    p = subprocess.Popen(sample_cmd(out, *args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not chunk_files(out) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    return p.returncode, stdout, stderr


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process runs too (see ENV)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process run: its samples.npz bytes."""
    out = tmp_path_factory.mktemp("reference")
    assert cli.main(["sample", *RUN, "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    with open(out / "samples.npz", "rb") as f:
        return f.read()


# ------------------------------------------------------------------------------------------ the file format
def test_write_npz_streams_parts_into_what_np_load_reads(gen):
    images = torch.randint(0, 256, (10, 5, 3, 2), generator=gen, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    runs.write_npz(buf, images.shape, [images[:4], images[4:9], images[9:]])
    with np.load(io.BytesIO(buf.getvalue())) as z:
        assert list(z.keys()) == ["arr_0"] and z["arr_0"].dtype == np.uint8
        assert np.array_equal(z["arr_0"], images)
    again = io.BytesIO()
    runs.write_npz(again, images.shape, [images])  # other parts, same images: same bytes
    assert again.getvalue() == buf.getvalue()
    with pytest.raises(ValueError, match="expected 10 images"):
        runs.write_npz(io.BytesIO(), images.shape, [images[:9]])
    with pytest.raises(ValueError, match="uint8"):
        runs.write_npz(io.BytesIO(), images.shape, [images.astype(np.int16)])


def small_run(out, n=10, k=4):
    spec = dict(num_images=n, chunk_size=k, sample_shape=[1, 2, 3], seed=0, steps=1, dtype="float32",
                schedule={}, sampling={}, model={"sha256": "x", "path": "nowhere"}, parallel=None,
                format=runs.FORMAT)
    return runs.Run(str(out), spec)


def test_chunks_are_named_by_global_indices_and_checked(tmp_path, gen):
    run = small_run(tmp_path)
    assert run.ranges == [(0, 4), (4, 8), (8, 10)]
    assert run.names == ["00000000-00000003", "00000004-00000007", "00000008-00000009"]
    assert run.prepare() == [0, 1, 2]
    images = [torch.randint(0, 256, (b - a, 2, 3, 1), generator=gen, dtype=torch.uint8).numpy() for a, b in run.ranges]
    for k, x in enumerate(images):
        run.write_chunk(k, x)
    assert run.prepare() == []
    assert not [f for f in os.listdir(tmp_path / "chunks") if f.endswith(".tmp")]
    with pytest.raises(ValueError, match="expected uint8"):
        run.write_chunk(0, images[1][:3])
    with pytest.raises(ValueError, match="expected uint8"):
        run.write_chunk(2, images[2].astype(np.float32))
    assert np.array_equal(run.load_chunk(1), images[1])
    other = small_run(tmp_path)
    other.spec["seed"] = 1
    with pytest.raises(runs.RunMismatch, match="^--seed: seed differs") as e:
        other.prepare()
    assert (e.value.field, e.value.option) == ("seed", "--seed")
    parallel = small_run(tmp_path)
    parallel.spec["parallel"] = dict(window=16, tol=0.1, max_iters=None)  # other images, within its tolerance
    with pytest.raises(runs.RunMismatch, match="^--parallel-window: parallel differs") as e:
        parallel.prepare()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_byte", "no_sidecar", "wrong_shape"])
def test_a_damaged_chunk_is_never_trusted(tmp_path, gen, damage):
    run = small_run(tmp_path)
    run.prepare()
    for k, (a, b) in enumerate(run.ranges):
        run.write_chunk(k, torch.randint(0, 256, (b - a, 2, 3, 1), generator=gen, dtype=torch.uint8).numpy())
    path = run.chunk_path(1)
    data = open(path, "rb").read()
    if damage == "truncate":
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "garbage":
        open(path, "wb").write(os.urandom(len(data)))
    elif damage == "flip_byte":
        open(path, "wb").write(data[:-40] + bytes([data[-40] ^ 1]) + data[-39:])
    elif damage == "no_sidecar":
        os.remove(run.chunk_path(1, ".sha256"))
    else:  # chunk 2 (2 images) with its own digest in chunk 1's place (4 images): the manifest check catches it
        os.replace(run.chunk_path(2), path)
        os.replace(run.chunk_path(2, ".sha256"), run.chunk_path(1, ".sha256"))
    assert run.chunk_problem(1) is not None
    assert run.prepare() == ([1, 2] if damage == "wrong_shape" else [1])
    assert not os.path.exists(path)  # removed, to be recomputed


def test_assembling_50k_images_streams_in_bounded_memory(tmp_path, gen):
    """50,000 16x16 images (12.8 MB) in chunks of 1000: the assembly holds about one chunk at a time."""
    run = runs.Run(str(tmp_path), dict(num_images=50_000, chunk_size=1000, sample_shape=[1, 16, 16]))
    os.makedirs(tmp_path / "chunks")
    chunk = torch.randint(0, 256, (1000, 16, 16, 1), generator=gen, dtype=torch.uint8).numpy()
    for k in range(len(run.ranges)):
        run.write_chunk(k, np.roll(chunk, k, axis=0))
    tracemalloc.start()
    try:
        run.assemble()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = 50_000 * 16 * 16
    print(f"assembling {total / 1e6:.1f} MB of images: tracemalloc peak {peak / 1e6:.2f} MB")
    assert peak < 4e6, peak  # measured 2.2 MB (the same at N = 5,000); the whole array would be 12.8 MB
    with np.load(tmp_path / "samples.npz") as z:
        out = z["arr_0"]
    assert out.shape == (50_000, 16, 16, 1)
    assert all(np.array_equal(out[k * 1000:(k + 1) * 1000], np.roll(chunk, k, axis=0)) for k in (0, 17, 49))
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert open(tmp_path / "samples.sha256").read().split() == [runs.sha256_file(tmp_path / "samples.npz"),
                                                                "samples.npz"]


# ------------------------------------------------------------------------------------ interrupt and resume
@pytest.mark.slow
def test_sigkill_then_resume_with_other_batch_size_and_processes(tmp_path, reference):
    out = tmp_path / "run"
    rc, _, _ = start_and_stop(out, signal.SIGKILL, "--batch-size", "4")
    assert rc == -signal.SIGKILL
    done = chunk_files(out)
    assert 1 <= len(done) < 8, done  # killed part-way, after at least one chunk
    assert not (out / "samples.npz").exists()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *sample_cmd(out, "--batch-size", "8")[1:]], env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"({8 * len(done)} from earlier runs)" in two.stdout
    assert (out / "samples.npz").read_bytes() == reference
    v = subprocess.run([sys.executable, "-m", "ddpm_fast", "verify", str(out)], env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert v.returncode == 0 and "FAILED" not in v.stdout, v.stdout + v.stderr
    assert "8 of 8 chunks" in v.stdout


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_abandons_the_chunk_in_flight_and_says_how_to_resume(tmp_path, reference, sig):
    out = tmp_path / "run"
    rc, _, stderr = start_and_stop(out, sig, "--batch-size", "4")
    assert rc == 128 + sig, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "run the same command again to resume" in lines[0] and sig.name in lines[0], stderr
    assert not [f for f in os.listdir(out / "chunks") if f.endswith(".tmp")]
    run = runs.Run(str(out), runs.Run.read_manifest(str(out)))
    done = [k for k in range(len(run.ranges)) if run.has_chunk(k)]
    assert done and all(run.chunk_problem(k) is None for k in done)
    assert cli.main(["sample", *RUN, "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    assert (out / "samples.npz").read_bytes() == reference


def test_a_channels_last_run_makes_the_same_images(tmp_path, reference):
    out = tmp_path / "run"
    assert cli.main(["sample", *RUN, "--batch-size", "8", "--channels-last", "--out", str(out), "--no-progress"]) == 0
    with np.load(out / "samples.npz") as z, np.load(io.BytesIO(reference)) as want:
        # the convolutions round in another order in channels_last: a pixel may round the other way
        assert np.abs(z["arr_0"].astype(int) - want["arr_0"].astype(int)).max() <= 1


def test_corrupted_chunks_are_found_by_verify_and_recomputed(tmp_path, reference, capsys):
    out = tmp_path / "run"
    args = ["sample", *RUN, "--num-images", "24", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    good = (out / "samples.npz").read_bytes()
    assert cli.main(["verify", str(out)]) == 0
    names = sorted((out / "chunks").glob("*.npz"))
    names[0].write_bytes(names[0].read_bytes()[:100])  # truncated
    names[2].write_bytes(os.urandom(names[2].stat().st_size))  # garbage
    capsys.readouterr()
    assert cli.main(["verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert names[0].name in report and names[2].name in report and names[1].name not in report
    assert cli.main(args) == 0
    assert "(8 from earlier runs)" in capsys.readouterr().out  # the two damaged chunks were computed again
    assert (out / "samples.npz").read_bytes() == good
    assert cli.main(["verify", str(out)]) == 0
    (out / "samples.npz").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert cli.main(["verify", str(out)]) == 1
    assert "samples.npz" in capsys.readouterr().out


def test_a_resume_that_would_change_the_images_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["sample", *RUN, "--num-images", "8", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    os.remove(next((out / "chunks").glob("*.sha256")))  # an unfinished run: a refused call must not touch it
    before = snapshot(out)
    other = tmp_path / "other.pt"
    net = DDPMUNet(in_channels=1, out_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                   dropout=0.0, image_size=16, num_groups=4)
    net.save(str(other), df.NoiseSchedule.linear(1000), sampling=dict(clip_sample=True))
    for extra, option in [(["--seed", "8"], "--seed"), (["--model", str(other)], "--model"),
                          (["--steps", "5"], "--steps"), (["--dtype", "bfloat16"], "--dtype"),
                          (["--chunk-size", "3"], "--chunk-size")]:
        capsys.readouterr()
        assert cli.main(args + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"ddpm-fast sample: error: {option}:"), err
        assert "--restart" in err
        assert snapshot(out) == before
    # options that leave the images as they are resume
    assert cli.main(args + ["--batch-size", "2", "--backend", "reference"]) == 0
    assert cli.main(args + ["--seed", "8", "--restart"]) == 0
    assert json.loads((out / "run.json").read_text())["seed"] == 8


def test_cli_default_layout_and_progress(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["sample", *RUN, "--num-images", "16", "--out", str(out)]
    assert cli.main(args + ["--progress"]) == 0
    err = capsys.readouterr().err
    assert "img/s" in err and "16/16" in err  # tqdm's bar, with images/s
    for name in ("run.json", "samples.npz", "samples.sha256", "grid.png", "chunks/00000000-00000007.npz"):
        assert (out / name).stat().st_size > 0
    (out / "chunks" / "00000008-00000015.npz").unlink()
    assert cli.main(args + ["--progress"]) == 0
    assert " 8/16 " in capsys.readouterr().err  # the bar starts at the chunks already done
    assert cli.main(args) == 0  # stderr is not a terminal: no bar by default
    assert capsys.readouterr().err == ""
    assert cli.main(args + ["--no-progress"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_cli_progress_shows_by_default_on_a_terminal(tmp_path):
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    p = subprocess.Popen(sample_cmd(tmp_path / "o", "--num-images", "8"), env=ENV, stdout=subprocess.DEVNULL,
                         stderr=slave)
    os.close(slave)
    seen = b""
    while True:  # read as it comes: a full pty would block the child
        if select.select([master], [], [], 0.1)[0]:
            try:
                block = os.read(master, 4096)
            except OSError:  # EIO: the child has closed the terminal
                block = b""
            seen += block
            if not block and p.poll() is not None:
                break
        elif p.poll() is not None:
            break
    os.close(master)
    assert p.wait(timeout=60) == 0, seen
    assert b"8/8" in seen and b"img/s" in seen, seen


def test_cli_errors_are_one_line_and_leave_no_directory(tmp_path, capsys):
    bad_net = tmp_path / "bad.pt"  # its output does not fit its input: fails at the first step
    DDPMUNet(in_channels=1, out_channels=3, ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
             image_size=8, num_groups=4).save(str(bad_net), df.NoiseSchedule.linear(10))
    for extra, option in [(["--chunk-size", "0"], "--chunk-size"), (["--steps", "2000"], "--steps"),
                          (["--steps", "0"], "--steps"),
                          (["--device", "tpu"], "--device"), (["--model", str(bad_net)], "model")]:
        capsys.readouterr()
        assert cli.main(["sample", "--num-images", "2", "--steps", "2", "--out", str(tmp_path / "new"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"ddpm-fast sample: error: {option}"), err
        assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"  # a directory the user made is kept, with what was in it
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert cli.main(["sample", "--num-images", "2", "--model", str(bad_net), "--out", str(mine)]) == 2
    assert sorted(os.listdir(mine)) == ["notes.txt"]
    (mine / "run.json").write_text("{")
    capsys.readouterr()
    assert cli.main(["sample", "--num-images", "2", "--steps", "2", "--out", str(mine)]) == 2
    assert "run.json cannot be read" in capsys.readouterr().err
    assert cli.main(["verify", str(tmp_path / "nothing")]) == 2
    assert "run.json" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("extra", [["--device", "cuda"], ["--device", "cuda:1"], ["--backend", "cuda"],
                                   ["--backend", "triton"]])
def test_cli_without_a_gpu_says_what_is_missing(tmp_path, extra):
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "ddpm_fast", "sample", "--num-images", "2", "--out",
                        str(tmp_path / "o"), *extra], env=env, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"ddpm-fast sample: error: {extra[0]} {extra[1]}") and "GPU" in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_sampler_progress_is_a_bar_or_any_counter(capsys):
    from ddpm_fast.io import load_for_sampling

    model, schedule, options = load_for_sampling(None)
    sampler = df.DDPMSampler(model, schedule, **options)
    a = sampler.sample(3, seed=1, batch_size=2, num_steps=3, progress=True)
    assert "9/9" in capsys.readouterr().err  # tqdm over image-steps

    class Counter:
        n = 0

        def update(self, k):
            self.n += k

    c = Counter()
    b = sampler.sample(3, seed=1, batch_size=2, num_steps=3, progress=c)
    assert c.n == 9 and torch.equal(a, b)
