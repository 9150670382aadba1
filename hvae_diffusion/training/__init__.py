"""Training and evaluation: data loading, losses, the Accelerate training loop, evaluation and Hub upload."""

from .data import image_dataset_to_tensors, load_digits_dataset, load_image_dataset
from .loop import NonFiniteLossError, TrainingConfig, TrainingResult, train
from .losses import BatchRandomness, DiffusionLoss, NoisyClassifierLoss
