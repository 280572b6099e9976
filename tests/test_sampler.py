import copy
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm_fast as df
from conftest import rel_err, requires_cuda
from ddpm_fast.models import DDPMUNet


def tiny_net(gen, out_channels=1):
    net = DDPMUNet(in_channels=1, out_channels=out_channels, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(4,), dropout=0.0, image_size=8, num_groups=4)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 / max(1, p[0].numel()) ** 0.5))
    return net.eval()


def elementwise_model(x, t):
    """A model whose arithmetic cannot depend on the batch size (no GEMM, no reduction)."""
    return 0.5 * torch.tanh(x) + (t.float() / 1000)[:, None, None, None]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_sampler_is_batch_invariant_bit_for_bit(backend):
    sampler = df.DDPMSampler(elementwise_model, df.NoiseSchedule.linear(100), backend=backend)
    a = sampler.sample(8, seed=3, batch_size=8, sample_shape=(3, 5, 5))
    for bs in (3, 1):
        assert torch.equal(sampler.sample(8, seed=3, batch_size=bs, sample_shape=(3, 5, 5)), a)


def test_images_independent_of_batch_size(gen):
    sampler = df.DDPMSampler(tiny_net(gen), df.NoiseSchedule.linear(100))
    a = sampler.sample(8, seed=3, batch_size=8, num_steps=12)
    b = sampler.sample(8, seed=3, batch_size=3, num_steps=12)
    c = sampler.sample(8, seed=3, batch_size=1, num_steps=12)
    assert a.shape == (8, 1, 8, 8) and a.dtype == torch.float32
    # Everything the sampler does is batch-invariant bit for bit (above); the U-Net's own GEMMs block
    # differently for different batch sizes, which moves the last bit of its output.
    assert (a - b).abs().max() < 1e-5 and (a - c).abs().max() < 1e-5
    # image i depends on (seed, i) only: a later slice of the run is the same images
    assert (sampler.sample(3, seed=3, num_steps=12, start_index=5) - a[5:]).abs().max() < 1e-5
    assert not torch.equal(sampler.sample(8, seed=4, num_steps=12), a)
    assert a.min() >= -1 and a.max() <= 1


def test_kernel_and_reference_backends_agree(gen):
    net, s = tiny_net(gen), df.NoiseSchedule.linear(50)
    fast = df.DDPMSampler(net, s).sample(4, seed=1, num_steps=10)
    ref = df.DDPMSampler(net, s, backend="reference").sample(4, seed=1, num_steps=10)
    assert rel_err(fast, ref) < 1e-4  # Philox normals agree to ~1e-6 between backends


def test_bare_callable_learned_range_and_errors(gen):
    s = df.NoiseSchedule.cosine(20)

    def eps_model(x, t):
        return torch.cat([0.1 * x, torch.tanh(x)], 1)

    sampler = df.DDPMSampler(eps_model, s, variance="learned_range", clip_sample=False)
    out = sampler.sample(3, seed=0, sample_shape=(2, 5, 5))
    assert out.shape == (3, 2, 5, 5) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="sample_shape"):
        sampler.sample(3)
    with pytest.raises(ValueError, match="num_images"):
        sampler.sample(0, sample_shape=(2, 5, 5))
    with pytest.raises(ValueError, match="does not fit"):
        df.DDPMSampler(lambda x, t: x[:, :1], s).sample(2, sample_shape=(2, 4, 4))
    with pytest.raises(ValueError, match="dtype"):
        df.DDPMSampler(eps_model, s, dtype="int8")
    with pytest.raises(ValueError, match="backend"):
        df.DDPMSampler(eps_model, s, backend="tpu")
    with pytest.raises(ValueError, match="num_steps"):
        df.DDPMSampler(eps_model, s).sample(1, sample_shape=(2, 4, 4), num_steps=50)


def test_respacing_keeps_the_abar_subsequence():
    ts = df.sampler.spaced_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 0 and ts[-1] == 999


def test_diffusers_unet_defaults(gen):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=2, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    sampler = df.DDPMSampler(unet, df.NoiseSchedule.linear(30))
    assert sampler.options["variance"] == "learned_range" and sampler.default_shape == (1, 8, 8)
    out = sampler.sample(2, num_steps=5)
    assert out.shape == (2, 1, 8, 8)


def test_to_uint8():
    x = torch.tensor([[[[-1.0, 0.0], [1.0, 2.0]]]])
    u = df.to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 2, 2, 1)
    assert u.flatten().tolist() == [0, 128, 255, 255]


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("batch_size", [4, 3])
def test_cuda_graphs_change_nothing(gen, batch_size):
    """Bit for bit: a replayed step launches the eager step's kernels on the eager step's shapes."""
    net = tiny_net(gen).cuda()
    s = df.NoiseSchedule.linear(40)
    with_graphs = df.DDPMSampler(net, s, cuda_graphs=True).sample(6, seed=2, batch_size=batch_size)
    without = df.DDPMSampler(net, s, cuda_graphs=False).sample(6, seed=2, batch_size=batch_size)
    assert torch.equal(with_graphs, without)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_cuda_images_independent_of_batch_size(gen, graphs, full_fp32):
    """Batches of 256, 64 and 7 (and its tail of 4): bit for bit where the model is elementwise, since
    everything the sampler runs is batch-invariant; through the U-Net, whose convolutions may take
    another algorithm at another batch size, within fp32 rounding."""
    s = df.NoiseSchedule.linear(30)
    sampler = df.DDPMSampler(elementwise_model, s, cuda_graphs=graphs, device="cuda")
    runs = [sampler.sample(256, seed=9, batch_size=bs, sample_shape=(3, 5, 5)) for bs in (256, 64, 7)]
    assert torch.equal(runs[1], runs[0]) and torch.equal(runs[2], runs[0])
    sampler = df.DDPMSampler(tiny_net(gen).cuda(), s, cuda_graphs=graphs)
    runs = [sampler.sample(256, seed=9, batch_size=bs) for bs in (256, 64, 7)]
    assert (runs[1] - runs[0]).abs().max() < 1e-4 and (runs[2] - runs[0]).abs().max() < 1e-4


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_cuda_sampling_loop_makes_no_host_sync(gen, graphs):
    """The loop over steps, once its set-up is done (tables on the device, the capture, lazy CUDA and
    Triton state), under torch.cuda.set_sync_debug_mode("error"), which raises at any implicit sync:
    .item(), a blocking copy, nonzero.  Copying the images to the host after the loop is the one sync."""
    sampler = df.DDPMSampler(tiny_net(gen).cuda(), df.NoiseSchedule.linear(20), cuda_graphs=graphs)
    sched, ts = sampler._plan(None)
    tables, t_model = sched.to("cuda"), torch.tensor(ts, device="cuda")
    x = df.philox_randn((5, 1, 8, 8), 4, device="cuda")
    captured = {}

    @torch.no_grad()  # as in sample(): a model output that requires grad sends p_step to the reference
    def loop():
        if graphs:
            return sampler._run_graphed(x, tables, t_model, 4, 0, None, captured)
        return sampler._run_eager(x, tables, t_model, 4, 0, None)

    first = loop()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = loop()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(again, first)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])])
def test_channels_last_changes_nothing(gen, device, full_fp32):
    """channels_last=True turns the module's 4-D weights and the samples channels_last, which the kernels
    and the convolutions then run on: the images stay those of NCHW, bit for bit where the model is
    elementwise, within fp32 rounding through the U-Net (CUDA graphs on, on the GPU)."""
    s = df.NoiseSchedule.linear(30)
    nchw, cl = (df.DDPMSampler(elementwise_model, s, device=device, channels_last=c) for c in (False, True))
    run = dict(seed=1, batch_size=3, sample_shape=(3, 4, 5))
    assert torch.equal(cl.sample(5, **run), nchw.sample(5, **run))
    net = tiny_net(gen).to(device)
    want = df.DDPMSampler(copy.deepcopy(net), s).sample(5, seed=1, batch_size=3)
    sampler = df.DDPMSampler(net, s, channels_last=True)
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for parallel in (None, df.ParallelConfig(window=4, tol=0.0)):
        sampler.parallel = parallel
        # the GPU's convolutions may take another algorithm for another layout or batch (as below)
        assert (sampler.sample(5, seed=1, batch_size=3) - want).abs().max() < (1e-4 if device == "cuda" else 1e-5)


def test_kept_captures_start_anew_when_what_they_read_changes(gen):
    """What a keep_graphs sampler keeps from one sample() call for the next (the device tables, the
    timesteps and the captures by shape; the bookkeeping alone here, which captures nothing on the
    CPU): kept while the schedule, the steps, every module's mode, the parameters' storage and
    versions and torch's settings stay as they were, and for a parallel sampler the seed; anything
    else starts anew.  Without keep_graphs, or for a bare callable, nothing is kept."""
    net = tiny_net(gen)
    sampler = df.DDPMSampler(net, df.NoiseSchedule.linear(30), keep_graphs=True)
    sampler.cuda_graphs = True

    def kept(num_steps=None, seed=0, on=sampler):
        return on._call_state(num_steps, seed)[2]

    first = kept()
    assert kept() is first and kept(seed=7) is first  # the sequential step takes the seed from a buffer
    assert kept(num_steps=10) is not first and kept() is not first
    cudnn = torch.backends.cudnn
    changes = [lambda: next(net.parameters()).mul_(1.0),  # an in-place update moves its version
               lambda: setattr(net.conv_in, "bias", torch.nn.Parameter(net.conv_in.bias.clone())),
               net.train, net.eval, lambda: net.conv_in.train(), lambda: net.conv_in.eval(),
               lambda: setattr(sampler, "schedule", df.NoiseSchedule.cosine(30)),
               lambda: setattr(cudnn, "allow_tf32", not cudnn.allow_tf32),
               lambda: setattr(cudnn, "allow_tf32", not cudnn.allow_tf32), sampler.release_graphs]
    for change in changes:
        before = kept()
        with torch.no_grad():
            change()
        assert kept() is not before and kept() is kept()
    par = df.DDPMSampler(net, df.NoiseSchedule.linear(30), parallel=df.ParallelConfig(window=4), keep_graphs=True)
    par.cuda_graphs = True
    first = kept(on=par)
    assert kept(on=par) is first and kept(seed=1, on=par) is not first  # a round's capture bakes the seed in
    with torch.inference_mode():
        frozen = tiny_net(gen)  # inference tensors have no version to watch
    for model, keep, graphs in ((net, False, True), (net, True, False), (elementwise_model, True, True),
                                (frozen, True, True)):
        other = df.DDPMSampler(model, df.NoiseSchedule.linear(30), cuda_graphs=False, keep_graphs=keep)
        other.cuda_graphs = graphs
        assert kept(on=other) is not kept(on=other) and other._kept is None
    with pytest.raises(TypeError, match="keep_graphs: expected a bool"):
        df.DDPMSampler(net, keep_graphs=1)


def test_kept_captures_of_shapes_the_last_call_did_not_use_are_dropped():
    from ddpm_fast.sampler import _Captures

    graphs = _Captures()
    graphs["a"], graphs["b"] = 1, 2
    assert graphs["a"] == 1  # the call used a and captured b without replaying it
    assert graphs.start_call() is graphs and dict(graphs) == {"a": 1}
    assert dict(graphs.start_call()) == {}  # the next call used nothing


def test_the_graph_key_reads_torch_settings_set_through_either_api():
    """Once torch's new fp32_precision API has been used, a legacy read raises: the key must still
    read, and move with the setting (in a process of its own: the settings are global)."""
    code = """
import torch
from ddpm_fast.sampler import _kernel_settings
a = _kernel_settings()
torch.backends.cuda.matmul.fp32_precision = "tf32"
b = _kernel_settings()
torch.backends.cudnn.conv.fp32_precision = "ieee"
c = _kernel_settings()
torch.backends.cudnn.allow_tf32 = True
assert a != b != c != _kernel_settings(), (a, b, c)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr


@requires_cuda
@pytest.mark.cuda
def test_cuda_graphs_one_capture_per_batch_size(gen, monkeypatch):
    """The Philox (seed, offset) reaches the captured step through a device tensor, so batches of
    one size share one capture: 3 batches of 4 and a tail of 2 make two captures, and the images
    are those of the eager loop.  A later call captures anew; with keep_graphs it replays them, until
    an in-place update of the weights, after which it captures anew and gives the updated model's
    images (bf16 under autocast: the weights' casts are part of the captured step)."""
    net = tiny_net(gen).cuda()
    s = df.NoiseSchedule.linear(30)
    for keep in (False, True):
        sampler = df.DDPMSampler(net, s, cuda_graphs=True, keep_graphs=keep)
        captures = []
        original = sampler._capture
        monkeypatch.setattr(sampler, "_capture", lambda x, *a, o=original, c=captures: c.append(x.shape[0]) or o(x, *a))
        graphed = sampler.sample(14, seed=2**64 - 3, batch_size=4, start_index=5)
        assert captures == [4, 2]
        eager = df.DDPMSampler(net, s, cuda_graphs=False).sample(14, seed=2**64 - 3, batch_size=4, start_index=5)
        assert torch.equal(graphed, eager)
        assert torch.equal(sampler.sample(6, seed=1, batch_size=4),
                           df.DDPMSampler(net, s, cuda_graphs=False).sample(6, seed=1, batch_size=4))
        assert captures == ([4, 2] if keep else [4, 2, 4, 2])
    sampler = df.DDPMSampler(net, s, dtype="bf16", keep_graphs=True)
    eager = df.DDPMSampler(net, s, dtype="bf16", cuda_graphs=False)
    assert torch.equal(sampler.sample(6, seed=1, batch_size=4), eager.sample(6, seed=1, batch_size=4))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.9)
    assert torch.equal(sampler.sample(6, seed=1, batch_size=4), eager.sample(6, seed=1, batch_size=4))


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ddpm_fast", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@requires_cuda
@pytest.mark.cuda
def test_cli_more_processes_than_gpus_is_refused(tmp_path, monkeypatch, capsys):
    from ddpm_fast import cli

    n = torch.cuda.device_count()
    for name, value in (("RANK", n), ("WORLD_SIZE", n + 1), ("LOCAL_RANK", n)):
        monkeypatch.setenv(name, str(value))
    assert cli.main(["sample", "--num-images", "2", "--steps", "2", "--out", str(tmp_path / "o")]) == 2
    assert f"LOCAL_RANK {n}: there are {n} GPU(s) here" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_sample_one_and_two_processes(tmp_path, gen):
    ckpt = tmp_path / "tiny.pt"
    tiny_net(gen).save(str(ckpt), df.NoiseSchedule.linear(20), sampling=dict(clip_sample=True))
    # One GPU per process: with fewer than two GPUs both runs sample on the CPU.
    device = [] if torch.cuda.device_count() >= 2 else ["--device", "cpu"]
    one = run_cli("sample", "--model", str(ckpt), "--num", "8", "--batch-size", "3", "--out", str(tmp_path / "a"),
                  *device)
    assert one.returncode == 0, one.stderr
    assert "images/s" in one.stdout and "ms per step" in one.stdout
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          "-m", "ddpm_fast", "sample", "--model", str(ckpt), "--num-images", "8", "--batch-size", "2",
                          "--out", str(tmp_path / "b"), *device], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = np.load(tmp_path / "a" / "samples.npz")["arr_0"]
    b = np.load(tmp_path / "b" / "samples.npz")["arr_0"]
    assert a.shape == (8, 8, 8, 1) and a.dtype == np.uint8
    # same images; batches of 3 vs 2 may move the U-Net's last bit, so a pixel may round the other way
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert (tmp_path / "a" / "grid.png").stat().st_size > 0


def test_cli_sample_bad_input(tmp_path, gen):
    r = run_cli("sample", "--num", "0", "--out", str(tmp_path))
    assert r.returncode == 2 and "--num-images" in r.stderr
    r = run_cli("sample", "--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "missing.pt" in r.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = run_cli("sample", "--model", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "cannot read checkpoint" in r.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):  # root can write anywhere
        r = run_cli("sample", "--out", str(ro / "x"))
        assert r.returncode == 2 and "--out" in r.stderr
    r = run_cli("sample", "--dtype", "int4")
    assert r.returncode == 2
