"""hvae-evaluate's measures: the noisy classifier's accuracy and calibration against t, the Fréchet distance and KID
against closed forms and hand computations, and its flag checks."""

import json

import numpy as np
import pytest
import torch

from hvae_diffusion import HVAEScheduler
from hvae_diffusion.commands import evaluate
from hvae_diffusion.testing import ExactMixtureClassifier
from hvae_diffusion.training.evaluation import (
    expected_calibration_error,
    noisy_classifier_calibration,
    save_feature_classifier,
)


def test_expected_calibration_error_of_a_hand_worked_case():
    # two samples at confidence 0.9 (one right: accuracy 0.5), two at 0.6 (both right: accuracy 1.0)
    probabilities = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    # ECE = ½ |0.5 − 0.9| + ½ |1.0 − 0.6|
    assert expected_calibration_error(probabilities, labels, num_bins=10) == pytest.approx(0.4)


class Overconfident(torch.nn.Module):
    """The exact classifier with its logits tripled: the same argmax, so the same accuracy, but overconfident."""

    def __init__(self, exact):
        super().__init__()
        self.exact = exact

    def forward(self, sample, timestep):
        return 3 * self.exact(sample, timestep)


def test_the_exact_noisy_classifier_is_calibrated_at_every_t_and_loses_accuracy_with_noise():
    scheduler = HVAEScheduler(num_train_timesteps=100)
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    exact = ExactMixtureClassifier(means.tolist(), stds=0.4, alphas_cumprod=scheduler.alphas_cumprod.tolist())
    samples, labels = exact.mixture.sample(6000, generator=torch.Generator().manual_seed(0))

    def calibration(classifier):
        return noisy_classifier_calibration(
            classifier, scheduler, samples, labels, num_bands=4, generator=torch.Generator().manual_seed(1)
        )

    bands = calibration(exact)
    assert [band["timesteps"] for band in bands] == [[0, 25], [25, 50], [50, 75], [75, 100]]
    accuracies = [band["accuracy"] for band in bands]
    assert accuracies[0] > 0.9 and accuracies[-1] < 0.75 and accuracies == sorted(accuracies, reverse=True)
    # calibrated: the mean confidence is the accuracy, and the ECE is small (binning and sampling noise only)
    for band in bands:
        assert band["expected_calibration_error"] < 0.03, band
        assert band["mean_confidence"] == pytest.approx(band["accuracy"], abs=0.03)
    overconfident = calibration(Overconfident(exact))
    assert [band["accuracy"] for band in overconfident] == accuracies
    assert all(band["expected_calibration_error"] > 0.05 for band in overconfident[1:])


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--bpd_estimator", "stratified", "--bpd_nfe", "2"], "--bpd_nfe must be >= 3 for --bpd_estimator stratified"),
        (["--bpd_nfe", "1"], "--bpd_nfe must be >= 2 for --bpd_estimator importance"),
        (["--bpd_num_samples", "0"], "--bpd_num_samples must be >= 1"),
        (["--calibration_bands", "0"], "--calibration_bands must be >= 1"),
        (["--guidance_scales", "-1"], "--guidance_scales must be a finite number >= 0, got -1"),
        (["--guidance_scales", "1", "nan"], "--guidance_scales must be a finite number >= 0, got nan"),
        (["--num_inference_steps", "0"], "--num_inference_steps must be >= 1"),
        (["--inception_weights", "missing.pt"], "--inception_weights='missing.pt': no such file"),
        (["--num_classes", "0"], "--num_classes must be >= 1"),
        ([], "--pipeline_dir='.*missing': no such folder"),
        (["--num_threads", "-2"], "--num_threads must be an integer >= 0"),
    ],
)
def test_evaluate_refuses_bad_flags_before_any_work(tmp_path, flags, match):
    output_dir = tmp_path / "eval"
    with pytest.raises(ValueError, match=match):
        evaluate.main(["--pipeline_dir", str(tmp_path / "missing"), "--output_dir", str(output_dir), *flags])
    assert not output_dir.exists()


def test_the_cached_feature_classifier_is_safetensors_and_loads_back_the_same(tmp_path):
    from safetensors import safe_open

    from hvae_diffusion.training.evaluation import FeatureClassifier, load_or_train_feature_classifier

    model = FeatureClassifier(1, 10, 8).eval()
    path = tmp_path / "judge" / "feature_classifier.safetensors"
    save_feature_classifier(model, path)
    with safe_open(path, framework="pt") as handle:  # raises on anything but a safetensors file
        assert json.loads(handle.metadata()["config"]) == model.config
    loaded = load_or_train_feature_classifier(path, None, None, 10)  # cached: no data needed
    images = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- Fréchet distance, KID


def test_frechet_distance_of_a_scaled_copy_is_the_closed_form():
    """b = c·a + s: Σ_b = c² Σ_a commutes with Σ_a, so tr((Σ_a Σ_b)^{1/2}) = c tr(Σ_a) and
    d² = ‖μ_a − μ_b‖² + (1 − c)² tr(Σ_a), exactly."""
    from hvae_diffusion.training.evaluation import frechet_distance

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=generator, dtype=torch.float64) @ torch.randn(6, 6, generator=generator).double()
    c, shift = 1.7, torch.linspace(-1, 1, 6, dtype=torch.float64)
    b = c * a + shift
    expected = float((a.mean(0) - b.mean(0)).square().sum() + (1 - c) ** 2 * torch.cov(a.T).trace())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_agrees_with_scipy_where_sqrtm_is_well_conditioned_and_is_exact_where_it_is_not():
    """Full-rank covariances: the same number as pytorch-fid's scipy.linalg.sqrtm(Σ_a Σ_b). Rank-deficient ones
    (dead ReLU units, fewer samples than features), where the old ridge + sqrtm(...).real was off: the exact value
    from an independent route, tr((Σ_a Σ_b)^{1/2}) = ‖A Bᵀ‖_* (nuclear norm) for Σ_a = AᵀA, Σ_b = BᵀB with A, B the
    centred features / √(N − 1)."""
    from scipy import linalg

    from hvae_diffusion.training.evaluation import frechet_distance

    generator = torch.Generator().manual_seed(1)
    a = torch.randn(400, 5, generator=generator, dtype=torch.float64)
    b = torch.randn(300, 5, generator=generator, dtype=torch.float64) * 1.5 + 0.3
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    scipy_value = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(
        cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real
    )
    assert frechet_distance(a, b) == pytest.approx(scipy_value, rel=1e-8)

    def dead_relu_features():
        features = torch.relu(torch.randn(20, 64, generator=generator, dtype=torch.float64))
        features[:, :10] = 0
        return features

    x, y = dead_relu_features(), dead_relu_features()
    root_x, root_y = (x - x.mean(0)) / (len(x) - 1) ** 0.5, (y - y.mean(0)) / (len(y) - 1) ** 0.5
    trace_sqrt = torch.linalg.svdvals(root_x @ root_y.T).sum()
    expected = (x.mean(0) - y.mean(0)).square().sum() + torch.cov(x.T).trace() + torch.cov(y.T).trace()
    # the old code was 4e-5 off here
    assert frechet_distance(x, y) == pytest.approx(float(expected - 2 * trace_sqrt), rel=1e-7)
    with pytest.raises(ValueError, match="not finite"):
        frechet_distance(torch.full((5, 3), float("nan")), a[:5, :3])


def test_kid_is_the_unbiased_mmd_of_the_paper_computed_by_hand():
    """The polynomial-kernel MMD² U-statistic, written out with loops on 2 subsets of 3 points in 2-D."""
    from hvae_diffusion.training.evaluation import kernel_inception_distance

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    y = torch.randn(7, 2, generator=generator, dtype=torch.float64) + 0.5
    result = kernel_inception_distance(x, y, num_subsets=2, generator=torch.Generator().manual_seed(5))
    order = torch.Generator().manual_seed(5)
    order_x, order_y = torch.randperm(6, generator=order), torch.randperm(7, generator=order)

    def k(u, v):
        return (float(u @ v) / 2 + 1) ** 3

    estimates = []
    for i in range(2):
        xs, ys = x[order_x[3 * i : 3 * i + 3]], y[order_y[3 * i : 3 * i + 3]]
        same = sum(k(xs[p], xs[q]) + k(ys[p], ys[q]) for p in range(3) for q in range(3) if p != q) / 6
        cross = sum(k(xs[p], ys[q]) for p in range(3) for q in range(3)) / 9
        estimates.append(same - 2 * cross)
    assert result["num_subsets"] == 2 and result["subset_size"] == 3
    assert result["kid"] == pytest.approx(np.mean(estimates), rel=1e-12)
    assert result["standard_error"] == pytest.approx(np.std(estimates, ddof=1) / np.sqrt(2), rel=1e-12)


def test_kid_is_unbiased_at_small_sample_sizes_and_its_standard_error_covers_its_spread():
    """Two sets from one distribution, 40 points each: KID averages to 0 (the biased V-statistic would not), and
    the reported standard error matches the spread of KID over repetitions."""
    from hvae_diffusion.training.evaluation import kernel_inception_distance

    generator = torch.Generator().manual_seed(3)
    results = [
        kernel_inception_distance(
            torch.randn(40, 4, generator=generator, dtype=torch.float64),
            torch.randn(40, 4, generator=generator, dtype=torch.float64),
            generator=generator,
        )
        for _ in range(400)
    ]
    values = np.array([r["kid"] for r in results])
    spread = values.std(ddof=1)
    assert abs(values.mean()) < 4 * spread / np.sqrt(len(values))
    assert np.mean([r["standard_error"] for r in results]) == pytest.approx(spread, rel=0.2)


def test_inception_features_come_from_a_local_torchscript_file(tmp_path):
    """The FID path takes uint8 RGB images and the detector's return_features, as StyleGAN's metric code does;
    here a stand-in module with that signature (no Inception weights ship with the tests)."""
    from hvae_diffusion.training.evaluation import InceptionFeatures

    class Detector(torch.nn.Module):
        def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert images.dtype == torch.uint8 and images.shape[1] == 3
            return images.float().mean(dim=(2, 3))

    path = tmp_path / "detector.pt"
    torch.jit.save(torch.jit.script(Detector()), str(path))
    samples = torch.linspace(-1, 1, 2 * 4 * 4).view(2, 1, 4, 4)
    features = InceptionFeatures(str(path), batch_size=1).features(samples)
    expected = ((samples + 1) * 127.5).round().mean(dim=(1, 2, 3)).double()
    assert torch.allclose(features, expected[:, None].expand(2, 3))
    with pytest.raises(ValueError, match="no such file"):
        InceptionFeatures(str(tmp_path / "missing.pt"))
