"""Training objectives: the weighted denoising loss of the diffusion HVAE, its hybrid with the ELBO, and the noisy
classifier's loss, each on one batch, with the randomness (timesteps, noise, condition dropout) drawn from a given
generator so that a run is reproducible step by step.
"""

import math

import torch

from ..elbo import (
    LOSS_WEIGHTINGS,
    denoising_matching_kl,
    discretized_gaussian_log_likelihood,
    loss_dtype,
    loss_weight,
    prior_matching_kl,
    weighted_mse,
)
from ..forward_process import broadcast_to, posterior_variance, q_sample
from ..parameterization import convert_prediction, split_learned_variance, training_target
from .timestep_samplers import UniformTimestepSampler


class BatchRandomness:
    """Random draws for one process's share of a global batch split over ``num_processes`` processes.

    Every process draws the whole global batch from the same CPU generator and keeps its own rows, so the
    randomness each example sees is the same whatever the number of processes (the multi-process run equals the
    one-process run with the same global batch).
    """

    def __init__(self, generator, num_processes=1, process_index=0):
        self.generator = generator
        self.num_processes = num_processes
        self.process_index = process_index

    def _own_rows(self, values, batch_size):
        start = self.process_index * batch_size
        return values[start : start + batch_size]

    def randint(self, high, batch_size):
        values = torch.randint(0, high, (batch_size * self.num_processes,), generator=self.generator)
        return self._own_rows(values, batch_size)

    def randn(self, shape, dtype=torch.float32):
        values = torch.randn((shape[0] * self.num_processes, *shape[1:]), generator=self.generator, dtype=dtype)
        return self._own_rows(values, shape[0])

    def rand(self, batch_size):
        return self._own_rows(torch.rand(batch_size * self.num_processes, generator=self.generator), batch_size)


def as_batch_randomness(randomness):
    """A ``BatchRandomness`` from itself or a plain ``torch.Generator`` (one process)."""
    if isinstance(randomness, BatchRandomness):
        return randomness
    if randomness is None or isinstance(randomness, torch.Generator):
        return BatchRandomness(randomness)
    raise TypeError(f"randomness must be a torch.Generator or BatchRandomness, got {type(randomness).__name__}")


def draw_timesteps_and_noise(samples, num_train_timesteps, randomness):
    """t ~ U{0..T−1} per sample and ε ~ N(0, I) of ``samples``' shape, drawn on CPU, moved to ``samples``' device."""
    timesteps = randomness.randint(num_train_timesteps, samples.shape[0])
    noise = randomness.randn(samples.shape, dtype=samples.dtype)
    return timesteps.to(samples.device), noise.to(samples.device)


def drop_conditions(class_labels, null_label, drop_probability, randomness):
    """Class labels with each one replaced by ``null_label`` with probability ``drop_probability`` (for CFG)."""
    if drop_probability <= 0:
        return class_labels
    dropped = randomness.rand(class_labels.shape[0]).to(class_labels.device) < drop_probability
    return torch.where(dropped, torch.full_like(class_labels, null_label), class_labels)


def drop_prompts(prompts, drop_probability, randomness):
    """Prompts with each one replaced by the empty prompt with probability ``drop_probability``."""
    if drop_probability <= 0:
        return list(prompts)
    dropped = randomness.rand(len(prompts)) < drop_probability
    return ["" if drop else prompt for prompt, drop in zip(prompts, dropped.tolist())]


def draw_conditioning(batch, cond_drop_prob, null_label, randomness, encode_prompt=None):
    """The denoiser's condition keywords for a batch: class labels or prompt embeddings, each dropped with
    probability ``cond_drop_prob`` (to ``null_label`` or the empty prompt) for classifier-free guidance."""
    conditioning = {}
    if batch.get("class_labels") is not None:
        if cond_drop_prob > 0 and null_label is None:
            raise ValueError("cond_drop_prob > 0 with class labels needs null_label (the label meaning 'no class')")
        conditioning["class_labels"] = drop_conditions(batch["class_labels"], null_label, cond_drop_prob, randomness)
    if batch.get("prompt") is not None:
        conditioning["encoder_hidden_states"] = encode_prompt(
            drop_prompts(batch["prompt"], cond_drop_prob, randomness)
        )
    return conditioning


def update_sampler_history(timestep_sampler, observed, gather):
    """Give ``timestep_sampler`` the (timesteps, losses) ``observed`` on every process, gathered in process order."""
    if type(timestep_sampler) is UniformTimestepSampler or observed is None:
        return
    timesteps, losses = observed
    timestep_sampler.update(gather(timesteps).cpu(), gather(losses).double().cpu())


def variational_bound_term(scheduler, model_output, original_samples, sample, timesteps):
    """Per-sample L_{t−1} of the ELBO in bits per dimension for ``model_output`` at x_t (improved DDPM's L_vlb term).

    KL(q(x_{t'} | x_t, x_0) ‖ p_θ(x_{t'} | x_t)) for t > 0 and −log p_θ(x_0 | x_1) (discretized) at the first latent.
    """
    model_mean, model_log_variance, _ = scheduler.predicted_mean_log_variance(model_output, sample, timesteps)
    model_log_variance = (
        broadcast_to(model_log_variance.to(sample.dtype), sample)
        if model_log_variance.ndim == 1
        else model_log_variance
    )
    true_mean, true_variance = scheduler.posterior_mean_variance(original_samples, sample, timesteps)
    is_first_latent = timesteps == 0
    true_log_variance = broadcast_to(true_variance.clamp(min=1e-20).log().to(sample.dtype), sample)
    kl = denoising_matching_kl(true_mean, true_log_variance, model_mean, model_log_variance)
    decoder_nll = -discretized_gaussian_log_likelihood(original_samples, model_mean, 0.5 * model_log_variance)
    num_dims = math.prod(sample.shape[1:])
    return torch.where(is_first_latent, decoder_nll, kl) / (num_dims * math.log(2.0))


class DiffusionLoss:
    """The denoiser's loss on a batch: E_t,ε [w_t ‖model(x_t, t) − target‖²] / D, plus the ELBO term for learned Σ.

    The weight w_t comes from ``HVAEScheduler.loss_weights`` (``"simple"`` = DDPM's MSE on ε, ``"elbo"`` = the
    denoising-matching KL, ``"min_snr"``), the target from ``HVAEScheduler.training_target`` in the scheduler's
    ``prediction_type``. Dividing by D (the dimensions of a sample) keeps the simple loss an MSE, so learning rates
    carry over from Diffusers' examples.

    The loss is computed in the inputs' precision (float64 stays float64), half types in float32 (``elbo.loss_dtype``).

    With ``variance_type="learned_range"`` the model outputs 2C channels and the loss is improved DDPM's hybrid
    L_simple + λ L_vlb: L_vlb is ``vlb_weight`` × the ELBO term of the sampled latent in bits/dim computed with the
    mean prediction detached, so the ELBO trains only the variance and the weighted MSE only the mean.
    ``vlb_weight`` defaults to T / 1000 (λ = 0.001 on the sum of T terms, as in improved DDPM).

    Args:
        scheduler: an ``HVAEScheduler`` with its full training chain (no ``set_timesteps``).
        weighting: ``"simple"``, ``"elbo"`` or ``"min_snr"``; ``snr_gamma`` for the last.
        cond_drop_prob: probability of replacing a class label by ``null_label`` (or a prompt by "").
        null_label: the label meaning "no condition", ``num_classes``.
        timestep_sampler: draws t and its weight (``timestep_samplers``); uniform by default. With importance
            sampling each example's loss is multiplied by 1/(T p(t)), so the expected loss is the uniform one, and
            ``update_timestep_sampler`` feeds the per-example losses of the global batch back to it.
    """

    def __init__(
        self,
        scheduler,
        weighting="simple",
        snr_gamma=5.0,
        cond_drop_prob=0.0,
        null_label=None,
        vlb_weight=None,
        timestep_sampler=None,
    ):
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"--loss_weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"--cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        if scheduler.num_inference_steps is not None:
            raise ValueError("the training scheduler must keep its full chain: do not call set_timesteps on it")
        self.scheduler = scheduler
        self.weighting = weighting
        self.snr_gamma = snr_gamma
        self.cond_drop_prob = cond_drop_prob
        self.null_label = null_label
        if scheduler.config.variance_type == "learned":
            raise ValueError(
                "--variance_type learned reads the model's variance channels as Σ itself (as DDPMScheduler does), which "
                "an unconstrained network output does not keep positive; train with learned_range"
            )
        self.learned_variance = scheduler.config.variance_type == "learned_range"
        num_train_timesteps = scheduler.config.num_train_timesteps
        self.vlb_weight = num_train_timesteps / 1000.0 if vlb_weight is None else vlb_weight
        self.timestep_sampler = timestep_sampler or UniformTimestepSampler(num_train_timesteps)
        if self.timestep_sampler.num_timesteps != num_train_timesteps:
            raise ValueError(
                f"the timestep sampler draws from {self.timestep_sampler.num_timesteps} timesteps, the scheduler has "
                f"num_train_timesteps={num_train_timesteps}"
            )
        self._observed = None

    def __call__(self, model, batch, randomness=None, encode_prompt=None):
        """Per-batch scalar loss (mean over the batch) and a dict of logged parts.

        Args:
            model: called as ``model(x_t, t, class_labels=...)`` or ``model(x_t, t, encoder_hidden_states=...)``.
            batch: ``{"sample": [B, ...], "class_labels": [B] (optional), "prompt": list[str] (optional)}``.
            randomness: a CPU ``torch.Generator`` or ``BatchRandomness`` for t, ε and condition dropout.
            encode_prompt: maps a list of prompts to ``encoder_hidden_states`` (text conditioning only).
        """
        randomness = as_batch_randomness(randomness)
        original_samples = batch["sample"]
        timesteps, sample_weights = self.timestep_sampler.sample(randomness, original_samples.shape[0])
        timesteps = timesteps.to(original_samples.device)
        noise = randomness.randn(original_samples.shape, dtype=original_samples.dtype).to(original_samples.device)
        sample = self.scheduler.add_noise(original_samples, noise, timesteps)
        conditioning = draw_conditioning(batch, self.cond_drop_prob, self.null_label, randomness, encode_prompt)
        model_output = model(sample, timesteps, **conditioning)
        model_output = getattr(model_output, "sample", model_output)

        prediction, variance_output = split_learned_variance(model_output, original_samples)
        if self.learned_variance and variance_output is None:
            raise ValueError(
                f"variance_type={self.scheduler.config.variance_type!r} needs a model with 2C output channels (the "
                f"prediction, then the variance), got output shape {tuple(model_output.shape)}"
            )
        target = self.scheduler.training_target(original_samples, noise, timesteps)
        weights = self.scheduler.loss_weights(timesteps.cpu(), self.weighting, self.snr_gamma).to(sample.device)
        num_dims = math.prod(original_samples.shape[1:])
        denoising = weighted_mse(prediction, target, weights) / num_dims
        parts = {"denoising_loss": denoising.mean().detach()}
        loss = denoising
        if self.learned_variance:
            dtype = loss_dtype(model_output, original_samples)
            frozen_mean_output = torch.cat([prediction.detach(), variance_output], dim=1)
            vlb = variational_bound_term(
                self.scheduler, frozen_mean_output.to(dtype), original_samples.to(dtype), sample.to(dtype), timesteps
            )
            loss = loss + self.vlb_weight * vlb
            parts["vlb_loss"] = vlb.mean().detach()
        self._observed = (timesteps.detach(), loss.detach())
        return (loss * sample_weights.to(loss.device, loss.dtype)).mean(), parts

    def update_timestep_sampler(self, gather):
        """Feed the last batch's per-example losses (before the importance weight) to the timestep sampler.

        ``gather`` concatenates a tensor over processes in process order (``Accelerator.gather``), which is the order
        of the global batch, so every process's sampler sees the same history. A uniform sampler gathers nothing.
        """
        update_sampler_history(self.timestep_sampler, self._observed, gather)


class LearnedScheduleLoss:
    """The negative ELBO of a batch with a learned noise schedule γ_η (VDM's discrete-time bound), in nats/dim.

    Per image, an unbiased single-draw estimate of −ELBO on the T-latent chain at t_i = i / (T − 1)
    (``models.noise_schedule``), with ᾱ_i = sigmoid(−γ_η(t_i)) and Σ = σ_q² ("fixed_small"):

        L(x_0) = KL(q(x_{T−1} | x_0) ‖ N(0, I)) − log p_θ(x_0 | x_1) + (T − 1) w_t KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)),

    t ∈ {1..T−1} drawn by the timestep sampler with weight w_t = 1/((T − 1) p(t)). The decoder (a second forward, in
    the same batch) and the prior are evaluated for every image, so the only sampled term is the KL; each term is the
    package's ELBO equation (``elbo.loss_weight``, ``elbo.discretized_gaussian_log_likelihood``,
    ``elbo.prior_matching_kl``) with ᾱ differentiable in η. Its T → ∞ limit is the continuous-time bound L∞.

    Gradients, as in VDM: the denoiser and the endpoints γ_0, γ_1 get ∇ E[L] (the endpoints are what the bound
    depends on); the shape s_η gets ∇ E[L²] = ∇ Var[L] + ∇ (E L)², whose second part vanishes in continuous time, so
    the shape minimises the variance of the estimate. It is done with a gradient hook on the shape's values that
    multiplies their incoming gradient by 2L of their image.

    Args:
        scheduler: the ``HVAEScheduler`` of the run (its T and ``prediction_type``; its tables are not used).
        noise_schedule: the ``LearnedNoiseSchedule`` being trained (``trainable_modules``).
        timestep_sampler: over the T − 1 denoising latents (t − 1 ∈ {0..T−2}); uniform by default.
    """

    def __init__(self, scheduler, noise_schedule, timestep_sampler=None, cond_drop_prob=0.0, null_label=None):
        num_train_timesteps = scheduler.config.num_train_timesteps
        if scheduler.num_inference_steps is not None:
            raise ValueError("the training scheduler must keep its full chain: do not call set_timesteps on it")
        if scheduler.config.variance_type not in ("fixed_small", "fixed_small_log"):
            raise ValueError(
                "--noise_schedule learned trains the bound with p_θ's variance σ_q² (VDM): use --variance_type "
                f"fixed_small, got {scheduler.config.variance_type!r}"
            )
        if num_train_timesteps < 2:
            raise ValueError(f"--noise_schedule learned needs num_train_timesteps >= 2, got {num_train_timesteps}")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"--cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = scheduler.config.prediction_type
        self.noise_schedule = noise_schedule
        self.trainable_modules = {"noise_schedule": noise_schedule}
        self.timestep_sampler = timestep_sampler or UniformTimestepSampler(num_train_timesteps - 1)
        if self.timestep_sampler.num_timesteps != num_train_timesteps - 1:
            raise ValueError(
                f"the timestep sampler draws from {self.timestep_sampler.num_timesteps} timesteps, the learned "
                f"schedule's bound samples the T − 1 = {num_train_timesteps - 1} denoising latents"
            )
        self.cond_drop_prob = cond_drop_prob
        self.null_label = null_label
        self._observed = None

    def __call__(self, model, batch, randomness=None, encode_prompt=None):
        """The batch's mean bound in nats/dim (the loss) and its logged parts; see the class docstring."""
        per_image, shape, parts = self.per_image_bound(model, batch, randomness, encode_prompt)
        if shape.requires_grad:
            second_moment_scale = 2 * per_image.detach().to(shape.device).unsqueeze(1)
            shape.register_hook(lambda gradient: gradient * second_moment_scale)
        return per_image.mean().to(loss_dtype(batch["sample"])), parts

    def per_image_bound(self, model, batch, randomness=None, encode_prompt=None):
        """``(L [B] in nats/dim, float64; s_η's values [B, 3] it was computed from; logged parts)``."""
        randomness = as_batch_randomness(randomness)
        original_samples = batch["sample"]
        batch_size, device = original_samples.shape[0], original_samples.device
        num_dims = math.prod(original_samples.shape[1:])
        last = self.num_train_timesteps - 1
        draws, sample_weights = self.timestep_sampler.sample(randomness, batch_size)
        timesteps = draws + 1
        noise = randomness.randn(original_samples.shape, dtype=original_samples.dtype).to(device)
        decoder_noise = randomness.randn(original_samples.shape, dtype=original_samples.dtype).to(device)
        conditioning = draw_conditioning(batch, self.cond_drop_prob, self.null_label, randomness, encode_prompt)

        # s_η at each image's t, its previous latent, and the decoder's neighbour t_1, as one [B, 3] tensor whose
        # gradient the variance hook rescales per image
        times = torch.stack([timesteps, timesteps - 1, torch.ones_like(timesteps)], dim=1).double() / last
        shape = self.noise_schedule.shape(times.to(self.noise_schedule.device))
        alphas_cumprod = torch.sigmoid(-self.noise_schedule.gamma_from_shape(shape)).to(device)
        alphas_cumprod_t, prev_alphas_cumprod, second_alphas_cumprod = alphas_cumprod.unbind(dim=1)
        gamma_0, gamma_1 = self.noise_schedule.endpoints()
        first_alphas_cumprod = torch.sigmoid(-gamma_0).to(device).expand(batch_size)

        # one forward serves the decoder's latent x_1 (timestep 0) and the sampled x_t
        sample = q_sample(original_samples, noise, alphas_cumprod_t)
        first_sample = q_sample(original_samples, decoder_noise, first_alphas_cumprod)
        model_output = model(
            torch.cat([first_sample, sample]),
            torch.cat([torch.zeros_like(timesteps), timesteps]).to(device),
            **{name: torch.cat([value, value]) for name, value in conditioning.items()},
        )
        model_output = getattr(model_output, "sample", model_output)
        first_output, output = model_output.chunk(2)

        target = training_target(original_samples, noise, sample, alphas_cumprod_t, self.prediction_type)
        weights = loss_weight(self.prediction_type, "elbo", alphas_cumprod_t, prev_alphas_cumprod)
        denoising = weighted_mse(output, target, weights)
        predicted_x0 = convert_prediction(
            first_output, first_sample, first_alphas_cumprod, self.prediction_type, "sample"
        )
        decoder_log_variance = posterior_variance(second_alphas_cumprod, first_alphas_cumprod).log()
        reconstruction = -discretized_gaussian_log_likelihood(
            original_samples, predicted_x0, broadcast_to(0.5 * decoder_log_variance, original_samples)
        )
        prior = prior_matching_kl(original_samples, torch.sigmoid(-gamma_1).to(device))
        sampled_denoising = last * sample_weights.to(device) * denoising.double()
        per_image = (prior.double() + reconstruction.double() + sampled_denoising) / num_dims
        self._observed = (draws.to(device), (denoising / num_dims).detach())
        parts = {
            "prior_loss": (prior / num_dims).mean().detach(),
            "reconstruction_loss": (reconstruction / num_dims).mean().detach(),
            "denoising_loss": (sampled_denoising / num_dims).mean().detach(),
            "gamma_0": gamma_0.detach(),
            "gamma_1": gamma_1.detach(),
        }
        return per_image, shape, parts

    def update_timestep_sampler(self, gather):
        """As ``DiffusionLoss.update_timestep_sampler``, with each image's KL in nats/dim."""
        update_sampler_history(self.timestep_sampler, self._observed, gather)


class NoisyClassifierLoss:
    """Cross-entropy of a noisy classifier on x_t ~ q(x_t | x_0) at t ~ U{0..T−1}: −log p_φ(y | x_t, t)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def __call__(self, model, batch, randomness=None, encode_prompt=None):
        randomness = as_batch_randomness(randomness)
        original_samples, labels = batch["sample"], batch["class_labels"]
        timesteps, noise = draw_timesteps_and_noise(
            original_samples, self.scheduler.config.num_train_timesteps, randomness
        )
        sample = self.scheduler.add_noise(original_samples, noise, timesteps)
        output = model(sample, timesteps)
        logits = getattr(output, "logits", output)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        return loss, {"accuracy": accuracy.detach()}


class ScoreMatchedClassifierLoss:
    """A noisy classifier's cross-entropy plus the distance of its input gradient from Bayes' rule's:

        −log p_φ(y | x_t) + λ · ‖√(1 − ᾱ_t) ∇_{x_t} log p_φ(y' | x_t) + ε(x_t, y') − ε(x_t, ∅)‖² / D,

    with y' drawn uniformly over the classes, ε a class-conditional denoiser (trained with label dropout, ∅ its null
    label) and D the sample's size. Guidance uses the gradient of log p(y | x_t), and Bayes' rule gives it from the
    denoiser: ∇log p(y | x_t) = ∇log p(x_t | y) − ∇log p(x_t) = −(ε(x_t, y) − ε(x_t, ∅)) / √(1 − ᾱ_t).
    Cross-entropy alone fits the values of p(y | x_t) (a calibrated classifier), not their gradients, which at large t
    it has no reason to get right; the second term asks for them, for every class, not only the true one.

    Args:
        scheduler: the forward process (``add_noise``, ``alphas_cumprod``, ``config.prediction_type`` of the denoiser).
        denoiser: the class-conditional model, called ``denoiser(x_t, t, class_labels=...)``; frozen.
        null_label: its label of ∅.
        num_classes: the classes y' is drawn from.
        weight: λ.
    """

    def __init__(self, scheduler, denoiser, null_label: int, num_classes: int, weight: float = 1.0):
        self.scheduler = scheduler
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.null_label = null_label
        self.num_classes = num_classes
        self.weight = weight

    def _noise_prediction(self, sample, timesteps, labels, alphas_cumprod_t):
        from ..parameterization import convert_prediction

        output = self.denoiser(sample, timesteps, class_labels=labels)
        output, _ = split_learned_variance(getattr(output, "sample", output), sample)
        prediction_type = self.scheduler.config.prediction_type
        return convert_prediction(output, sample, alphas_cumprod_t, prediction_type, "epsilon")

    def __call__(self, model, batch, randomness=None, encode_prompt=None):
        randomness = as_batch_randomness(randomness)
        original_samples, labels = batch["sample"], batch["class_labels"]
        timesteps, noise = draw_timesteps_and_noise(
            original_samples, self.scheduler.config.num_train_timesteps, randomness
        )
        other_labels = randomness.randint(self.num_classes, original_samples.shape[0]).to(labels.device)
        sample = self.scheduler.add_noise(original_samples, noise, timesteps).detach().requires_grad_(True)
        output = model(sample, timesteps)
        logits = getattr(output, "logits", output)
        cross_entropy = torch.nn.functional.cross_entropy(logits.float(), labels)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        selected = log_probs.gather(1, other_labels.reshape(-1, 1)).sum()
        (gradient,) = torch.autograd.grad(selected, sample, create_graph=True)
        alphas_cumprod_t = torch.as_tensor(self.scheduler.alphas_cumprod, device=sample.device)[timesteps]
        with torch.no_grad():
            conditional = self._noise_prediction(sample, timesteps, other_labels, alphas_cumprod_t)
            unconditional = self._noise_prediction(
                sample, timesteps, torch.full_like(other_labels, self.null_label), alphas_cumprod_t
            )
        noise_scale = broadcast_to((1 - alphas_cumprod_t).sqrt().to(gradient.dtype), gradient)
        residual = noise_scale * gradient + (conditional - unconditional).to(gradient.dtype)
        gradient_loss = residual.pow(2).flatten(1).mean(1).mean()
        loss = cross_entropy + self.weight * gradient_loss
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        return loss, {"accuracy": accuracy.detach(), "gradient_loss": gradient_loss.detach()}
