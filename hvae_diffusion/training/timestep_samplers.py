"""How training draws the timestep of each example: uniformly, or by importance as improved DDPM does.

Improved DDPM (Nichol & Dhariwal 2021, section 3.3) samples t ∝ √E[L_t²], the root second moment of the per-timestep
loss, and weighs each drawn loss by 1/(T p(t)), so that the weighted loss stays an unbiased estimate of the uniform
average (1/T) Σ_t E[L_t] while its variance falls:

    E_{t∼p}[L_t / (T p(t))] = Σ_t p(t) L_t / (T p(t)) = (1/T) Σ_t L_t.

E[L_t²] is estimated from the last ``history_per_term`` losses seen at each t. Until every t has that many, the
sampler stays uniform (the warm-up), and afterwards it mixes in the uniform distribution with weight
``uniform_probability`` so that no t is starved. The history is part of a run's state: ``state_dict`` is plain JSON
(a checkpoint writes it next to the weights), and every process must feed ``update`` the losses of the whole global
batch in the same order (the training loop gathers them), so the proposal is identical on every process.
"""

import numpy as np
import torch

TIMESTEP_SAMPLERS = ("uniform", "importance")


def importance_weights(probabilities: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """1 / (T p(t)) for drawn timesteps: the weight that keeps E_p[weight · L_t] = (1/T) Σ_t L_t."""
    return 1.0 / (len(probabilities) * probabilities[timesteps])


class UniformTimestepSampler:
    """t ~ U{0..T−1}, every weight 1 (the draw is the ``randint`` the loss made before samplers existed)."""

    def __init__(self, num_timesteps: int):
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        self.num_timesteps = num_timesteps

    def probabilities(self) -> torch.Tensor:
        """p(t) over 0..T−1, float64."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, randomness, batch_size: int):
        """``(timesteps [B] long, weights [B] float64)`` for this process's rows of the global batch."""
        timesteps = randomness.randint(self.num_timesteps, batch_size)
        return timesteps, torch.ones(batch_size, dtype=torch.float64)

    def update(self, timesteps, losses) -> None:
        """The uniform sampler keeps no history."""

    def state_dict(self) -> dict:
        return {"sampler": "uniform", "num_timesteps": self.num_timesteps}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, "uniform")

    def _check_state(self, state, name):
        if state.get("sampler") != name or state.get("num_timesteps") != self.num_timesteps:
            raise ValueError(
                f"the checkpoint's timestep sampler is {state.get('sampler')!r} over {state.get('num_timesteps')} "
                f"timesteps, this run's is {name!r} over {self.num_timesteps}: resume with the same "
                "--timestep_sampler and --num_train_timesteps"
            )


class LossSecondMomentTimestepSampler(UniformTimestepSampler):
    """t ~ p(t) ∝ √(mean of the last ``history_per_term`` squared losses at t), mixed with U{0..T−1}.

    Uniform until every t has ``history_per_term`` losses (improved DDPM's ``LossSecondMomentResampler``, whose
    defaults these are). Draws use one uniform number per row of the global batch, inverted through p's CDF.
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_probability: float = 0.001):
        super().__init__(num_timesteps)
        if isinstance(history_per_term, bool) or not isinstance(history_per_term, int) or history_per_term < 1:
            raise ValueError(f"history_per_term must be a positive int, got {history_per_term!r}")
        if not 0.0 < uniform_probability <= 1.0:
            raise ValueError(f"uniform_probability must lie in (0, 1], got {uniform_probability!r}")
        self.history_per_term = history_per_term
        self.uniform_probability = float(uniform_probability)
        self.history = np.zeros((num_timesteps, history_per_term), dtype=np.float64)
        self.counts = np.zeros(num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history_per_term).all())

    def probabilities(self) -> torch.Tensor:
        if not self.warmed_up():
            return super().probabilities()
        root_second_moment = np.sqrt(np.mean(self.history**2, axis=-1))
        probabilities = root_second_moment / root_second_moment.sum()
        probabilities = probabilities * (1 - self.uniform_probability) + self.uniform_probability / self.num_timesteps
        return torch.from_numpy(probabilities)

    def sample(self, randomness, batch_size: int):
        if not self.warmed_up():
            return super().sample(randomness, batch_size)
        probabilities = self.probabilities()
        cumulative = torch.cumsum(probabilities, dim=0)
        uniforms = randomness.rand(batch_size).double() * cumulative[-1]
        timesteps = torch.searchsorted(cumulative, uniforms, right=True).clamp(max=self.num_timesteps - 1)
        return timesteps, importance_weights(probabilities, timesteps)

    def update(self, timesteps, losses) -> None:
        """Append each (t, loss) of the global batch, in order, to t's history (the oldest leaves a full one)."""
        timesteps = torch.as_tensor(timesteps).reshape(-1).tolist()
        losses = torch.as_tensor(losses, dtype=torch.float64).reshape(-1).tolist()
        if len(timesteps) != len(losses):
            raise ValueError(f"{len(timesteps)} timesteps but {len(losses)} losses")
        for timestep, loss in zip(timesteps, losses):
            if self.counts[timestep] == self.history_per_term:
                self.history[timestep, :-1] = self.history[timestep, 1:]
                self.history[timestep, -1] = loss
            else:
                self.history[timestep, self.counts[timestep]] = loss
                self.counts[timestep] += 1

    def state_dict(self) -> dict:
        """JSON-ready: the settings, each t's count and its losses (Python floats round-trip exactly in JSON)."""
        return {
            "sampler": "importance",
            "num_timesteps": self.num_timesteps,
            "history_per_term": self.history_per_term,
            "uniform_probability": self.uniform_probability,
            "counts": self.counts.tolist(),
            "history": self.history.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, "importance")
        history = np.asarray(state["history"], dtype=np.float64)
        counts = np.asarray(state["counts"], dtype=np.int64)
        if history.shape != self.history.shape or counts.shape != self.counts.shape:
            raise ValueError(
                f"the checkpoint's loss history has shape {history.shape}, this sampler's {self.history.shape}"
            )
        self.history_per_term = int(state["history_per_term"])
        self.uniform_probability = float(state["uniform_probability"])
        self.history, self.counts = history, counts


def make_timestep_sampler(name: str, num_timesteps: int):
    """The sampler ``--timestep_sampler`` names: ``"uniform"`` or ``"importance"``."""
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(f"--timestep_sampler must be one of {TIMESTEP_SAMPLERS}, got {name!r}")
    if name == "uniform":
        return UniformTimestepSampler(num_timesteps)
    return LossSecondMomentTimestepSampler(num_timesteps)
