"""The VAE level of the latent hierarchy: the decoder likelihood, the VAE loss, the cached posteriors and the fresh
z_0 per step, the scaling factor, loading (and refusing) VAEs, and hvae-train-vae end to end on tiny models."""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DModel, VQModel

from hvae_diffusion.elbo import discretized_gaussian_log_likelihood
from hvae_diffusion.latent_elbo import gaussian_entropy
from hvae_diffusion.training.latents import (
    LatentDataset,
    LatentDiffusionLoss,
    draw_latents,
    latent_elbo_report,
    latent_scaling,
    load_vae,
)
from hvae_diffusion.training.losses import BatchRandomness
from hvae_diffusion.training.vae import (
    VAELoss,
    VAEWithLikelihood,
    decoder_log_likelihood,
    decoder_log_scale_of,
    fit_decoder_log_scale,
    posterior_prior_kl,
)


def _tiny_vae(channels=1, resolution=8):
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 8],
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=4,
        sample_size=resolution,
    )


def _pixels(num_samples, channels=1, resolution=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_samples, channels, resolution, resolution), generator=generator) / 127.5 - 1


def test_decoder_likelihood_sums_to_one_over_the_256_bins_with_a_scale_per_channel():
    """Two channels with different means and learned scales: the probabilities of all 256 × 256 pixel pairs sum to
    one, and each channel uses its own scale."""
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    pairs = torch.cartesian_prod(levels, levels).reshape(-1, 2, 1, 1)
    mean = torch.tensor([0.13, -0.71], dtype=torch.float64).reshape(1, 2, 1, 1).expand_as(pairs)
    log_scale = torch.tensor([math.log(0.05), math.log(0.4)], dtype=torch.float64)
    log_probability = decoder_log_likelihood(pairs, mean, log_scale)
    assert float(torch.logsumexp(log_probability, 0).exp()) == pytest.approx(1.0, abs=1e-9)
    per_channel = sum(
        discretized_gaussian_log_likelihood(pairs[:, c : c + 1], mean[:, c : c + 1], log_scale[c]) for c in range(2)
    )
    torch.testing.assert_close(log_probability, per_channel)
    with pytest.raises(ValueError, match="decoder_log_scale has 3 values"):
        decoder_log_likelihood(pairs, mean, torch.zeros(3))


def test_posterior_prior_kl_is_the_gaussian_kl():
    mean = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    log_variance = 0.5 * mean.flip(0)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * log_variance))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(
        posterior_prior_kl(mean, log_variance), torch.distributions.kl_divergence(q, p).sum((1, 2, 3))
    )


def test_vae_loss_is_the_weighted_negative_elbo_per_dim_and_trains_the_scale():
    model = VAEWithLikelihood.from_vae(_tiny_vae())
    pixels = _pixels(4)
    loss, parts = VAELoss(kl_weight=0.5)(model, {"sample": pixels}, torch.Generator().manual_seed(3))
    posterior = model.vae.encode(pixels).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    decoded = model.vae.decode(posterior.mean + posterior.std * noise).sample
    reconstruction = -decoder_log_likelihood(pixels, decoded, model.log_scale)
    kl = posterior_prior_kl(posterior.mean, posterior.logvar)
    torch.testing.assert_close(loss, ((reconstruction + 0.5 * kl) / 64).mean())
    torch.testing.assert_close(parts["kl_bits_per_dim"], (kl / (64 * math.log(2))).mean().detach())
    loss.backward()
    assert model.log_scale.grad is not None and float(model.log_scale.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="--kl_weight"):
        VAELoss(kl_weight=-1.0)


class _NoisyIdentityVAE:
    """A stand-in VAE: z_0 = x exactly, and the decoder adds Gaussian noise of a known std per channel."""

    def __init__(self, noise_stds):
        self.noise_stds = torch.tensor(noise_stds).reshape(1, -1, 1, 1)
        self.generator = torch.Generator().manual_seed(7)

    def encode(self, samples):
        posterior = SimpleNamespace(mean=samples, std=torch.zeros_like(samples), logvar=torch.zeros_like(samples))
        return SimpleNamespace(latent_dist=posterior)

    def decode(self, latents):
        noise = torch.randn(latents.shape, generator=self.generator)
        return SimpleNamespace(sample=latents + self.noise_stds * noise)


def test_fitted_decoder_log_scale_is_the_maximum_likelihood_scale():
    """Decoder errors of std 0.05 and 0.2 (wide against the 2/255 bins): the fitted log σ is theirs, per channel."""
    pixels = torch.randint(64, 192, (400, 2, 4, 4), generator=torch.Generator().manual_seed(0)) / 127.5 - 1
    fitted = fit_decoder_log_scale(_NoisyIdentityVAE([0.05, 0.2]), pixels, generator=torch.Generator())
    torch.testing.assert_close(fitted, torch.tensor([math.log(0.05), math.log(0.2)]), atol=0.06, rtol=0)


def test_log_scale_and_scaling_factor_save_and_load_with_the_vae_folder(tmp_path):
    model = VAEWithLikelihood.from_vae(_tiny_vae(), initial_log_scale=-1.25)
    with torch.no_grad():
        model.log_scale.fill_(-2.5)
    model.export_vae(scaling_factor=0.75, shift_factor=0.1).save_pretrained(tmp_path / "vae")
    loaded = load_vae(str(tmp_path / "vae"))
    assert decoder_log_scale_of(loaded).tolist() == [-2.5]
    assert (loaded.config.scaling_factor, loaded.config.shift_factor) == (0.75, 0.1)
    assert VAEWithLikelihood.from_vae(loaded).log_scale.tolist() == [-2.5]  # fine-tuning resumes from it
    with pytest.raises(ValueError, match="decoder_log_scale"):
        decoder_log_scale_of(_tiny_vae())


def test_load_vae_refuses_what_is_not_a_continuous_vae(tmp_path):
    with pytest.raises(ValueError, match="--vae_dir=.*is not a VAE"):
        load_vae(str(tmp_path))
    UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=4,
    ).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="is not a VAE"):
        load_vae(str(tmp_path / "unet"))
    VQModel(block_out_channels=(8,), norm_num_groups=4, num_vq_embeddings=8).save_pretrained(tmp_path / "vq")
    with pytest.raises(ValueError, match="--vae_dir: a VQModel has no continuous posterior"):
        load_vae(str(tmp_path / "vq"))
    tiny = AutoencoderTiny(
        encoder_block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        num_encoder_blocks=(1,),
        num_decoder_blocks=(1,),
    )
    with pytest.raises(ValueError, match="AutoencoderTiny has no continuous posterior .*deterministic"):
        latent_elbo_report(tiny, lambda latents: latents.sum((1, 2, 3)), _pixels(2, channels=3))


def test_latent_scaling_is_the_std_and_mean_of_posterior_draws():
    generator = torch.Generator().manual_seed(4)
    means = 0.7 + 2.0 * torch.randn(50, 2, 3, 3, generator=generator)
    stds = 0.3 + torch.rand(50, 2, 3, 3, generator=generator)
    scaling_factor, shift_factor = latent_scaling(means, stds)
    draws = means + stds * torch.randn(400, *means.shape, generator=generator)
    assert scaling_factor == pytest.approx(1 / float(draws.std()), rel=5e-3)
    assert shift_factor == pytest.approx(float(draws.mean()), abs=5e-3)


def test_each_step_draws_a_fresh_scaled_latent_from_the_cached_posterior():
    """Repeated draws of one item have mean (μ − shift)·s and std σ·s: never the mean alone."""
    means = torch.tensor([[[[0.5]], [[-1.0]]]])
    stds = torch.tensor([[[[0.2]], [[0.6]]]])
    dataset = LatentDataset(means, stds, labels=[3])
    item = dataset[0]
    assert item["class_labels"] == 3 and item["sample"].shape == (4, 1, 1)
    parameters = item["sample"].expand(20000, -1, -1, -1)
    latents = draw_latents(parameters, torch.Generator().manual_seed(0), scaling_factor=2.0, shift_factor=0.1)
    torch.testing.assert_close(latents.mean(0).flatten(), torch.tensor([0.8, -2.2]), atol=0.03, rtol=0)
    torch.testing.assert_close(latents.std(0).flatten(), torch.tensor([0.4, 1.2]), atol=0.03, rtol=0)


def test_dataset_is_encoded_once_into_each_images_posterior():
    vae = _tiny_vae()
    pixels = _pixels(5)
    dataset = LatentDataset.encode(vae, [{"sample": p, "class_labels": i} for i, p in enumerate(pixels)], batch_size=2)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    torch.testing.assert_close(dataset.means, posterior.mean)
    torch.testing.assert_close(dataset.stds, posterior.std)
    assert len(dataset) == 5 and [dataset[i]["class_labels"] for i in range(5)] == [0, 1, 2, 3, 4]


def test_latent_diffusion_loss_feeds_the_drawn_latents_and_is_reproducible():
    seen = []

    def diffusion_loss(model, batch, randomness, encode_prompt=None):
        seen.append(batch["sample"])
        return batch["sample"].sum(), {}

    dataset = LatentDataset(torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2))
    batch = {"sample": torch.stack([dataset[0]["sample"], dataset[1]["sample"]])}
    loss_fn = LatentDiffusionLoss(diffusion_loss, scaling_factor=0.5)
    for seed in (0, 0, 1):
        loss_fn(None, batch, BatchRandomness(torch.Generator().manual_seed(seed)))
    assert seen[0].shape == (2, 1, 2, 2)
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])
    expected = 0.5 * torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen[0], expected)


def test_latent_elbo_report_parts_add_up(tmp_path):
    """bits/dim = reconstruction + latent prior − entropy, with the encoder's entropy exact."""
    model = VAEWithLikelihood.from_vae(_tiny_vae())
    vae = model.export_vae(scaling_factor=0.5, shift_factor=0.0)
    pixels = _pixels(6)

    def standard_normal_elbo(latents):
        return -0.5 * (latents**2 + math.log(2 * math.pi)).flatten(1).sum(1)

    report = latent_elbo_report(vae, standard_normal_elbo, pixels, batch_size=4, generator=torch.Generator())
    assert report["bits_per_dim"] == pytest.approx(
        report["reconstruction"] + report["latent_prior"] - report["entropy"], rel=1e-6
    )
    with torch.no_grad():
        expected_entropy = gaussian_entropy(vae.encode(pixels).latent_dist.logvar).mean() / (64 * math.log(2))
    assert report["entropy"] == pytest.approx(float(expected_entropy), rel=1e-5)
    assert report["num_samples"] == 6 and report["standard_error"] > 0


def _run_train_vae(output_dir, *extra):
    from hvae_diffusion.commands.train_vae import main

    return main(
        [
            "--output_dir",
            str(output_dir),
            "--block_out_channels",
            "8",
            "8",
            "--norm_num_groups",
            "4",
            "--latent_channels",
            "2",
            "--train_batch_size",
            "16",
            "--report_to",
            "none",
            "--eval_num_samples",
            "16",
            "--lr_scheduler",
            "constant",
            *extra,
        ]
    )


def _weights(folder):
    return AutoencoderKL.from_pretrained(folder).state_dict()


def test_train_vae_saves_a_loadable_vae_and_resumes_exactly(tmp_path, single_thread):
    """4 steps in one go equal 2 steps, a checkpoint, and a resumed run to step 4; with EMA."""
    common = ["--use_ema", "--checkpointing_steps", "2"]
    _run_train_vae(tmp_path / "full", "--max_train_steps", "4", *common)
    _run_train_vae(tmp_path / "split", "--max_train_steps", "2", *common)
    result = _run_train_vae(
        tmp_path / "split", "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common
    )
    assert result.global_step == 4
    full, split = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    for name in full:
        torch.testing.assert_close(full[name], split[name], rtol=0, atol=0)
    summary = json.loads((tmp_path / "full" / "training_summary.json").read_text())
    vae = load_vae(str(tmp_path / "full"))
    assert vae.config.scaling_factor == summary["scaling_factor"] > 0
    assert decoder_log_scale_of(vae).tolist() == pytest.approx(summary["decoder_log_scale"])
    assert summary["test_bits_per_dim"] == pytest.approx(
        summary["test_reconstruction_bits_per_dim"] + summary["test_kl_bits_per_dim"]
    )
    assert os.path.isfile(tmp_path / "full" / "README.md")


def test_train_vae_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--resolution=10 must be a multiple"):
        _run_train_vae(tmp_path, "--resolution", "10", "--block_out_channels", "8", "8", "8", "--max_train_steps", "1")
    with pytest.raises(ValueError, match="--block_out_channels"):
        _run_train_vae(tmp_path, "--block_out_channels", "6", "8", "--max_train_steps", "1")
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path=.*is not a VAE"):
        _run_train_vae(tmp_path, "--pretrained_model_name_or_path", str(tmp_path), "--max_train_steps", "1")
