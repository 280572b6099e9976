"""The embedded default model: it loads, and its samples are digits a classifier recognises."""

import os
import subprocess
import sys

import pytest
import torch

import ddpm_fast as df
from ddpm_fast.data import load_digits, to_classifier_input
from ddpm_fast.io import DEFAULT_MODEL, load_for_sampling

pytest.importorskip("sklearn")


def test_shipped_weights_are_small_and_load():
    assert os.path.getsize(DEFAULT_MODEL) <= 10 * 2**20
    model, schedule, options = load_for_sampling(None)
    assert model.sample_shape == (1, 16, 16) and schedule.num_timesteps == 1000
    assert options["prediction"] == "epsilon"


def digits_classifier():
    """k-nearest neighbours on the 8x8 digits: confidence 0.9 means 9 of the 10 nearest training
    digits agree, which uniform noise rarely gets (a logistic regression is confident on noise)."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.neighbors import KNeighborsClassifier

    d = sk_digits()
    return KNeighborsClassifier(10).fit(d.data, d.target)


def confident_share(clf, images):
    p = clf.predict_proba(to_classifier_input(images).numpy())
    return float((p.max(1) >= 0.9).mean())


@pytest.mark.slow
def test_samples_are_recognisable_digits():
    clf = digits_classifier()
    real, _ = load_digits()
    assert confident_share(clf, real) >= 0.9  # the check itself passes real digits
    model, schedule, options = load_for_sampling(None)
    fast = df.DDPMSampler(model, schedule, **options).sample(64, seed=0, num_steps=250)
    ref = df.DDPMSampler(model, schedule, backend="reference", **options).sample(64, seed=0, num_steps=250)
    noise = torch.rand(64, 1, 16, 16) * 2 - 1
    share_fast, share_ref = confident_share(clf, fast), confident_share(clf, ref)
    assert confident_share(clf, noise) < 0.5  # and fails random images
    assert share_fast >= 0.8, share_fast
    assert abs(share_fast - share_ref) <= 0.1, (share_fast, share_ref)  # the same model, within noise


@pytest.mark.slow
def test_cli_sample_default_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ddpm_fast", "sample", "--num-images", "16", "--steps", "50",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "samples.npz").exists()
