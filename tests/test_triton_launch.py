"""ddpm_fast/triton/launch.py: batches wider than a grid's y dimension go out in chunks, each launch
told its first index.  With GRID_Y set to 2, every launcher that chunks runs a batch of 5 as three
launches; the results must be those of one launch, bit for bit (the Philox sample index, the
timestep and the offsets all follow the absolute index)."""

import pytest
import torch

import ddpm_fast as df
from conftest import needs
from ddpm_fast.triton import launch

pytestmark = [needs("triton"), pytest.mark.triton]


def test_batch_chunks():
    assert launch.batch_chunks(0) == []
    assert launch.batch_chunks(65535) == [(0, 65535)]
    assert launch.batch_chunks(65536 * 2) == [(0, 65535), (65535, 65535), (131070, 2)]


def calls(dev, gen):
    s = df.NoiseSchedule.linear(1000)
    x = torch.randn(5, 3, 4, 6, generator=gen).to(dev)
    out = torch.randn(5, 6, 4, 6, generator=gen).to(dev)
    t = torch.tensor([999, 0, 500, 3, 71], device=dev)
    xw = torch.randn(5, 3, 2, 3, 3, generator=gen).to(dev)
    ow = torch.randn(5, 2, 2, 3, 3, generator=gen).to(dev)
    tw = torch.tensor([[400, 399], [1, 0], [0, -1], [900, 899], [77, 76]], device=dev)
    q, k, v = (torch.randn(3, 2, 9, 16, generator=gen).to(dev) for _ in range(3))  # B * heads = 6
    return {
        "philox_randn": lambda: df.philox_randn((5, 3, 7), 11, t=t, sample_offset=4, backend="triton"),
        "q_sample": lambda: df.q_sample(x, t, s, seed=3, sample_offset=8, return_noise=True, backend="triton"),
        "p_step": lambda: df.p_step(x, out, t, s, seed=3, variance="learned_range", backend="triton"),
        "p_step channels_last": lambda: df.p_step(x.contiguous(memory_format=torch.channels_last), out, t, s,
                                                  seed=5, variance="learned_range", backend="triton"),
        "p_step rng": lambda: df.p_step(x, out[:, :3], t, s, rng=df.rng_tensor(2**64 - 1, 6, device=dev),
                                        backend="triton"),
        "picard_step": lambda: df.picard_step(xw, ow, tw, s, torch.arange(5, device=dev) * 3, 9, backend="triton"),
        "attention": lambda: df.attention(q, k, v, backend="triton"),
    }


@pytest.mark.parametrize("op", ["philox_randn", "q_sample", "p_step", "p_step channels_last", "p_step rng",
                                "picard_step", "attention"])
def test_chunked_launches_are_one_launch(op, gen, monkeypatch):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    run = calls(dev, gen)[op]
    whole = run()
    monkeypatch.setattr(launch, "GRID_Y", 2)
    chunks = []
    original = launch.batch_chunks
    monkeypatch.setattr(launch, "batch_chunks", lambda n: chunks.append(original(n)) or chunks[-1])
    chunked = run()
    assert [len(c) for c in chunks] == [3], chunks  # the launcher went through batch_chunks: 5 or 6 in 3 launches
    for a, b in zip(*(r if isinstance(r, tuple) else (r,) for r in (whole, chunked))):
        assert torch.equal(a, b)
