"""The programs on latents: hvae-train --vae_dir (encode once, a fresh z_0 per step, the scaling saved with the
pipeline), hvae-train-classifier --vae_dir, hvae-evaluate's latent report, and their bad inputs, on tiny models
trained on the built-in digits at 16×16 (8×8×2 latents)."""

import json
import math

import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DModel, VQModel

from hvae_diffusion.commands import demo, evaluate, train, train_classifier
from hvae_diffusion.training.cli import load_training_data
from hvae_diffusion.training.data import stack_dataset
from hvae_diffusion.training.evaluation import FeatureClassifier, save_feature_classifier
from hvae_diffusion.training.latents import LatentDiffusionLoss, encode_posteriors

RESOLUTION = 16  # two VAE blocks: latents of 8×8
LATENT_CHANNELS = 2


def _unet_config(in_channels=LATENT_CHANNELS):
    return {
        "_class_name": "UNet2DModel",
        "sample_size": RESOLUTION // 2,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "num_class_embeds": 11,
    }


def _save_vae(folder):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 8],
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=RESOLUTION,
    )
    vae.register_to_config(decoder_log_scale=[math.log(0.2)])
    vae.save_pretrained(folder)
    return str(folder)


def _train_argv(output_dir, vae_dir, unet_config_file, *extra):
    return [
        *["--output_dir", str(output_dir), "--vae_dir", vae_dir, "--unet_config", str(unet_config_file)],
        *["--resolution", str(RESOLUTION), "--conditioning", "class", "--cond_drop_prob", "0.2"],
        *["--num_train_timesteps", "10", "--max_train_steps", "3", "--train_batch_size", "8"],
        *["--num_inference_steps", "2", "--elbo_timesteps", "3", "--elbo_num_samples", "6", "--report_to", "none"],
        *extra,
    ]


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """One tiny latent training run, recording what the loss of each step received and what it fed the denoiser."""
    root = tmp_path_factory.mktemp("latent")
    vae_dir = _save_vae(root / "vae")
    unet_config_file = root / "unet_config.json"
    unet_config_file.write_text(json.dumps(_unet_config()))
    steps = []

    class RecordingLoss(LatentDiffusionLoss):
        def __call__(self, model, batch, randomness=None, encode_prompt=None):
            inner = self.diffusion_loss

            def recording_inner(model, latent_batch, randomness, encode_prompt=None):
                steps.append({"posterior": batch["sample"].clone(), "latents": latent_batch["sample"].clone()})
                return inner(model, latent_batch, randomness, encode_prompt=encode_prompt)

            self.diffusion_loss = recording_inner
            try:
                return super().__call__(model, batch, randomness, encode_prompt)
            finally:
                self.diffusion_loss = inner

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "LatentDiffusionLoss", RecordingLoss)
        train.run(train.parse_args(_train_argv(root / "denoiser", vae_dir, unet_config_file)))
    return {"root": root, "vae_dir": vae_dir, "unet_config": unet_config_file, "steps": steps}


def _digits_train_samples():
    args = train.parse_args(["--output_dir", "unused", "--resolution", str(RESOLUTION)])
    return stack_dataset(load_training_data(args, need_labels=True)[0])[0]


def test_scaling_factor_is_computed_from_the_training_latents_and_saved_with_the_pipeline(latent_run):
    """s and the shift in the saved pipeline's vae/config.json are 1/std and the mean of z_0 ~ q(z_0 | x) over the
    training images, checked against 16 Monte Carlo draws per latent."""
    pipe = DiffusionPipeline.from_pretrained(latent_run["root"] / "denoiser")
    vae = pipe.vae
    means, stds = encode_posteriors(vae, _digits_train_samples())
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([means + stds * torch.randn(means.shape, generator=generator) for _ in range(16)]).double()
    assert vae.config.scaling_factor == pytest.approx(float(1 / draws.std()), rel=5e-3)
    assert vae.config.shift_factor == pytest.approx(float(draws.mean()), abs=5e-3 * float(draws.std()))
    assert vae.config.scaling_factor != pytest.approx(AutoencoderKL().config.scaling_factor, rel=0.05)


def test_each_step_feeds_the_denoiser_a_fresh_draw_of_z0_never_the_posterior_mean(latent_run):
    """The loss receives each image's cached (μ, σ) and passes y = (μ + σ ε − shift)·s on: ε recovered from y is
    standard normal and different at every step."""
    vae = AutoencoderKL.from_pretrained(latent_run["root"] / "denoiser" / "vae")
    scaling, shift = vae.config.scaling_factor, vae.config.shift_factor
    assert len(latent_run["steps"]) == 3
    noises = []
    for step in latent_run["steps"]:
        assert step["posterior"].shape == (8, 2 * LATENT_CHANNELS, RESOLUTION // 2, RESOLUTION // 2)
        assert step["latents"].shape == (8, LATENT_CHANNELS, RESOLUTION // 2, RESOLUTION // 2)
        mean, std = step["posterior"].chunk(2, dim=1)
        noise = (step["latents"] / scaling + shift - mean) / std
        assert float(noise.abs().min()) < 0.05 and float(noise.abs().max()) > 1.5  # a draw, not μ (ε = 0)
        assert float(noise.mean()) == pytest.approx(0.0, abs=0.15)
        assert float(noise.std()) == pytest.approx(1.0, abs=0.15)
        noises.append(noise)
    assert not torch.allclose(noises[0], noises[1])


def test_latent_pipeline_round_trip_samples_decoded_images(latent_run):
    """The saved folder loads as a ClassifierFreeGuidancePipeline with its VAE; its images are the VAE's decoding
    of its latents, unscaled with the saved s and shift."""
    pipe = DiffusionPipeline.from_pretrained(latent_run["root"] / "denoiser")
    assert type(pipe).__name__ == "ClassifierFreeGuidancePipeline"
    kwargs = {"class_labels": [0, 7], "guidance_scale": 2.0, "num_inference_steps": 2}
    latents = pipe(**kwargs, generator=torch.Generator().manual_seed(3), output_type="latent").images
    images = pipe(**kwargs, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert latents.shape == (2, LATENT_CHANNELS, RESOLUTION // 2, RESOLUTION // 2)
    assert images.shape == (2, 1, RESOLUTION, RESOLUTION)
    config = pipe.vae.config
    decoded = pipe.vae.decode(latents / config.scaling_factor + config.shift_factor).sample
    torch.testing.assert_close(images, (decoded / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)
    summary = json.loads((latent_run["root"] / "denoiser" / "training_summary.json").read_text())
    assert math.isfinite(summary["test_bits_per_dim"]) and summary["test_bits_per_dim_standard_error"] > 0


def test_noisy_classifier_trains_on_the_latents_of_the_denoisers_vae(latent_run):
    output_dir = latent_run["root"] / "guided"
    train_classifier.main(
        [
            *["--output_dir", str(output_dir), "--denoiser_dir", str(latent_run["root"] / "denoiser")],
            *["--resolution", str(RESOLUTION), "--max_train_steps", "2", "--train_batch_size", "8"],
            *["--checkpointing_steps", "0", "--report_to", "none", "--num_timestep_bands", "2"],
        ]
    )
    pipe = DiffusionPipeline.from_pretrained(output_dir)
    assert type(pipe).__name__ == "ClassifierGuidedPipeline"
    assert pipe.classifier.config.in_channels == LATENT_CHANNELS
    assert pipe.classifier.config.sample_size == RESOLUTION // 2
    assert pipe.vae.config.scaling_factor == pytest.approx(
        AutoencoderKL.load_config(latent_run["root"] / "denoiser" / "vae")["scaling_factor"]
    )
    images = pipe(class_labels=[1, 2], guidance_scale=1.0, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, RESOLUTION, RESOLUTION)
    bands = json.loads((output_dir / "classifier_accuracy.json").read_text())["accuracy_by_timestep"]
    assert len(bands) == 2


def test_evaluate_reports_the_latent_bound_in_pixels_beside_another_pipeline(latent_run):
    """The latent report's keys, its parts adding up, the entropy equal to the encoder's exact Gaussian entropy, and
    the latent prior equal to the diffusion's bound moved to z_0 by the change of variables D_z log s."""
    output_dir = latent_run["root"] / "evaluation"
    output_dir.mkdir()
    untrained = FeatureClassifier(1, 10, RESOLUTION)  # cached: the test needs no trained feature classifier
    save_feature_classifier(untrained, output_dir / "feature_classifier.safetensors")
    pipeline_dir = str(latent_run["root"] / "denoiser")
    report = evaluate.main(
        [
            *["--pipeline_dir", pipeline_dir, "--output_dir", str(output_dir), "--overwrite_output_dir"],
            *["--compare_pipeline_dir", pipeline_dir, "--bpd_estimator", "full", "--bpd_num_samples", "6"],
            *["--num_inference_steps", "2", "--guidance_scales", "2", "--num_samples_per_class", "1"],
            *["--num_unconditional_samples", "2"],
        ]
    )
    elbo = report["elbo"]
    for key in ("bits_per_dim", "standard_error", "reconstruction", "latent_prior", "entropy"):
        assert math.isfinite(elbo[key])
    assert elbo["bits_per_dim"] == pytest.approx(elbo["reconstruction"] + elbo["latent_prior"] - elbo["entropy"])
    assert elbo["bits_per_image"] == pytest.approx(elbo["bits_per_dim"] * RESOLUTION**2)
    vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")
    args = train.parse_args(["--output_dir", "unused", "--resolution", str(RESOLUTION)])
    test_samples = stack_dataset(load_training_data(args, need_labels=True)[1])[0][:6]
    num_dims, num_latent_dims = RESOLUTION**2, LATENT_CHANNELS * (RESOLUTION // 2) ** 2
    log_variance = vae.encode(test_samples).latent_dist.logvar.detach().double()
    entropy_nats = 0.5 * (math.log(2 * math.pi) + 1 + log_variance).flatten(1).sum(1)
    assert elbo["entropy"] == pytest.approx(float(entropy_nats.mean()) / (num_dims * math.log(2)), rel=1e-5)
    moved = elbo["diffusion_bits_per_latent_dim"] * num_latent_dims - num_latent_dims * math.log2(
        vae.config.scaling_factor
    )
    assert elbo["latent_prior"] * num_dims == pytest.approx(moved, rel=1e-6)
    # the same pipeline compared with itself: the same bound from the same seed
    assert report["compare"]["bits_per_dim"] == pytest.approx(elbo["bits_per_dim"], rel=1e-6)
    assert report["compare"]["resolution"] == RESOLUTION
    assert set(report["cfg"]["2"]) == {
        "num_samples",
        "frechet_distance",
        "kid",
        "kid_standard_error",
        "guided_accuracy",
    }


def _refuses_before_any_work(monkeypatch, argv, match):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the bad input was refused")

    monkeypatch.setattr(train, "load_training_data", no_data)
    with pytest.raises(ValueError, match=match):
        train.run(train.parse_args(argv))


def test_bad_latent_inputs_are_refused_before_any_work(tmp_path, monkeypatch):
    vae_dir = _save_vae(tmp_path / "vae")
    good_config = tmp_path / "unet.json"
    good_config.write_text(json.dumps(_unet_config()))
    UNet2DModel(**{k: v for k, v in _unet_config().items() if k != "_class_name"}).save_pretrained(tmp_path / "unet")
    VQModel(block_out_channels=(8,), norm_num_groups=4, num_vq_embeddings=8).save_pretrained(tmp_path / "vq")
    wrong_config = tmp_path / "wrong.json"
    wrong_config.write_text(json.dumps(_unet_config(in_channels=3)))
    out = tmp_path / "out"

    _refuses_before_any_work(
        monkeypatch, _train_argv(out, str(tmp_path / "unet"), good_config), r"--vae_dir=.*is not a VAE"
    )
    _refuses_before_any_work(
        monkeypatch, _train_argv(out, str(tmp_path / "vq"), good_config), "VQModel has no continuous posterior"
    )
    _refuses_before_any_work(
        monkeypatch,
        _train_argv(out, vae_dir, wrong_config),
        "latent_channels=2 must equal the denoiser config's in_channels=3",
    )
    _refuses_before_any_work(
        monkeypatch,
        [*_train_argv(out, vae_dir, good_config), "--resolution", "15"],
        "downsamples by 2, which does not divide --resolution=15",
    )
    assert not out.exists()


def test_quick_latent_demo_end_to_end(tmp_path, single_thread):
    """``hvae-demo --latent --quick``: a VAE, then a denoiser, a noisy classifier and their samples on its latents,
    and the latent report (a cached untrained feature classifier keeps it short)."""
    output_dir = tmp_path / "demo-latent"
    (output_dir / "evaluation").mkdir(parents=True)
    untrained = FeatureClassifier(1, 10, 32)
    save_feature_classifier(untrained, output_dir / "evaluation" / "feature_classifier.safetensors")
    summary = demo.main(["--latent", "--quick", "--output_dir", str(output_dir), "--overwrite_output_dir"])
    assert summary["bits_per_dim"] == pytest.approx(
        sum(summary["bits_per_dim_parts"][name] for name in ("reconstruction", "latent_prior"))
        - summary["bits_per_dim_parts"]["entropy"]
    )
    assert math.isfinite(summary["diffusion_bits_per_latent_dim"])
    assert summary["vae_bits_per_dim_with_standard_normal_prior"] > 0
    assert set(summary["wall_time_seconds"]) >= {"train VAE", "train denoiser", "evaluate", "total"}
    for folder in ("denoiser", "classifier_guided"):
        vae_config = json.loads((output_dir / folder / "vae" / "config.json").read_text())
        assert vae_config["latent_channels"] == 4 and len(vae_config["block_out_channels"]) == 3  # 32×32 → 8×8×4
    for grid in ("samples_unconditional.png", "samples_cfg.png", "samples_classifier_guided.png"):
        assert (output_dir / grid).is_file()


def test_evaluate_refuses_a_vq_model_before_the_bound(tmp_path):
    """A pipeline decoding with a VQModel has no continuous posterior, so there is no bound to report."""
    from hvae_diffusion import HVAEPipeline, HVAEScheduler

    vq = VQModel(block_out_channels=(8,), norm_num_groups=4, num_vq_embeddings=8, sample_size=8)
    config = {k: v for k, v in _unet_config(in_channels=vq.config.latent_channels).items() if k != "_class_name"}
    unet = UNet2DModel(**{**config, "num_class_embeds": None})
    HVAEPipeline(unet=unet, scheduler=HVAEScheduler(num_train_timesteps=10), vae=vq).save_pretrained(tmp_path / "vq")
    with pytest.raises(ValueError, match="--pipeline_dir: a VQModel has no continuous posterior .*codebook"):
        evaluate.main(
            ["--pipeline_dir", str(tmp_path / "vq"), "--output_dir", str(tmp_path / "evaluation")]
            + ["--num_inference_steps", "5", "--bpd_nfe", "5"]  # within its 10 timesteps: the VQ check is what refuses
        )
