"""Importance-sampled timesteps in training (improved DDPM's LossSecondMomentResampler): the proposal, its
unbiased weighting, the loss history's life in checkpoints and across processes."""

import json
import threading

import numpy as np
import pytest
import torch

from hvae_diffusion import HVAEScheduler, LearnedNoiseSchedule
from hvae_diffusion.models import MLPDenoiser
from hvae_diffusion.training.loop import TrainingConfig, list_checkpoints, train
from hvae_diffusion.training.losses import BatchRandomness, DiffusionLoss, LearnedScheduleLoss
from hvae_diffusion.training.timestep_samplers import (
    LossSecondMomentTimestepSampler,
    UniformTimestepSampler,
    importance_weights,
    make_timestep_sampler,
)


def warmed_sampler(num_timesteps=6, history_per_term=3, uniform_probability=0.05, seed=0):
    sampler = LossSecondMomentTimestepSampler(num_timesteps, history_per_term, uniform_probability)
    generator = torch.Generator().manual_seed(seed)
    timesteps = torch.arange(num_timesteps).repeat(history_per_term + 1)
    # losses growing with t and spread within each t, one more than the history holds (the oldest drops out)
    losses = (1 + timesteps).double() * (0.5 + torch.rand(len(timesteps), generator=generator, dtype=torch.float64))
    sampler.update(timesteps, losses)
    return sampler, timesteps, losses


def test_proposal_is_the_root_second_moment_of_the_last_losses_mixed_with_uniform():
    sampler, timesteps, losses = warmed_sampler()
    assert sampler.warmed_up()
    expected = np.empty(6)
    for t in range(6):
        last = losses[timesteps == t].numpy()[-3:]  # the newest history_per_term losses of t
        expected[t] = np.sqrt(np.mean(last**2))
    expected = 0.95 * expected / expected.sum() + 0.05 / 6
    assert np.allclose(sampler.probabilities().numpy(), expected, rtol=1e-14, atol=0)


def test_uniform_until_every_timestep_has_its_history():
    sampler = LossSecondMomentTimestepSampler(5, history_per_term=2)
    uniform = UniformTimestepSampler(5)
    sampler.update(torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3]), torch.arange(9.0))  # t = 4 has one loss only
    assert not sampler.warmed_up()
    ours = sampler.sample(BatchRandomness(torch.Generator().manual_seed(1)), 32)
    reference = uniform.sample(BatchRandomness(torch.Generator().manual_seed(1)), 32)
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    sampler.update(torch.tensor([4]), torch.tensor([1.0]))
    assert sampler.warmed_up()


def test_importance_weighting_keeps_the_expected_loss_exactly_the_uniform_one():
    sampler, _, _ = warmed_sampler()
    probabilities = sampler.probabilities()
    per_timestep_loss = torch.tensor([0.3, 2.0, 0.1, 5.0, 1.0, 0.7], dtype=torch.float64)
    all_timesteps = torch.arange(6)
    expected = (probabilities * importance_weights(probabilities, all_timesteps) * per_timestep_loss).sum()
    assert expected.item() == pytest.approx(per_timestep_loss.mean().item(), rel=1e-14)
    # and the draws follow p: the weighted Monte Carlo mean is unbiased, the frequencies are p
    timesteps, weights = sampler.sample(BatchRandomness(torch.Generator().manual_seed(0)), 200_000)
    estimate = weights * per_timestep_loss[timesteps]
    standard_error = estimate.std() / len(estimate) ** 0.5
    assert abs(estimate.mean() - per_timestep_loss.mean()) < 4 * standard_error
    frequencies = torch.bincount(timesteps, minlength=6).double() / len(timesteps)
    assert torch.allclose(frequencies, probabilities, atol=4 * (0.25 / len(timesteps)) ** 0.5)
    assert not torch.allclose(probabilities, torch.full((6,), 1 / 6, dtype=torch.float64), atol=0.02)


def test_state_round_trips_through_json_exactly_and_refuses_another_sampler():
    sampler, _, _ = warmed_sampler(seed=3)
    restored = LossSecondMomentTimestepSampler(6, 3, 0.05)
    restored.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    assert np.array_equal(restored.history, sampler.history) and np.array_equal(restored.counts, sampler.counts)
    assert torch.equal(restored.probabilities(), sampler.probabilities())
    draws = [s.sample(BatchRandomness(torch.Generator().manual_seed(9)), 64) for s in (sampler, restored)]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    with pytest.raises(ValueError, match="--timestep_sampler"):
        UniformTimestepSampler(6).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="--timestep_sampler"):
        LossSecondMomentTimestepSampler(7).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="--timestep_sampler must be one of"):
        make_timestep_sampler("sorted", 6)


def vector_batch(batch_size, seed, offset=0):
    generator = torch.Generator().manual_seed(seed)
    samples = torch.randn(offset + batch_size, 2, generator=generator)[offset:]
    return {"sample": samples}


def test_every_process_keeps_the_history_of_the_whole_global_batch():
    """Two processes (threads with Accelerator.gather's semantics: concatenation in process order) keep identical
    histories, equal to that of one process drawing the same global batch."""
    torch.manual_seed(0)
    model = MLPDenoiser(in_channels=2, hidden_dim=16, num_blocks=1)
    scheduler = HVAEScheduler(num_train_timesteps=8)

    def loss_for(num_processes):
        sampler = LossSecondMomentTimestepSampler(8, history_per_term=2)
        return DiffusionLoss(scheduler, weighting="elbo", timestep_sampler=sampler)

    single = loss_for(1)
    pair = [loss_for(2), loss_for(2)]
    barrier, slots = threading.Barrier(2), [None, None]

    def gather_for(index):
        def gather(tensor):
            slots[index] = tensor
            barrier.wait()
            gathered = torch.cat(slots)
            barrier.wait()
            return gathered

        return gather

    for step in range(12):  # past the warm-up, so later steps draw by importance
        single(model, vector_batch(32, step), BatchRandomness(torch.Generator().manual_seed(step)))
        single.update_timestep_sampler(lambda tensor: tensor)

        def process(index, step=step):
            randomness = BatchRandomness(torch.Generator().manual_seed(step), 2, index)
            pair[index](model, vector_batch(16, step, offset=16 * index), randomness)
            pair[index].update_timestep_sampler(gather_for(index))

        threads = [threading.Thread(target=process, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert single.timestep_sampler.warmed_up()
    for loss_fn in pair:
        assert np.array_equal(loss_fn.timestep_sampler.counts, single.timestep_sampler.counts)
        assert np.allclose(loss_fn.timestep_sampler.history, single.timestep_sampler.history, rtol=1e-6, atol=0)
    assert np.array_equal(pair[0].timestep_sampler.history, pair[1].timestep_sampler.history)


class Interrupt(Exception):
    pass


def run(tmp_path, name, make_loss, interrupt_at=None, **overrides):
    torch.manual_seed(0)
    model = MLPDenoiser(in_channels=2, hidden_dim=16, num_blocks=1)
    loss_fn = make_loss()
    calls = {"count": 0}

    def maybe_dying_loss(model, batch, randomness, encode_prompt=None):
        calls["count"] += 1
        if calls["count"] == interrupt_at:
            raise Interrupt
        return loss_fn(model, batch, randomness)

    maybe_dying_loss.trainable_modules = getattr(loss_fn, "trainable_modules", {})
    maybe_dying_loss.timestep_sampler = loss_fn.timestep_sampler
    maybe_dying_loss.update_timestep_sampler = loss_fn.update_timestep_sampler
    settings = dict(
        output_dir=str(tmp_path / name),
        train_batch_size=16,
        max_train_steps=8,
        learning_rate=1e-2,
        checkpointing_steps=3,
        gradient_accumulation_steps=2,
        report_to=None,
        seed=7,
    )
    settings.update(overrides)
    saved = {}
    train(
        TrainingConfig(**settings),
        model,
        maybe_dying_loss,
        torch.utils.data.TensorDataset(torch.randn(64, 2, generator=torch.Generator().manual_seed(1))),
        save_fn=lambda m, d: saved.update(state={k: v.clone() for k, v in m.state_dict().items()}),
    )
    return saved["state"], loss_fn


def importance_loss():
    sampler = LossSecondMomentTimestepSampler(6, history_per_term=2)
    return DiffusionLoss(HVAEScheduler(num_train_timesteps=6), weighting="elbo", timestep_sampler=sampler)


def learned_schedule_loss():
    schedule = LearnedNoiseSchedule(initial_gamma_0=-6.0, initial_gamma_1=4.0, num_features=4)
    sampler = LossSecondMomentTimestepSampler(5, history_per_term=2)
    return LearnedScheduleLoss(HVAEScheduler(num_train_timesteps=6), schedule, sampler)


@pytest.mark.parametrize("make_loss", [importance_loss, learned_schedule_loss])
def test_killed_and_resumed_run_continues_the_loss_history_bitwise(tmp_path, make_loss):
    reference, whole = run(tmp_path, "whole", make_loss)
    assert whole.timestep_sampler.warmed_up()  # the importance draws, not only the warm-up, are exercised
    with pytest.raises(Interrupt):
        run(tmp_path, "resumed", make_loss, interrupt_at=10)  # micro-batch 10 = step 5, after checkpoint-3
    assert [step for step, _ in list_checkpoints(str(tmp_path / "resumed"))] == [3]
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    assert json.loads((checkpoint / "timestep_sampler.json").read_text())["sampler"] == "importance"
    final, resumed = run(tmp_path, "resumed", make_loss, resume_from_checkpoint="latest")
    for key in reference:
        assert torch.equal(reference[key], final[key]), key
    assert np.array_equal(resumed.timestep_sampler.history, whole.timestep_sampler.history)
    for name, module in getattr(whole, "trainable_modules", {}).items():
        for key, value in module.state_dict().items():
            assert torch.equal(resumed.trainable_modules[name].state_dict()[key], value), (name, key)
