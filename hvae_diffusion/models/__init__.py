"""Models that pipelines use beside Diffusers' own: the noisy classifier and an MLP denoiser for vectors."""

from .mlp import MLPDenoiser, MLPNoisyClassifier
from .noisy_classifier import NoisyClassifier, NoisyClassifierOutput
