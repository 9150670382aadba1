"""hvae-diffusion: diffusion models as hierarchical VAEs, as Hugging Face Diffusers components."""

from .elbo import (
    ELBOTerms,
    bits_per_dim,
    denoising_matching_kl,
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    loss_weight,
    normal_kl,
    prior_matching_kl,
)
from .forward_process import (
    forward_step_sample,
    make_betas,
    posterior_mean,
    posterior_variance,
    q_sample,
    rescale_zero_terminal_snr,
    signal_to_noise_ratio,
)
from .guidance import classifier_free_guidance, classifier_guided_score
from .models import LearnedNoiseSchedule, MLPDenoiser, MLPNoisyClassifier, NoisyClassifier, NoisyClassifierOutput
from .parameterization import (
    PREDICTION_TYPES,
    convert_prediction,
    epsilon_from_sample,
    epsilon_from_score,
    epsilon_from_velocity,
    posterior_mean_from_prediction,
    sample_from_epsilon,
    score_from_epsilon,
    training_target,
    velocity,
    velocity_from_epsilon,
)
from .pipelines import ClassifierFreeGuidancePipeline, ClassifierGuidedPipeline, HVAEPipeline
from .scheduling_hvae import HVAEScheduler

__version__ = "0.1.0"
