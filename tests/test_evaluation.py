"""hvae-evaluate's measures: the noisy classifier's accuracy and calibration against t, and its flag checks."""

import json

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
