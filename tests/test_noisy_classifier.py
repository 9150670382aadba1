"""NoisyClassifier: a Diffusers model of p(y | x_t, t) built from UNet down blocks."""

import json
import os

import pytest
import torch

from hvae_diffusion import HVAEScheduler, NoisyClassifier, NoisyClassifierOutput
from hvae_diffusion.models.noisy_classifier import AttentionPool2d

TINY = dict(sample_size=8, in_channels=1, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4)


@pytest.fixture
def classifier():
    torch.manual_seed(0)
    return NoisyClassifier(**TINY).eval()


def test_output_shape_and_types(classifier, generator):
    sample = torch.randn(5, 1, 8, 8, generator=generator)
    output = classifier(sample, 10)
    assert isinstance(output, NoisyClassifierOutput)
    assert output.logits.shape == (5, 3)
    (logits,) = classifier(sample, 10, return_dict=False)
    torch.testing.assert_close(logits, output.logits)
    assert classifier.num_classes == 3


def test_timestep_scalar_tensor_and_per_sample_agree_and_matter(classifier, generator):
    sample = torch.randn(4, 1, 8, 8, generator=generator)
    with torch.no_grad():
        from_int = classifier(sample, 7).logits
        from_tensor = classifier(sample, torch.tensor(7)).logits
        per_sample = classifier(sample, torch.full((4,), 7)).logits
        other_time = classifier(sample, 700).logits
    torch.testing.assert_close(from_int, from_tensor)
    torch.testing.assert_close(from_int, per_sample)
    assert not torch.allclose(from_int, other_time)


def test_attention_and_mid_block_variant(generator):
    classifier = NoisyClassifier(
        **{**TINY, "down_block_types": ("DownBlock2D", "AttnDownBlock2D")},
        mid_block_type="UNetMidBlock2D",
        attention_head_dim=4,
    )
    assert classifier(torch.randn(2, 1, 8, 8, generator=generator), 3).logits.shape == (2, 3)


def test_save_and_load_round_trip(classifier, tmp_path, generator):
    classifier.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = NoisyClassifier.from_pretrained(tmp_path).eval()
    assert loaded.config.num_classes == 3
    sample = torch.randn(2, 1, 8, 8, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 5).logits, classifier(sample, 5).logits)


def test_attention_pooling_saves_and_loads(tmp_path, generator):
    torch.manual_seed(0)
    classifier = NoisyClassifier(**TINY, pooling="attention", pooling_num_heads=2).eval()
    assert classifier.attention_pool.position_embedding.shape == (4 * 4 + 1, 16)
    classifier.save_pretrained(tmp_path)
    loaded = NoisyClassifier.from_pretrained(tmp_path).eval()
    assert loaded.config.pooling == "attention" and loaded.config.pooling_num_heads == 2
    sample = torch.randn(2, 1, 8, 8, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 5).logits, classifier(sample, 5).logits)


def test_a_folder_saved_before_the_pooling_option_loads_as_mean_pooling(classifier, tmp_path, generator):
    classifier.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("pooling", "pooling_num_heads"):
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = NoisyClassifier.from_pretrained(tmp_path).eval()
    assert loaded.config.pooling == "mean" and loaded.attention_pool is None
    sample = torch.randn(2, 1, 8, 8, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 5).logits, classifier(sample, 5).logits)


def test_attention_pooling_with_blind_queries_is_the_global_average(generator):
    """With zero query/key weights and no position embedding every token gets the same weight, and the tokens are
    the mean feature and the H·W features, so identity value/output maps give back the global average exactly."""
    pool = AttentionPool2d(num_positions=12, channels=8, num_heads=2)
    with torch.no_grad():
        pool.position_embedding.zero_()
        pool.attention.in_proj_weight.copy_(torch.cat([torch.zeros(16, 8), torch.eye(8)]))
        pool.attention.in_proj_bias.zero_()
        pool.attention.out_proj.weight.copy_(torch.eye(8))
        pool.attention.out_proj.bias.zero_()
    hidden = torch.randn(3, 8, 3, 4, generator=generator)
    torch.testing.assert_close(pool(hidden), hidden.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="built for 12 positions"):
        pool(torch.randn(1, 8, 4, 4))


def test_input_gradient_exists(classifier, generator):
    sample = torch.randn(3, 1, 8, 8, generator=generator).requires_grad_(True)
    classifier(sample, 4).logits.log_softmax(-1)[:, 0].sum().backward()
    assert sample.grad is not None and torch.isfinite(sample.grad).all() and sample.grad.abs().sum() > 0


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_learns_a_noisy_labelling(generator, pooling):
    """A few Adam steps on x_t of 'bright vs dark' images (the label is the sign of the mean) cut the loss fourfold."""
    torch.manual_seed(0)
    classifier = NoisyClassifier(**{**TINY, "num_classes": 2}, pooling=pooling)
    scheduler = HVAEScheduler(num_train_timesteps=100)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        labels = torch.randint(0, 2, (16,), generator=generator)
        clean = (2.0 * labels - 1).reshape(-1, 1, 1, 1) * 0.8 + 0.1 * torch.randn(16, 1, 8, 8, generator=generator)
        timesteps = torch.randint(0, 50, (16,), generator=generator)
        noisy = scheduler.add_noise(clean, torch.randn(clean.shape, generator=generator), timesteps)
        loss = torch.nn.functional.cross_entropy(classifier(noisy, timesteps).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < sum(losses[:3]) / 4, losses


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "num_classes must be >= 1"),
        ({"block_out_channels": (8,)}, "same length"),
        ({"mid_block_type": "UNetMidBlock2DCrossAttn"}, "mid_block_type"),
        ({"pooling": "max"}, "pooling must be one of"),
        ({"pooling": "attention", "sample_size": None}, "pooling='attention' needs sample_size"),
        ({"pooling": "attention", "pooling_num_heads": 3}, "pooling_num_heads must be >= 1 and divide"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoisyClassifier(**{**TINY, **kwargs})


def test_wrong_input_shape(classifier):
    with pytest.raises(ValueError, match=r"sample must have shape \[B, 1, H, W\]"):
        classifier(torch.randn(2, 3, 8, 8), 1)


def _encoder_features(model, sample, timesteps, **kwargs):
    """The mid block's output (the end of the encoder half) of a UNet2DModel or a NoisyClassifier."""
    captured = []
    handle = model.mid_block.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        model(sample, timesteps, **kwargs)
    handle.remove()
    return captured[0]


@pytest.mark.parametrize("num_class_embeds", [None, 4])
def test_from_unet_starts_with_the_denoisers_features(generator, num_class_embeds):
    """The copied encoder computes what the UNet's encoder computes for ε(x_t, ∅): the null-label embedding folded
    into the time embedding's bias is exact."""
    from test_pipelines import tiny_unet

    unet = tiny_unet(num_class_embeds=num_class_embeds)
    null = None if num_class_embeds is None else num_class_embeds - 1
    classifier = NoisyClassifier.from_unet(unet, num_classes=3, null_class_label=null).eval()
    sample, timesteps = torch.randn(3, 1, 8, 8, generator=generator), torch.tensor([3, 400, 990])
    kwargs = {} if null is None else {"class_labels": torch.full((3,), null)}
    torch.testing.assert_close(
        _encoder_features(classifier, sample, timesteps), _encoder_features(unet, sample, timesteps, **kwargs)
    )
    assert classifier(sample, timesteps).logits.shape == (3, 3)
    if null is not None:
        # another label's embedding is not what was folded in
        other = _encoder_features(unet, sample, timesteps, class_labels=torch.zeros(3, dtype=torch.long))
        assert not torch.allclose(_encoder_features(classifier, sample, timesteps), other)
        with pytest.raises(ValueError, match="null_class_label"):
            NoisyClassifier.from_unet(unet, num_classes=3)
    else:
        with pytest.raises(ValueError, match="no class embedding"):
            NoisyClassifier.from_unet(unet, num_classes=3, null_class_label=0)


def test_score_matched_loss_vanishes_for_the_exact_classifier_and_denoiser(generator):
    """Bayes' rule: √(1 − ᾱ_t) ∇log p(y | x_t) = −(ε(x_t, y) − ε(x_t, ∅)) exactly for the mixture's own classifier and
    denoiser, so the gradient term is zero; a sharpened classifier (logits ×2) is calibrated no more and misses it."""
    from hvae_diffusion.testing import ExactMixtureClassifier, ExactMixtureDenoiser
    from hvae_diffusion.training.losses import ScoreMatchedClassifierLoss

    means, labels = [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0, 0, 1]
    scheduler = HVAEScheduler(num_train_timesteps=50, clip_sample=False)
    alphas_cumprod = scheduler.alphas_cumprod.tolist()
    denoiser = ExactMixtureDenoiser(
        means, 0.3, component_labels=labels, alphas_cumprod=alphas_cumprod, in_channels=2, num_class_embeds=3
    ).double()
    classifier = ExactMixtureClassifier(means, 0.3, component_labels=labels, alphas_cumprod=alphas_cumprod).double()
    batch = {
        "sample": torch.randn(64, 2, generator=generator, dtype=torch.float64),
        "class_labels": torch.arange(64) % 2,
    }
    loss_fn = ScoreMatchedClassifierLoss(scheduler, denoiser, null_label=2, num_classes=2, weight=1.0)
    loss, metrics = loss_fn(classifier, batch, torch.Generator().manual_seed(0))
    assert metrics["gradient_loss"] < 1e-12
    _, sharpened = loss_fn(lambda x, t: 2 * classifier(x, t), batch, torch.Generator().manual_seed(0))
    assert sharpened["gradient_loss"] > 1e-3
