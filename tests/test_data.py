"""Training data: ImageFolder (users' images), DataOrder (a run's batches as a function of the step)."""

import numpy as np
import pytest
import torch

from ddpm_fast.data import DataOrder, ImageFolder, batches, to_model_input

Image = pytest.importorskip("PIL.Image")  # Pillow reads users' images; the triton-only CI env has none


def write(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def rand_image(rng, h, w, c=3):
    shape = (h, w, c) if c > 1 else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng()
    write(tmp_path / "b.png", rand_image(rng, 20, 30))
    write(tmp_path / "a" / "deep" / "er" / "x.PNG", rand_image(rng, 9, 9, 1))  # greyscale, upper-case extension
    write(tmp_path / "a" / "y.jpg", rand_image(rng, 40, 17))
    write(tmp_path / "a" / "z.jpeg", rand_image(rng, 33, 33))
    write(tmp_path / "c" / "rgba.png", rand_image(rng, 8, 12, 4))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_finds_images_at_any_depth_in_a_fixed_order(folder):
    ds = ImageFolder(str(folder), 16)
    assert ds.files == ["a/deep/er/x.PNG", "a/y.jpg", "a/z.jpeg", "b.png", "c/rgba.png"]
    for i in range(len(ds)):
        for channels in (3, 1):
            x = ImageFolder(str(folder), 16, channels)[(i, False)]
            assert x.shape == (channels, 16, 16) and x.dtype == torch.uint8


def test_centre_crop_resize_and_flip(tmp_path):
    # 30 wide, 10 high: thirds red | green | blue; the centre square is the green third
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, :10, 0], img[:, 10:20, 1], img[:, 20:, 2] = 255, 255, 255
    write(tmp_path / "wide.png", img)
    tall = np.zeros((24, 6, 3), np.uint8)
    tall[9:15] = 200
    tall[9:15, :3] = 100  # centre 6x6: left half 100, right half 200
    write(tmp_path / "tall.png", tall)
    ds = ImageFolder(str(tmp_path), 6)
    wide = ds[(1, False)]
    assert (wide[1] == 255).all() and (wide[0] == 0).all() and (wide[2] == 0).all()
    x, mirrored = ds[(0, False)], ds[(0, True)]
    assert (x[:, :, :3] == 100).all() and (x[:, :, 3:] == 200).all()
    assert torch.equal(mirrored, x.flip(-1))
    # shrinking: the same as PIL's crop + antialiased resize, done independently
    big = np.random.default_rng().integers(0, 256, (50, 70, 3), dtype=np.uint8)
    write(tmp_path / "big" / "big.png", big)
    ds = ImageFolder(str(tmp_path / "big"), 8)
    want = np.array(Image.fromarray(big[:, 10:60]).resize((8, 8), Image.Resampling.BICUBIC))
    assert torch.equal(ds[(0, False)], torch.from_numpy(want).permute(2, 0, 1))


def test_bad_folders(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="data: .* is not a directory"):
        ImageFolder(str(tmp_path / "missing"), 16)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        ImageFolder(str(folder / "notes.txt"), 16)
    with pytest.raises(ValueError, match="data: no PNG or JPEG images under"):
        ImageFolder(str(folder / "empty"), 16)
    with pytest.raises(ValueError, match="channels"):
        ImageFolder(str(folder), 16, channels=4)
    with pytest.raises(ValueError, match="image_size"):
        ImageFolder(str(folder), 0)
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = ImageFolder(str(folder), 16)
    with pytest.raises(ValueError, match="data: cannot read image .*broken.png"):
        ds[(ds.files.index("a/broken.png"), False)]


def test_fingerprint_follows_the_files(folder):
    a = ImageFolder(str(folder), 16).fingerprint()
    assert ImageFolder(str(folder), 32).fingerprint() == a and a.startswith("5 images")
    write(folder / "new.png", np.zeros((4, 4, 3), np.uint8))
    assert ImageFolder(str(folder), 16).fingerprint() != a


def test_data_order_is_a_function_of_seed_and_step():
    n, B, T = 37, 8, 1000
    seed = int(np.random.default_rng().integers(0, 2**62))
    order = DataOrder(n, B, seed, T, flip=True)
    steps = [order.batch(k) for k in range(3 * n)]  # 24 epochs, batches straddling epoch ends
    idx = torch.cat([s[0] for s in steps])
    for e in range(len(idx) // n):
        assert sorted(idx[e * n:(e + 1) * n].tolist()) == list(range(n))  # each epoch: every image once
    assert not torch.equal(idx[:n], idx[n:2 * n])  # reshuffled every epoch
    fresh = DataOrder(n, B, seed, T, flip=True)
    for k in (50, 3, 0, 99):  # any step, in any order, from a new object: the same batch
        for a, b in zip(fresh.batch(k), steps[k]):
            assert torch.equal(a, b)
    flips = torch.cat([s[1] for s in steps]).float()
    t = torch.cat([s[2] for s in steps])
    assert flips.dtype == torch.float32 and abs(flips.mean().item() - 0.5) < 0.1
    assert 0 <= t.min() and t.max() < T and abs(t.float().mean().item() - (T - 1) / 2) < 60
    no_flip = DataOrder(n, B, seed, T, flip=False)
    assert not no_flip.batch(7)[1].any() and torch.equal(no_flip.batch(7)[2], steps[7][2])
    other = DataOrder(n, B, seed + 1, T, flip=True)
    assert not torch.equal(other.batch(0)[0], steps[0][0])
    assert order.state(10) == dict(seed=seed, n=n, batch_size=B, epoch=80 // n, position=80 % n)


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_from_a_folder_and_a_tensor(folder, workers):
    ds = ImageFolder(str(folder), 8)
    order = DataOrder(len(ds), 3, 1, 50, flip=True)
    got = list(batches(ds, order, 2, 6, workers=workers))
    assert len(got) == 4
    for k, (images, t) in zip(range(2, 6), got):
        idx, flips, tt = order.batch(k)
        assert torch.equal(t, tt)
        assert torch.equal(images, torch.stack([ds[(i, f)] for i, f in zip(idx.tolist(), flips.tolist())]))
    data = torch.rand(5, 3, 4, 4) * 2 - 1
    for k, (x, t) in zip(range(2, 6), batches(data, order, 2, 6)):
        idx, flips, _ = order.batch(k)
        want = torch.stack([data[i].flip(-1) if f else data[i] for i, f in zip(idx.tolist(), flips.tolist())])
        assert torch.equal(x, want)


def test_to_model_input():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8)
    assert torch.allclose(to_model_input(x, torch.device("cpu")), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]), atol=1e-6)
    f = torch.rand(3) * 2 - 1
    assert torch.equal(to_model_input(f, torch.device("cpu")), f)
