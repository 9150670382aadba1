"""The ELBO terms, the loss weights they imply, and the bound itself against exact Gaussian log-likelihoods."""

import math

import pytest
import torch

from hvae_diffusion import HVAEScheduler
from hvae_diffusion.elbo import (
    bits_per_dim,
    denoising_matching_kl,
    discretized_gaussian_log_likelihood,
    elbo_terms,
    gaussian_log_likelihood,
    loss_dtype,
    loss_weight,
    normal_kl,
    prior_matching_kl,
    weighted_mse,
)
from hvae_diffusion.forward_process import (
    alphas_cumprod_from_betas,
    make_betas,
    posterior_mean,
    posterior_variance,
    q_sample,
    signal_to_noise_ratio,
)
from hvae_diffusion.parameterization import (
    PREDICTION_TYPES,
    convert_prediction,
    posterior_mean_from_prediction,
    training_target,
)
from hvae_diffusion.scheduling_hvae import VARIANCE_TYPES
from hvae_diffusion.testing import ExactMixtureDenoiser, GaussianMixture
from hvae_diffusion.training.losses import DiffusionLoss

ALPHAS_CUMPROD = alphas_cumprod_from_betas(make_betas("linear", 1000))


def test_normal_kl_matches_torch_distributions(generator):
    mean1, mean2 = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    log_variance1, log_variance2 = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean1, (0.5 * log_variance1).exp()),
        torch.distributions.Normal(mean2, (0.5 * log_variance2).exp()),
    )
    torch.testing.assert_close(normal_kl(mean1, log_variance1, mean2, log_variance2), expected)


def test_prior_matching_kl_is_analytic(generator):
    """KL(N(√ᾱ x_0, 1 − ᾱ) ‖ N(0, 1)) = ½ Σ_i (ᾱ x_i² − ᾱ − log(1 − ᾱ))."""
    original = torch.randn(4, 3, 2, generator=generator, dtype=torch.float64)
    for alphas_cumprod_t in (0.5, 1e-3, float(ALPHAS_CUMPROD[-1])):
        a = alphas_cumprod_t
        expected = 0.5 * (a * original**2 - a - math.log(1 - a)).flatten(1).sum(1)
        torch.testing.assert_close(prior_matching_kl(original, a), expected)
    assert float(prior_matching_kl(original, ALPHAS_CUMPROD[-1]).max()) < 1e-3  # DDPM's ᾱ_T ≈ 4e-5


def test_gaussian_log_likelihood_matches_torch(generator):
    original, mean = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    log_variance = torch.tensor(-1.3, dtype=torch.float64)
    expected = torch.distributions.Normal(mean, (0.5 * log_variance).exp()).log_prob(original).sum(1)
    torch.testing.assert_close(gaussian_log_likelihood(original, mean, log_variance), expected)


@pytest.mark.parametrize("mean, log_scale", [(0.0, -3.0), (0.97, -5.0), (-0.3, 0.5), (2.0, -1.0)])
def test_discretized_probabilities_over_256_bins_sum_to_one(mean, log_scale):
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64).reshape(256, 1)
    log_probability = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), log_scale)
    assert log_probability.shape == (256,)
    torch.testing.assert_close(log_probability.exp().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_bits_per_dim_of_a_hand_computed_case():
    """Three pixels under N(0, 1): an interior value, and the two edge bins that extend to ±∞."""
    pixels = torch.tensor([[0.0, -1.0, 1.0]], dtype=torch.float64)
    half_bin = 1 / 255
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    probabilities = [phi(half_bin) - phi(-half_bin), phi(-1 + half_bin), 1 - phi(1 - half_bin)]
    expected_bits = -sum(math.log2(p) for p in probabilities) / 3
    log_likelihood = discretized_gaussian_log_likelihood(pixels, torch.zeros_like(pixels), 0.0)
    torch.testing.assert_close(bits_per_dim(-log_likelihood, 3), torch.tensor([expected_bits], dtype=torch.float64))
    assert abs(expected_bits - 4.5383) < 1e-4  # (8.32 + 2.65 + 2.65) / 3 bits, worked by hand
    # a decoder so narrow that every pixel's own bin holds all the mass costs 0 bits
    sharp = discretized_gaussian_log_likelihood(pixels, pixels, math.log(1e-4))
    assert float(bits_per_dim(-sharp, 3)) < 1e-9


def _random_case(prediction_type, generator, timesteps):
    """x_0, ε, x_t, random predictions, the true target, ᾱ_t and ᾱ_{t−1} at ``timesteps`` (all float64)."""
    shape = (len(timesteps), 3, 2)
    original = torch.randn(shape, generator=generator, dtype=torch.float64)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    alphas_cumprod_t = ALPHAS_CUMPROD[timesteps]
    prev_alphas_cumprod = torch.where(timesteps > 0, ALPHAS_CUMPROD[(timesteps - 1).clamp(min=0)], 1.0)
    sample = q_sample(original, noise, alphas_cumprod_t)
    prediction = torch.randn(shape, generator=generator, dtype=torch.float64)
    target = training_target(original, noise, sample, alphas_cumprod_t, prediction_type)
    return original, noise, sample, prediction, target, alphas_cumprod_t, prev_alphas_cumprod


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_elbo_weight_turns_mse_into_the_denoising_kl(prediction_type, generator):
    """w_t ‖prediction − target‖² = ‖μ_θ − μ_q‖² / 2σ_q² = KL(q(x_{t−1}|x_t,x_0) ‖ p_θ), for random predictions."""
    timesteps = torch.tensor([1, 2, 10, 100, 500, 900, 999])
    original, _, sample, prediction, target, a, a_prev = _random_case(prediction_type, generator, timesteps)
    weight = loss_weight(prediction_type, "elbo", a, a_prev)
    model_mean = posterior_mean_from_prediction(prediction, sample, a, a_prev, prediction_type)
    true_mean = posterior_mean(original, sample, a, a_prev)
    variance = posterior_variance(a, a_prev)
    direct = ((model_mean - true_mean) ** 2).flatten(1).sum(1) / (2 * variance)
    torch.testing.assert_close(weighted_mse(prediction, target, weight).double(), direct, rtol=1e-5, atol=0)
    log_variance = variance.log()[:, None, None]
    torch.testing.assert_close(denoising_matching_kl(true_mean, log_variance, model_mean, log_variance), direct)

    # docs/theory.md §6's table, written out for ε and the score
    alpha = a / a_prev
    table = {
        "epsilon": (1 - alpha) ** 2 / ((1 - a) * alpha) / (2 * variance),
        "score": (1 - alpha) ** 2 / alpha / (2 * variance),
        "sample": 0.5 * (signal_to_noise_ratio(a_prev) - signal_to_noise_ratio(a)),
    }
    if prediction_type in table:
        torch.testing.assert_close(weight, table[prediction_type])


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_elbo_weight_at_the_first_latent_is_the_reconstruction(prediction_type, generator):
    """At ᾱ_{t−1} = 1 the weighted MSE is −log N(x_0; x̂_0, σ²) up to its constant."""
    timesteps = torch.tensor([0, 0])
    original, _, sample, prediction, target, a, a_prev = _random_case(prediction_type, generator, timesteps)
    log_variance = torch.tensor(math.log(3e-4), dtype=torch.float64)
    weight = loss_weight(prediction_type, "elbo", a, a_prev, first_latent_log_variance=log_variance)
    predicted_x0 = convert_prediction(prediction, sample, a, prediction_type, "sample")
    negative_log_likelihood = -gaussian_log_likelihood(original, predicted_x0, log_variance)
    constant = 0.5 * original[0].numel() * (math.log(2 * math.pi) + log_variance)
    weighted = weighted_mse(prediction, target, weight).double()
    torch.testing.assert_close(weighted, negative_log_likelihood - constant, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="first_latent_log_variance"):
        loss_weight(prediction_type, "elbo", a, a_prev)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_simple_weight_is_uniform_epsilon_mse(prediction_type, generator):
    timesteps = torch.tensor([0, 3, 50, 400, 999])
    _, noise, sample, prediction, target, a, a_prev = _random_case(prediction_type, generator, timesteps)
    weight = loss_weight(prediction_type, "simple", a, a_prev)
    predicted_noise = convert_prediction(prediction, sample, a, prediction_type, "epsilon")
    expected = ((predicted_noise - noise) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(weighted_mse(prediction, target, weight).double(), expected, rtol=1e-5, atol=0)
    if prediction_type == "epsilon":
        torch.testing.assert_close(weight, torch.ones_like(weight))


def test_min_snr_weights_are_hang_et_al():
    a = ALPHAS_CUMPROD[torch.tensor([0, 100, 300, 600, 999])]
    a_prev = ALPHAS_CUMPROD[torch.tensor([0, 99, 299, 599, 998])]
    snr, gamma = signal_to_noise_ratio(a), 5.0
    clipped = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    expected = {"epsilon": clipped / snr, "sample": clipped, "v_prediction": clipped / (snr + 1)}
    for prediction_type, weight in expected.items():
        torch.testing.assert_close(loss_weight(prediction_type, "min_snr", a, a_prev, snr_gamma=gamma), weight)
    assert bool((snr > gamma).any() & (snr < gamma).any())  # both branches of the clip are exercised


def test_loss_weight_bad_input():
    a = ALPHAS_CUMPROD[:3]
    with pytest.raises(ValueError, match="weighting"):
        loss_weight("epsilon", "uniform", a, a)
    with pytest.raises(ValueError, match="snr_gamma"):
        loss_weight("epsilon", "min_snr", a, a, snr_gamma=0.0)
    with pytest.raises(ValueError, match="prediction_type"):
        loss_weight("noise", "simple", a, a)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_scheduler_loss_weights_match_its_kl(prediction_type, generator):
    """The scheduler's "elbo" weights times the MSE equal the KL between its posterior and its p_θ."""
    scheduler = HVAEScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    timesteps = torch.tensor([99, 50, 7, 1])
    original = torch.randn(4, 2, 3, 3, generator=generator, dtype=torch.float64)
    noise = torch.randn_like(original)
    sample = scheduler.add_noise(original, noise, timesteps)
    prediction = torch.randn(original.shape, generator=generator, dtype=torch.float64)
    target = scheduler.training_target(original, noise, timesteps)
    model_mean, model_log_variance, _ = scheduler.predicted_mean_log_variance(prediction, sample, timesteps)
    true_mean, true_variance = scheduler.posterior_mean_variance(original, sample, timesteps)
    kl = denoising_matching_kl(
        true_mean, true_variance.log()[:, None, None, None], model_mean, model_log_variance[:, None, None, None]
    )
    weighted = weighted_mse(prediction, target, scheduler.loss_weights(timesteps, "elbo")).double()
    torch.testing.assert_close(weighted, kl, rtol=1e-5, atol=0)


def _variance_preserving_alphas(num_train_timesteps, beta_min=0.1, beta_max=20.0):
    """α_t of the continuous-time linear VP schedule ᾱ(s) = exp(−β_min s − ½ (β_max − β_min) s²) on T steps."""
    s = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    log_alphas_cumprod = -(beta_min * s + 0.5 * (beta_max - beta_min) * s**2)
    return torch.exp(log_alphas_cumprod[1:] - log_alphas_cumprod[:-1])


def _expected_elbo_of_gaussian_data(scheduler, means, stds):
    """E_x0[ELBO] in closed form for x_0 ~ N(m, diag(s²)) and the optimal denoiser, with the scheduler's variances.

    With V_t = Var[x_0 | x_t] = 1 / (1/s² + SNR(t)) and c_t the x_0 weight of μ_q, E‖μ_θ − μ_q‖² = c_t² V_t, so
    E[KL_t] = ½ Σ_d [log Σ_t − log σ_q² + (σ_q² + c_t² V_t) / Σ_t − 1]; the decoder gives
    −½ Σ_d [log 2πΣ_1 + V_1 / Σ_1] and the prior ½ Σ_d [ᾱ_T (m² + s²) − ᾱ_T − log(1 − ᾱ_T)].
    """
    alphas_cumprod = scheduler.alphas_cumprod
    timesteps = torch.arange(len(alphas_cumprod) - 1, -1, -1)
    prev_alphas_cumprod = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])[timesteps]
    a = alphas_cumprod[timesteps]
    dummy = torch.zeros(len(timesteps), 1, dtype=torch.float64)
    _, log_variance, _ = scheduler.predicted_mean_log_variance(dummy, dummy, timesteps)  # the Σ_t under test
    x0_coefficient = prev_alphas_cumprod.sqrt() * (1 - a / prev_alphas_cumprod) / (1 - a)
    conditional_variance = 1 / (1 / stds[None] ** 2 + signal_to_noise_ratio(a)[:, None])  # [T, D]
    model_variance = log_variance.exp()[:, None]
    posterior_var = ((1 - a / prev_alphas_cumprod) * (1 - prev_alphas_cumprod) / (1 - a))[:-1, None]
    kls = 0.5 * (
        model_variance[:-1].log()
        - posterior_var.log()
        + (posterior_var + x0_coefficient[:-1, None] ** 2 * conditional_variance[:-1]) / model_variance[:-1]
        - 1
    ).sum(1)
    reconstruction = (
        -0.5 * ((2 * math.pi * model_variance[-1]).log() + conditional_variance[-1] / model_variance[-1]).sum()
    )
    final = alphas_cumprod[-1]
    prior = 0.5 * (final * (means**2 + stds**2) - final - torch.log1p(-final)).sum()
    return reconstruction - prior - kls.sum()


def _gaussian_entropy(stds):
    return float(0.5 * torch.log(2 * math.pi * math.e * stds**2).sum())


@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small"])
def test_elbo_terms_average_to_the_closed_form_and_bound_the_log_likelihood(variance_type, single_thread):
    """Monte Carlo ELBO of the optimal denoiser (elbo_terms) = the closed-form expected ELBO, and on average it is
    ≤ the exact log-likelihood log p(x_0) (paired per sample, with a 3-standard-error margin)."""
    means = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)
    stds = torch.tensor([0.5, 0.8, 1.0, 0.6], dtype=torch.float64)
    mixture = GaussianMixture(means[None], stds=stds[None])
    for num_train_timesteps, num_samples in ((10, 4000), (100, 1500), (1000, 300)):
        scheduler = HVAEScheduler.from_alphas(
            _variance_preserving_alphas(num_train_timesteps), variance_type=variance_type, clip_sample=False
        )
        denoiser = ExactMixtureDenoiser(mixture.means, mixture.stds, alphas_cumprod=scheduler.alphas_cumprod)
        generator = torch.Generator().manual_seed(num_train_timesteps)
        original, _ = mixture.sample(num_samples, generator=generator)
        elbo = elbo_terms(scheduler, denoiser, original, generator=generator, discrete=False).elbo
        gap = mixture.log_prob(original) - elbo
        standard_error = float(gap.std()) / math.sqrt(num_samples)
        assert float(gap.mean()) > -3 * standard_error, (num_train_timesteps, float(gap.mean()), standard_error)
        expected = float(_expected_elbo_of_gaussian_data(scheduler, means, stds))
        assert abs(float(elbo.mean()) - expected) < 4 * float(elbo.std()) / math.sqrt(num_samples)


def test_elbo_gap_shrinks_as_the_number_of_latents_grows():
    """One continuous ᾱ(s) cut into T = 10, 100, 1000 steps. With "fixed_large" (β_t, the decoder's variance β_1
    included) every p_θ approaches the true reverse kernel of data broad compared with √β_t, so the expected gap
    E[log p(x_0)] − E[ELBO] falls towards 0. "fixed_small" is tight only for data on a grid: for broad data its
    first few latents keep a gap of order 0.1 nats per dimension at every T."""
    means = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)
    stds = torch.tensor([0.5, 0.8, 1.0, 0.6], dtype=torch.float64)
    entropy = _gaussian_entropy(stds)
    gaps = {}
    for variance_type in ("fixed_large", "fixed_small"):
        for num_train_timesteps in (10, 100, 1000):
            scheduler = HVAEScheduler.from_alphas(
                _variance_preserving_alphas(num_train_timesteps), variance_type=variance_type
            )
            expected_elbo = float(_expected_elbo_of_gaussian_data(scheduler, means, stds))
            gaps[variance_type, num_train_timesteps] = -entropy - expected_elbo
    large = [gaps["fixed_large", t] for t in (10, 100, 1000)]
    assert 0 < large[2] < large[1] < large[0], gaps
    assert large[2] < 0.01 * len(stds), gaps
    assert gaps["fixed_small", 1000] > 0.05 * len(stds), gaps


def test_denoising_kls_of_the_optimal_denoiser_are_exact(single_thread):
    """For Gaussian data the expected KL of latent t is ½ (SNR(t−1) − SNR(t)) Σ_d Var[x_0,d | x_t] with
    Var[x_0 | x_t] = 1 / (1/s² + SNR(t)); elbo_terms' per-latent columns must average to it."""
    stds = torch.tensor([0.3, 1.0], dtype=torch.float64)
    mixture = GaussianMixture([[0.2, -0.5]], stds=stds[None])
    scheduler = HVAEScheduler(num_train_timesteps=20, beta_end=0.3, clip_sample=False)
    denoiser = ExactMixtureDenoiser(mixture.means, mixture.stds, alphas_cumprod=scheduler.alphas_cumprod)
    generator = torch.Generator().manual_seed(0)
    original, _ = mixture.sample(20_000, generator=generator)
    terms = elbo_terms(scheduler, denoiser, original, generator=generator, discrete=False)

    timesteps = terms.timesteps
    assert timesteps.tolist() == list(range(19, 0, -1))
    snr = signal_to_noise_ratio(scheduler.alphas_cumprod)
    conditional_variance = 1 / (1 / stds[None] ** 2 + snr[timesteps][:, None])
    expected = 0.5 * (snr[timesteps - 1] - snr[timesteps]) * conditional_variance.sum(1)
    measured = terms.denoising_matching.mean(0)
    # each KL is a scaled χ² over the data and noise draws: its Monte Carlo error is a few percent at most
    torch.testing.assert_close(measured, expected, rtol=0.05, atol=0)


def test_timestep_subset_estimate_is_unbiased(single_thread):
    """Evaluating num_timesteps random latents and scaling by (chain length / num_timesteps) is unbiased."""
    mixture = GaussianMixture([[0.2, -0.5]], stds=0.5)
    scheduler = HVAEScheduler(num_train_timesteps=20, beta_end=0.3, clip_sample=False)
    denoiser = ExactMixtureDenoiser(mixture.means, mixture.stds, alphas_cumprod=scheduler.alphas_cumprod)
    generator = torch.Generator().manual_seed(1)
    original, _ = mixture.sample(64, generator=generator)
    full = elbo_terms(scheduler, denoiser, original, generator=generator, discrete=False)
    full_total = torch.stack(
        [
            elbo_terms(scheduler, denoiser, original, generator=generator, discrete=False).denoising_matching_total
            for _ in range(10)
        ]
    ).mean(0)
    estimates = []
    for _ in range(200):
        terms = elbo_terms(scheduler, denoiser, original, generator=generator, discrete=False, num_timesteps=3)
        assert terms.denoising_matching.shape == (64, 3) and terms.denoising_scale == 19 / 3
        estimates.append(terms.denoising_matching_total.mean())
    estimates = torch.stack(estimates)
    standard_error = float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.mean()) - float(full_total.mean())) < 4 * standard_error + 0.01
    assert full.denoising_scale == 1.0 and full.denoising_matching.shape == (64, 19)
    with pytest.raises(ValueError, match="num_timesteps"):
        elbo_terms(scheduler, denoiser, original, num_timesteps=20)


def test_elbo_terms_of_8_bit_data(generator):
    """Discretized decoder on 8-bit data: finite terms, ELBO = sum of the parts, bits/dim = −ELBO / (D ln 2)."""
    scheduler = HVAEScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(25)
    pixels = torch.randint(0, 256, (4, 1, 4, 4), generator=generator).double() / 127.5 - 1
    denoiser = ExactMixtureDenoiser(torch.zeros(1, 16), 0.5, alphas_cumprod=scheduler.alphas_cumprod)
    terms = elbo_terms(scheduler, denoiser, pixels, generator=generator)
    assert terms.denoising_matching.shape == (4, 24) and terms.num_dims == 16
    assert bool(terms.reconstruction.le(0).all())  # a probability of a discrete outcome
    parts = terms.reconstruction - terms.prior_matching - terms.denoising_matching.sum(1)
    torch.testing.assert_close(terms.elbo, parts)
    torch.testing.assert_close(terms.bits_per_dim, -terms.elbo / (16 * math.log(2)))
    assert bool(torch.isfinite(terms.bits_per_dim).all() & (terms.bits_per_dim > 0).all())


@pytest.mark.parametrize("variance_output, fixed_type", [(1.0, "fixed_large"), (-1.0, "fixed_small")])
def test_learned_range_elbo_at_its_ends_equals_the_fixed_variances(variance_output, fixed_type, generator):
    """learned_range with v = +1 is log β_t at every latent and v = −1 the clipped σ_q²: the same ELBO terms."""
    pixels = torch.randint(0, 256, (3, 2, 2, 2), generator=generator).double() / 127.5 - 1
    schedule = {"num_train_timesteps": 50, "beta_end": 0.3}
    alphas_cumprod = HVAEScheduler(**schedule).alphas_cumprod
    denoiser = ExactMixtureDenoiser(torch.zeros(1, 8), 0.5, alphas_cumprod=alphas_cumprod)

    def learned_denoiser(sample, timesteps):
        prediction = denoiser(sample, timesteps).sample
        return torch.cat([prediction, torch.full_like(prediction, variance_output)], dim=1)

    results = []
    for variance_type, model in (("learned_range", learned_denoiser), (fixed_type, denoiser)):
        scheduler = HVAEScheduler(**schedule, variance_type=variance_type)
        results.append(elbo_terms(scheduler, model, pixels, generator=torch.Generator().manual_seed(3)))
    learned, fixed = results
    torch.testing.assert_close(learned.denoising_matching, fixed.denoising_matching)
    torch.testing.assert_close(learned.reconstruction, fixed.reconstruction)
    torch.testing.assert_close(learned.bits_per_dim, fixed.bits_per_dim)


@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small"])
def test_elbo_of_a_respaced_chain_bounds_the_log_likelihood(variance_type, single_thread):
    """25 of DDPM's 1000 latents are the exact HVAE with 25 latents: still a lower bound on log p(x_0) on average."""
    mixture = GaussianMixture(torch.zeros(1, 8, dtype=torch.float64), stds=0.5)
    scheduler = HVAEScheduler(variance_type=variance_type, clip_sample=False)
    scheduler.set_timesteps(25)
    denoiser = ExactMixtureDenoiser(mixture.means, mixture.stds, alphas_cumprod=scheduler.alphas_cumprod)
    generator = torch.Generator().manual_seed(0)
    original, _ = mixture.sample(2000, generator=generator)
    terms = elbo_terms(scheduler, denoiser, original, generator=generator, discrete=False)
    assert terms.timesteps.tolist() == scheduler.timesteps[:-1].tolist()
    gap = mixture.log_prob(original) - terms.elbo
    assert float(gap.mean()) > -3 * float(gap.std()) / math.sqrt(len(gap))


def _chain_variances(scheduler):
    """(σ_q², β) of each step of the scheduler's chain, written out from ᾱ; σ_q² of the last step (0) is replaced by
    the step before's, improved DDPM's clipping."""
    chain = scheduler.timesteps
    a = scheduler.alphas_cumprod[chain]
    a_prev = torch.cat([scheduler.alphas_cumprod[chain[1:]], torch.ones(1, dtype=torch.float64)])
    beta = 1 - a / a_prev
    small = beta * (1 - a_prev) / (1 - a)
    small[-1] = small[-2]
    return small, beta


@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_elbo_weights_times_the_mse_are_the_kls_of_elbo_terms(prediction_type, variance_type, generator):
    """For every Σ and parameterization, on a respaced chain: w_t ‖output − target‖² = KL_t minus its μ-free part
    ½ D [log Σ_t − log σ_q² + σ_q²/Σ_t − 1], KL_t a column of ``elbo_terms``; at the first latent it is the Gaussian
    reconstruction's −log N(x_0; x̂_0, Σ_1) minus ½ D log 2πΣ_1. Learned variances are given Σ = σ_q², the variance
    their weights assume (for learned_range, the variance channels at −1)."""
    scheduler = HVAEScheduler(
        num_train_timesteps=100, prediction_type=prediction_type, variance_type=variance_type, clip_sample=False
    )
    scheduler.set_timesteps(timesteps=[99, 70, 40, 12, 4, 0])
    small, beta = _chain_variances(scheduler)
    variances = beta if variance_type.startswith("fixed_large") else small
    chain = scheduler.timesteps.tolist()
    original = torch.randn(3, 2, 2, 2, generator=generator, dtype=torch.float64)
    seen = []

    def denoiser(sample, timesteps):
        output = 0.7 * torch.tanh(sample) - 0.2
        seen.append((sample, timesteps, output))
        variance = torch.full_like(output, float(small[chain.index(int(timesteps[0]))]))
        if variance_type == "learned":
            return torch.cat([output, variance], dim=1)
        if variance_type == "learned_range":
            return torch.cat([output, -torch.ones_like(output)], dim=1)
        return output

    terms = elbo_terms(scheduler, denoiser, original, generator=generator, discrete=False)
    num_dims = original[0].numel()
    for index, (sample, timesteps, output) in enumerate(seen):
        a = scheduler.alphas_cumprod[timesteps]
        noise = (sample - a.sqrt()[:, None, None, None] * original) / (1 - a).sqrt()[:, None, None, None]
        target = training_target(original, noise, sample, a, prediction_type)
        weighted = weighted_mse(output, target, scheduler.loss_weights(timesteps, "elbo"))
        variance = variances[index]
        if index < len(seen) - 1:
            posterior = small[index]
            constant = 0.5 * num_dims * (variance.log() - posterior.log() + posterior / variance - 1)
            expected = terms.denoising_matching[:, index] - constant
        else:
            expected = -terms.reconstruction - 0.5 * num_dims * torch.log(2 * math.pi * variance)
        torch.testing.assert_close(weighted, expected, rtol=1e-6, atol=1e-9)
    if variance_type == "fixed_large":
        # the weight is not ½ (SNR(t−1) − SNR(t)) Jacobian² here: the factor σ_q²/β_t is far from 1 at small t
        assert float((small[:-1] / beta[:-1]).min()) < 0.6


@pytest.mark.parametrize("discrete", [True, False])
def test_improved_ddpm_decoder_variance_for_fixed_large(discrete, generator):
    """decoder_variance="improved_ddpm" gives the fixed_large decoder the σ_q² of the latent before the last (improved
    DDPM's convention); everything else, and every other variance type, is unchanged."""
    pixels = torch.randint(0, 256, (3, 1, 2, 2), generator=generator).double() / 127.5 - 1
    scheduler = HVAEScheduler(num_train_timesteps=100, variance_type="fixed_large")
    scheduler.set_timesteps(20)
    denoiser = ExactMixtureDenoiser(torch.zeros(1, 4), 0.5, alphas_cumprod=scheduler.alphas_cumprod)
    seen = []

    def recording_denoiser(sample, timesteps):
        output = denoiser(sample, timesteps).sample
        seen.append((sample, timesteps, output))
        return output

    runs = {}
    for convention in ("model", "improved_ddpm"):
        seen.clear()
        runs[convention] = elbo_terms(
            scheduler, recording_denoiser, pixels, torch.Generator().manual_seed(1), discrete, None, convention
        )
    model, improved = runs["model"], runs["improved_ddpm"]
    torch.testing.assert_close(model.denoising_matching, improved.denoising_matching)
    sample, timesteps, output = seen[-1]
    mean, _, _ = scheduler.predicted_mean_log_variance(output, sample, timesteps)
    small, beta = _chain_variances(scheduler)
    for terms, variance in ((model, beta[-1]), (improved, small[-1])):
        log_variance = variance.log().expand(3)[:, None, None, None]
        if discrete:
            expected = discretized_gaussian_log_likelihood(pixels, mean, 0.5 * log_variance)
        else:
            expected = gaussian_log_likelihood(pixels, mean, log_variance)
        torch.testing.assert_close(terms.reconstruction, expected)
    small_scheduler = HVAEScheduler(num_train_timesteps=100)
    small_scheduler.set_timesteps(20)
    results = [
        elbo_terms(small_scheduler, denoiser, pixels, torch.Generator().manual_seed(1), decoder_variance=convention)
        for convention in ("model", "improved_ddpm")
    ]
    torch.testing.assert_close(results[0].reconstruction, results[1].reconstruction)
    with pytest.raises(ValueError, match="decoder_variance"):
        elbo_terms(scheduler, denoiser, pixels, decoder_variance="glide")


def test_weighted_mse_keeps_float64_and_computes_half_types_in_float32(generator):
    prediction, target = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    weight = torch.tensor([0.3, 1e-3, 7.0], dtype=torch.float64)
    exact = weight * ((prediction - target) ** 2).sum(1)
    wide = weighted_mse(prediction, target, weight)
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide, exact, rtol=1e-15, atol=0)  # float32 would give ~1e-7
    for half in (torch.float16, torch.bfloat16):
        assert loss_dtype(prediction.to(half)) == torch.float32
        low = weighted_mse(prediction.to(half), target.to(half), weight)
        assert low.dtype == torch.float32
        rounded = weight * ((prediction.to(half).double() - target.to(half).double()) ** 2).sum(1)
        torch.testing.assert_close(low.double(), rounded, rtol=1e-6, atol=0)


class _FixedOutput(torch.nn.Module):
    def __init__(self, output):
        super().__init__()
        self.output = torch.nn.Parameter(output)

    def forward(self, sample, timestep):
        return self.output


def test_diffusion_loss_keeps_float64_where_float32_saturates():
    """A learned-variance decoder far from an edge pixel: the discretized CDF saturates in float32 (1 − Φ rounds to
    0), so only a float64 loss gets the decoder NLL right; half-precision outputs are computed in float32."""
    scheduler = HVAEScheduler(
        num_train_timesteps=1, variance_type="learned_range", prediction_type="sample", beta_start=0.01, beta_end=0.01
    )
    pixels = torch.ones(2, 1, 2, 2, dtype=torch.float64)  # the top bin, whose probability is 1 − Φ(…)
    output = torch.cat([torch.full_like(pixels, 0.4), torch.zeros_like(pixels)], dim=1)  # x̂_0 6σ below
    loss_fn = DiffusionLoss(scheduler, weighting="simple", vlb_weight=1.0)
    loss, parts = loss_fn(_FixedOutput(output), {"sample": pixels}, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float64 and parts["vlb_loss"].dtype == torch.float64

    replay = torch.Generator().manual_seed(0)
    timesteps = torch.randint(0, 1, (2,), generator=replay)
    sample = scheduler.add_noise(pixels, torch.randn(pixels.shape, generator=replay, dtype=torch.float64), timesteps)
    mean, log_variance, _ = scheduler.predicted_mean_log_variance(output, sample, timesteps)
    exact_nll = -discretized_gaussian_log_likelihood(pixels, mean, 0.5 * log_variance) / (4 * math.log(2))
    torch.testing.assert_close(parts["vlb_loss"], exact_nll.mean(), rtol=1e-9, atol=0)
    float32_nll = -discretized_gaussian_log_likelihood(pixels.float(), mean.float(), 0.5 * log_variance.float())
    assert float(float32_nll.mean()) / (4 * math.log(2)) - float(exact_nll.mean()) > 5  # bits/dim

    half_loss, _ = loss_fn(_FixedOutput(output.bfloat16()), {"sample": pixels.bfloat16()}, None)
    assert half_loss.dtype == torch.float32


def test_diffusion_loss_rejects_an_untrainable_learned_variance():
    with pytest.raises(ValueError, match="learned_range"):
        DiffusionLoss(HVAEScheduler(variance_type="learned"))
