"""Models that pipelines use beside Diffusers' own: the noisy classifier, an MLP denoiser for vectors and the learned
noise schedule."""

from .mlp import MLPDenoiser, MLPNoisyClassifier
from .noise_schedule import LearnedNoiseSchedule
from .noisy_classifier import NoisyClassifier, NoisyClassifierOutput
