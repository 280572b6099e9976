"""FastDDPMScheduler against diffusers' DDPMScheduler, step for step with the same generator."""

import itertools

import pytest
import torch

from conftest import rel_err, requires_cuda

diffusers = pytest.importorskip("diffusers")
from ddpm_fast.diffusers import FastDDPMScheduler  # noqa: E402

CONFIGS = [dict(variance_type=v, prediction_type=p, clip_sample=c, thresholding=th)
           for v, p, c, th in itertools.product(["fixed_small", "fixed_small_log", "fixed_large", "learned_range"],
                                                ["epsilon", "sample", "v_prediction"], [True, False], [False, True])
           if not (th and c)]
SPACINGS = [None, ("leading", 25), ("trailing", 25), ("linspace", 25), ("custom", [900, 500, 120, 7, 0])]


def float64_truth(fast, cfg, x, out, t, noise):
    """The reference step in float64 on the schedule FastDDPMScheduler built (None where it defers
    to diffusers' own code)."""
    import ddpm_fast as df
    from ddpm_fast.diffusers import VARIANCE

    sched, index = fast._fast_schedule()
    k = t if index is None else index.get(t)
    if k is None or (k == 0 and t > 0):
        return None
    c = fast.config
    return df.reference.p_step(x.double(), out.double(), k, sched, noise=noise.double(), prediction=c.prediction_type,
                               variance=VARIANCE[c.variance_type], clip_sample=c.clip_sample,
                               clip_range=c.clip_sample_range, thresholding=c.thresholding,
                               dynamic_thresholding_ratio=c.dynamic_thresholding_ratio,
                               sample_max_value=c.sample_max_value)


def run_both(cfg, spacing, gen_seed, shape=(2, 3, 6, 6), device="cpu"):
    ref, fast = diffusers.DDPMScheduler(**cfg), FastDDPMScheduler(**cfg)
    for s in (ref, fast):
        if spacing is None:
            continue
        if spacing[0] == "custom":
            s.set_timesteps(timesteps=spacing[1])
        else:
            s.register_to_config(timestep_spacing=spacing[0])
            s.set_timesteps(spacing[1])
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(shape, generator=g).to(device)
    C = shape[1]
    timesteps = ref.timesteps if spacing is not None else torch.tensor([999, 998, 500, 3, 1, 0])
    xr, xf = x.clone(), x.clone()
    gr, gf = torch.Generator().manual_seed(gen_seed + 1), torch.Generator().manual_seed(gen_seed + 1)
    for t in timesteps:
        out = torch.randn(shape[0], 2 * C if cfg["variance_type"] == "learned_range" else C, *shape[2:],
                          generator=g).to(device)
        noise = torch.randn(shape, generator=torch.Generator().set_state(gr.get_state()))  # what both will draw
        a = ref.step(out, t, xr, generator=gr)
        b = fast.step(out, t, xf, generator=gf)
        assert b.prev_sample.device == xf.device
        truth = float64_truth(fast, cfg, xr.cpu(), out.cpu(), int(t), noise)
        if truth is not None:
            # fp32 rounding of the float64 step on diffusers' own float32 tables
            err_fast, err_ref = rel_err(b.prev_sample.cpu(), truth), rel_err(a.prev_sample.cpu(), truth)
            assert err_fast < 1e-6 and err_fast <= 2 * err_ref + 1e-7, (int(t), err_fast, err_ref)
        assert rel_err(b.prev_sample, a.prev_sample) < 1e-6, int(t)
        assert rel_err(b.pred_original_sample, a.pred_original_sample) < 1e-6, int(t)
        xr, xf = a.prev_sample, a.prev_sample  # both continue from the same state
    assert torch.equal(gr.get_state(), gf.get_state())  # the same draws were made


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_step_matches_ddpm_scheduler(cfg):
    run_both(cfg, None, 0)


@pytest.mark.parametrize("spacing", SPACINGS[1:], ids=lambda s: s[0])
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_step_matches_with_spacing(spacing, variance):
    run_both(dict(variance_type=variance), spacing, 1)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("cfg", CONFIGS[::5], ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("spacing", SPACINGS[:2], ids=["all", "leading"])
def test_cuda_step_matches_ddpm_scheduler(cfg, spacing):
    """On the GPU, where the step is the CUDA kernel (or Triton's): diffusers' generator draws on the
    host, as DDPMPipeline's do, so both schedulers add the same noise."""
    run_both(cfg, spacing, 2, shape=(3, 3, 7, 5), device="cuda")


def test_a_timestep_is_found_among_the_timesteps_by_its_place_in_their_storage():
    """How step finds a GPU timestep's value in the host copy without reading the device (here on
    CPU tensors, where step itself just reads them): an element view of the timesteps gives its
    index, anything else None."""
    from ddpm_fast.diffusers import _element_index

    fast = FastDDPMScheduler()
    fast.set_timesteps(25)
    ts = fast.timesteps
    assert [_element_index(t, ts) for t in ts] == list(range(25))
    assert _element_index(ts[::2][3], ts) == 6 and _element_index(ts[5], ts[3:]) == 2
    assert _element_index(ts[2], ts[3:]) is None and _element_index(ts[5], ts[::2]) is None
    assert _element_index(ts.view(5, 5)[1, 2], ts) == 7  # another view of the same element
    for other in (torch.tensor(7), ts[4].clone(), ts.double()[4], ts[4:5]):
        assert _element_index(other, ts) is None
    assert _element_index(torch.tensor(900).expand(1)[0], torch.tensor(900).expand(1)) is None  # stride 0


def test_set_timesteps_under_inference_mode():
    """Inference tensors keep no version: the schedule's cache key does without it."""
    ref, fast = diffusers.DDPMScheduler(), FastDDPMScheduler()
    x, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with torch.inference_mode():
        for s in (ref, fast):
            s.set_timesteps(10)
        for t in fast.timesteps[:3]:
            g = [torch.Generator().manual_seed(int(t)) for _ in range(2)]
            a, b = ref.step(out, t, x, generator=g[0]), fast.step(out, t, x, generator=g[1])
            assert rel_err(b.prev_sample, a.prev_sample) < 1e-6
        noisy = fast.add_noise(x, out, fast.timesteps[:2])
        assert rel_err(noisy, ref.add_noise(x, out, ref.timesteps[:2])) < 1e-6


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("where", ["host", "device"], ids=["host timesteps", "device timesteps"])
@pytest.mark.parametrize("generator", ["philox", "cuda generator"])
def test_cuda_step_makes_no_host_sync(generator, where):
    """Every step of a 50-step loop but the first (which builds the tables and copies them over)
    under torch.cuda.set_sync_debug_mode("error"), which raises at any implicit sync.  The timesteps
    on the host, as DDPMPipeline sets them, or on the GPU, as set_timesteps(device=...) puts them in
    other pipelines: the same images as a loop that reads host timesteps, so each GPU timestep was
    found in the host copy as the value it holds."""
    x0 = torch.randn(4, 3, 8, 8, device="cuda")
    out = torch.randn_like(x0)

    def loop(device, debug):
        torch.manual_seed(0)  # the Philox seed the scheduler draws
        fast = FastDDPMScheduler()
        fast.set_timesteps(50, device=device)
        g = torch.Generator("cuda").manual_seed(3) if generator == "cuda generator" else None
        x = fast.step(out, fast.timesteps[0], x0, generator=g).prev_sample
        torch.cuda.set_sync_debug_mode("error" if debug else "default")
        try:
            for t in fast.timesteps[1:]:
                x = fast.step(out, t, x, generator=g).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return x

    x = loop("cuda" if where == "device" else None, debug=True)
    assert x.is_cuda and torch.isfinite(x).all()
    assert torch.equal(x, loop(None, debug=False))


def toy_model(x, t, variance):
    """A deterministic stand-in for a U-Net (diffusers' own scheduler tests use x t / (t + 1)),
    with a variance channel in [-1, 1] (learned_range) or [0, 1] (learned)."""
    out = x * t / (t + 1)
    if variance == "learned_range":
        return torch.cat([out, torch.tanh(x)], 1)
    if variance == "learned":
        return torch.cat([out, torch.sigmoid(x)], 1)
    return out


FULL_LOOP = [dict(variance_type=v, prediction_type=p, clip_sample=mode == "clip", thresholding=mode == "threshold")
             for v, p, mode in itertools.product(["fixed_small", "fixed_small_log", "fixed_large", "learned_range"],
                                                 ["epsilon", "sample", "v_prediction"], ["clip", "none", "threshold"])]


@pytest.mark.slow
@pytest.mark.parametrize("cfg", FULL_LOOP, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_full_loop_matches_ddpm_scheduler(cfg):
    """999 steps from t = 998, each scheduler on its own trajectory, one generator seed: diffusers'
    numbers to float32 rounding all the way down (max |delta| <= 1e-5 on unit-scale samples)."""
    ref, fast = diffusers.DDPMScheduler(**cfg), FastDDPMScheduler(**cfg)
    seed = int(torch.randint(0, 2**31, ()))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    xr, xf = x.clone(), x.clone()
    gr, gf = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    worst = 0.0
    for t in range(998, -1, -1):
        xr = ref.step(toy_model(xr, t, cfg["variance_type"]), t, xr, generator=gr).prev_sample
        xf = fast.step(toy_model(xf, t, cfg["variance_type"]), t, xf, generator=gf).prev_sample
        worst = max(worst, (xr - xf).abs().max().item())
    assert torch.isfinite(xf).all()
    assert worst <= 1e-5, worst
    assert torch.equal(gr.get_state(), gf.get_state())


# Configs DDPMScheduler constructs and steps; the ones the kernels cannot honour fall back to its code.
ACCEPTED = [
    (dict(beta_end=2.0), True),
    (dict(beta_start=0.0), True),
    (dict(variance_type="fixed_large_log"), True),
    (dict(variance_type="learned"), True),
    (dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist()), False),
    (dict(beta_schedule="scaled_linear"), False),
    (dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"), False),
    (dict(beta_schedule="sigmoid"), False),
    (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", clip_sample=False), False),
    (dict(num_train_timesteps=10, beta_start=0.1, beta_end=0.9), False),
    (dict(clip_sample_range=0.5, steps_offset=1), False),
]


@pytest.mark.parametrize("cfg,falls_back", ACCEPTED, ids=lambda c: str(c)[:40])
def test_every_config_diffusers_accepts_constructs_and_steps(cfg, falls_back, recwarn):
    ref, fast = diffusers.DDPMScheduler(**cfg), FastDDPMScheduler(**cfg)
    T = ref.config.num_train_timesteps
    x = torch.randn(2, 3, 4, 4)
    xr, xf = x.clone(), x.clone()
    gr, gf = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t in [T - 1, T // 2, 1, 0]:
        xr = ref.step(toy_model(xr, t, cfg.get("variance_type")), t, xr, generator=gr).prev_sample
        xf = fast.step(toy_model(xf, t, cfg.get("variance_type")), t, xf, generator=gf).prev_sample
        torch.testing.assert_close(xf, xr, rtol=1e-6, atol=1e-6, equal_nan=True)
    e = torch.randn_like(x)
    ts = torch.tensor([0, T - 1])
    torch.testing.assert_close(fast.add_noise(x, e, ts), ref.add_noise(x, e, ts), rtol=1e-6, atol=1e-6,
                               equal_nan=True)
    fallback_warnings = [w for w in recwarn if "DDPMScheduler's own code" in str(w.message)]
    assert len(fallback_warnings) == (1 if falls_back else 0), [str(w.message) for w in recwarn]


def test_unknown_prediction_type_raises_as_diffusers_does():
    ref, fast = diffusers.DDPMScheduler(prediction_type="x0"), FastDDPMScheduler(prediction_type="x0")
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="prediction_type"):
        ref.step(x, 10, x)
    with pytest.warns(UserWarning, match="DDPMScheduler's own code"), pytest.raises(ValueError, match="prediction_type"):
        fast.step(x, 10, x)


def test_step_list_of_generators():
    ref, fast = diffusers.DDPMScheduler(), FastDDPMScheduler()
    x = torch.randn(3, 1, 4, 4)
    out = torch.randn(3, 1, 4, 4)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    assert rel_err(fast.step(out, 400, x, generator=gens()).prev_sample,
                   ref.step(out, 400, x, generator=gens()).prev_sample) < 2e-5


def test_config_roundtrip_and_add_noise(tmp_path):
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large")
    fast = FastDDPMScheduler.from_config(ref.config)
    fast.save_pretrained(tmp_path)
    again = FastDDPMScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(fast.config) == public(ref.config)
    x, e = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 10, 500, 999])
    assert rel_err(again.add_noise(x, e, t), ref.add_noise(x, e, t)) < 1e-7  # diffusers' own float32 abar


def test_without_generator_uses_philox_reproducibly():
    s = FastDDPMScheduler()
    x, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.manual_seed(5)
    a = FastDDPMScheduler().step(out, 300, x).prev_sample
    torch.manual_seed(5)
    b = FastDDPMScheduler().step(out, 300, x).prev_sample
    assert torch.equal(a, b)
    assert torch.equal(s.step(out, 0, x).prev_sample, s.step(out, 0, x).prev_sample)  # no noise at t = 0


@pytest.mark.slow
def test_ddpm_pipeline_runs_unchanged():
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 attention_head_dim=None).eval()
    ref_pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    fast_pipe = diffusers.DDPMPipeline(unet=unet, scheduler=FastDDPMScheduler.from_config(ref_pipe.scheduler.config))
    kw = dict(batch_size=2, num_inference_steps=20, output_type="np")
    a = ref_pipe(generator=torch.Generator().manual_seed(0), **kw).images
    b = fast_pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(a - b).max() < 1e-5
    import ddpm_fast as df

    df.accelerate(fast_pipe.unet)
    c = fast_pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(a - c).max() < 1e-3


@requires_cuda
@pytest.mark.cuda
def test_cuda_ddpm_pipeline_runs_unchanged(full_fp32):
    """DDPMPipeline on the GPU with FastDDPMScheduler, then with accelerate()'s kernels in the UNet, against
    DDPMScheduler: one host generator draws the same noise for all three.  Convolutions in full fp32, as
    TF32 would turn the schedulers' last-ulp differences into 1e-3 ones."""
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 attention_head_dim=None).cuda().eval()
    ref_pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    fast_pipe = diffusers.DDPMPipeline(unet=unet,
                                       scheduler=FastDDPMScheduler.from_config(ref_pipe.scheduler.config))
    kw = dict(batch_size=3, num_inference_steps=25, output_type="np")
    a = ref_pipe(generator=torch.Generator().manual_seed(0), **kw).images
    b = fast_pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(a - b).max() < 1e-5
    import ddpm_fast as df

    df.accelerate(fast_pipe.unet)
    c = fast_pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(a - c).max() < 1e-3
