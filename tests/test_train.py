"""`ddpm-fast train`: users' images, checkpoints, --resume after a SIGKILL, export to diffusers."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import ddpm_fast as df
from conftest import rel_err
from ddpm_fast import cli
from ddpm_fast.models import DDPMUNet
from ddpm_fast.train import load_state

Image = pytest.importorskip("PIL.Image")  # Pillow reads users' images; the triton-only CI env has none

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread: a tiny model's step is all per-op overhead, which threads on 2 busy cores only add to.
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
# A tiny U-Net with dropout, so an exact resume needs torch's RNG state back too.
TINY = dict(in_channels=3, out_channels=3, ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
            dropout=0.1, image_size=8, num_groups=4)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """200 PNGs of mixed sizes and modes in nested subfolders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng()
    for i in range(200):
        d = root / f"set{i % 3}" / (f"sub{i % 5}" if i % 2 else "") / ("deeper" if i % 7 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(10, 48, 2)
        shape = (h, w) if i % 4 == 0 else (h, w, 3)  # some greyscale
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(d / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def train_cmd(pngs, tiny_json, out, *extra):
    return [sys.executable, "-m", "ddpm_fast", "train", "--data", str(pngs), "--model", tiny_json, "--out", str(out),
            "--batch-size", "4", "--workers", "0", "--log-every", "5", "--warmup", "10", *extra]


@pytest.mark.slow
def test_train_on_a_folder_then_sample_and_export(pngs, tiny_json, tmp_path):
    out = tmp_path / "run.pt"
    r = subprocess.run(train_cmd(pngs, tiny_json, out, "--steps", "4", "--workers", "1"), capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "200 images" in r.stdout and "step 4/4  loss" in r.stdout
    model, schedule, options = DDPMUNet.load(str(out))
    assert model.config == dict(DDPMUNet(**TINY).config) and schedule.num_timesteps == 1000
    state = load_state(str(tmp_path / "run.state.pt"))
    assert state["step"] == 4 and state["data_order"] == dict(seed=0, n=200, batch_size=4, epoch=0, position=16)
    assert state["recipe"]["flip"] and state["meta"]["data"].startswith("200 images")
    assert torch.equal(state["ema"]["conv_in.weight"], model.conv_in.weight)
    assert any(not torch.equal(state["model"][k], state["ema"][k]) for k in state["model"])  # EMA is not the model
    # the sampler reads it
    assert cli.main(["sample", "--model", str(out), "--num-images", "2", "--steps", "3", "--out",
                     str(tmp_path / "samples")]) == 0
    assert np.load(tmp_path / "samples" / "samples.npz")["arr_0"].shape == (2, 8, 8, 3)
    # and diffusers reads the export; DDPMUNet.from_diffusers round-trips it
    diffusers = pytest.importorskip("diffusers")
    assert cli.main(["export", str(out), str(tmp_path / "hf")]) == 0
    pipe = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "hf"))
    back = DDPMUNet.from_diffusers(str(tmp_path / "hf" / "unet"))
    assert back.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 871])
    with torch.no_grad():
        assert rel_err(pipe.unet.double()(x.double(), t).sample, model(x, t)) < 1e-5
    assert torch.equal(df.NoiseSchedule.from_diffusers(pipe.scheduler).betas, schedule.betas)
    assert pipe.scheduler.config.variance_type == "fixed_small" and pipe.scheduler.config.clip_sample


def tensors(state):
    """Every tensor of a training state, by a path name, for a bit-for-bit comparison."""
    out = {}

    def walk(prefix, v):
        if isinstance(v, torch.Tensor):
            out[prefix] = v
        elif isinstance(v, dict):
            for k, w in v.items():
                walk(f"{prefix}/{k}", w)
        elif isinstance(v, (list, tuple)):
            for i, w in enumerate(v):
                walk(f"{prefix}/{i}", w)
    walk("", {k: state[k] for k in ("model", "ema", "optimizer", "rng")})
    return out


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run_bit_for_bit(pngs, tiny_json, tmp_path):
    # Bit for bit is the CPU's promise: on a GPU the GroupNorm kernels sum with atomics.
    steps = ["--steps", "20", "--checkpoint-every", "4", "--device", "cpu"]
    whole = tmp_path / "whole.pt"
    r = subprocess.run(train_cmd(pngs, tiny_json, whole, *steps), capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr

    cut = tmp_path / "cut.pt"
    state_path = tmp_path / "cut.state.pt"
    p = subprocess.Popen(train_cmd(pngs, tiny_json, cut, *steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=ENV)
    deadline = time.time() + 300
    while not state_path.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, p.stderr.read()
    killed_at = load_state(str(state_path))["step"]
    assert killed_at < 20 and killed_at % 4 == 0

    r = subprocess.run(train_cmd(pngs, tiny_json, cut, "--resume", *steps), capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"steps {killed_at + 1} to 20," in r.stdout
    a, b = load_state(str(tmp_path / "whole.state.pt")), load_state(str(state_path))
    assert a["step"] == b["step"] == 20 and a["data_order"] == b["data_order"]
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 3 * len(a["model"])
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ema_a, _, _ = DDPMUNet.load(str(whole))
    ema_b, _, _ = DDPMUNet.load(str(cut))
    for (k, x), y in zip(ema_a.state_dict().items(), ema_b.state_dict().values()):
        assert torch.equal(x, y), k


def test_a_state_saved_on_a_gpu_resumes_on_the_cpu_as_its_own():
    """A GPU run's Adam state (fused, its step a float32 tensor, conv moments channels_last) resumed on
    the CPU steps exactly as the CPU run's own state does: load_state_dict would otherwise keep
    fused=True, and CPU fused Adam walks channels_last moments as if they were contiguous."""
    import copy

    from ddpm_fast.train import Recipe, train

    torch.manual_seed(0)
    model = DDPMUNet(**TINY)
    data, schedule = torch.rand(6, 3, 8, 8) * 2 - 1, df.NoiseSchedule.linear(100)
    recipe = Recipe(batch_size=2, lr=1e-2, warmup=1)
    states = {}
    train(copy.deepcopy(model), data, schedule, 2, recipe, device="cpu", log=None, checkpoint_every=1,
          checkpoint=lambda state, ema: states.setdefault(state["step"], copy.deepcopy(state)))
    as_on_gpu = copy.deepcopy(states[1])
    opt = as_on_gpu["optimizer"]
    opt["param_groups"] = [{**g, "fused": True} for g in opt["param_groups"]]
    for st in opt["state"].values():
        st.update({k: v.contiguous(memory_format=torch.channels_last) for k, v in st.items() if v.dim() == 4})
    assert any(v.dim() == 4 for st in opt["state"].values() for v in st.values())
    own = train(copy.deepcopy(model), data, schedule, 2, recipe, device="cpu", log=None, resume=states[1])
    other = train(copy.deepcopy(model), data, schedule, 2, recipe, device="cpu", log=None, resume=as_on_gpu)
    for (name, a), b in zip(own.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def run_train(capsys, *argv):
    rc = cli.main(["train", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(capsys, match, *argv):
    rc, _, err = run_train(capsys, *argv)
    assert rc == 2 and err.startswith("ddpm-fast train: error: ") and err.count("\n") == 1, err
    assert match in err, err


def test_bad_command_lines(capsys, tmp_path, pngs, tiny_json):
    out = ["--out", tmp_path / "m.pt", "--steps", 1]  # one step, should a check not stop it
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "bad.json").write_text("{oops")
    (tmp_path / "zero.json").write_text(json.dumps(dict(TINY, ch=0)))
    (tmp_path / "extra.json").write_text(json.dumps(dict(TINY, colour=True)))
    cases = [
        ("--data: ", ["--data", tmp_path / "missing"]),
        ("is not a directory", ["--data", tiny_json]),
        ("--data: no PNG or JPEG images under", ["--data", tmp_path / "empty"]),
        ("--model: expected digits16, cifar10 or a JSON config file, got 'cifar100'", ["--model", "cifar100"]),
        ("--model: cannot read", ["--model", tmp_path / "bad.json"]),
        ("--model: ", ["--model", tmp_path / "list.json"]),
        ("--model: ch: expected a positive int", ["--model", tmp_path / "zero.json"]),
        ("--model: ", ["--model", tmp_path / "extra.json"]),
        ("--model: the digits are greyscale", ["--model", "cifar10"]),
        ("--steps: expected a positive int, got 0", ["--steps", 0]),
        ("--image-size: expected a positive int", ["--image-size", -8]),
        ("--batch-size: expected a positive int, got 0", ["--batch-size", 0]),
        ("--lr: expected a positive learning rate", ["--lr", -1]),
        ("--ema-decay: expected a number in [0, 1)", ["--ema-decay", 1.5]),
        ("--timesteps: ", ["--timesteps", 0]),
        ("--workers: expected a non-negative int", ["--workers", -1]),
        ("--device: ", ["--device", "tpu:x"]),
        ("--resume: no training state at", ["--resume"]),
    ]
    for match, argv in cases:
        assert_usage_error(capsys, match, *out, *argv)
    assert_usage_error(capsys, "--out: cannot create", "--out", os.path.join(tiny_json, "m.pt"))
    assert not list(tmp_path.glob("m*"))


def test_train_under_torchrun_is_refused(capsys, monkeypatch, tmp_path, pngs, tiny_json):
    """Every process of a torchrun would train the same run into the same --out."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_usage_error(capsys, "train runs in one process", "--data", pngs, "--model", tiny_json,
                       "--out", tmp_path / "m.pt", "--steps", 1)
    assert not list(tmp_path.glob("m*"))


@pytest.mark.slow
def test_resume_keeps_the_run_and_unreadable_images_fail_cleanly(capsys, tmp_path, pngs, tiny_json):
    base = ["--data", pngs, "--model", tiny_json, "--out", tmp_path / "m.pt", "--workers", 0]
    rc, out, _ = run_train(capsys, *base, "--steps", 1, "--batch-size", 2, "--no-progress")
    assert rc == 0 and (tmp_path / "m.state.pt").exists()
    assert_usage_error(capsys, "holds a training run; pass --resume", *base, "--steps", 2)
    assert_usage_error(capsys, "--batch-size: the run being resumed has 2, got 4", *base, "--resume",
                       "--batch-size", 4)
    assert_usage_error(capsys, "--seed: the run being resumed has 0, got 1", *base, "--resume", "--seed", 1)
    assert_usage_error(capsys, "--model: the run being resumed trains another model", *base[:2], "--model",
                       "digits16", *base[4:], "--resume")
    assert_usage_error(capsys, "--no-flip: ", *base, "--resume", "--no-flip")
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(other / "one.png")
    assert_usage_error(capsys, "--data: the run being resumed read 200 images", "--data", other, *base[2:],
                       "--resume")
    rc, out, _ = run_train(capsys, *base, "--resume", "--steps", 1)
    assert rc == 0 and "at step 1 already" in out
    # an image that cannot be decoded stops the run with a one-line error; what was done is kept
    (other / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    broken = ["--data", other, "--model", tiny_json, "--out", tmp_path / "b.pt", "--workers", 0, "--batch-size", 2]
    assert_usage_error(capsys, "broken.png", *broken, "--steps", 3)


@pytest.mark.slow
def test_progress_bar_on_a_terminal_only(capsys, monkeypatch, tmp_path, pngs, tiny_json):
    base = ["--data", pngs, "--model", tiny_json, "--workers", 0, "--batch-size", 2, "--steps", 2, "--log-every", 1]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc, out, err = run_train(capsys, *base, "--out", tmp_path / "a.pt")
    assert rc == 0 and "2/2" in err and ("step/s" in err or "s/step" in err), err
    assert "<" in err and "loss=" in err  # elapsed<remaining (ETA), and the loss
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc, out, err = run_train(capsys, *base, "--out", tmp_path / "b.pt", "--no-progress")
    assert rc == 0 and "step/s" not in err and "s/step" not in err and "step 2/2  loss" in out


def test_export_bad_input(capsys, tmp_path):
    def export(*argv):
        rc = cli.main(["export", *map(str, argv)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("ddpm-fast export: error: ") and err.count("\n") == 1, err
        return err

    assert "CHECKPOINT: " in export(tmp_path / "missing.pt", tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert "is not empty" in export(tmp_path / "missing.pt", tmp_path / "full")
    pooled = DDPMUNet(**dict(TINY, resamp_with_conv=False))
    pooled.save(str(tmp_path / "pooled.pt"), df.NoiseSchedule.linear(10))
    assert "resamp_with_conv=False" in export(tmp_path / "pooled.pt", tmp_path / "out")
