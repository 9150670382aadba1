"""Figures of every stage of the diffusion hierarchical VAE, drawn from the library's own computations.

One function per figure. Each writes a PNG to ``path`` and returns the numbers it plotted (tensors or numpy arrays
in a dict), so a test can check that they are the library's: the plotted ᾱ_t is the scheduler's, the exact score is
``GaussianMixture.score``, the ELBO terms are ``elbo.elbo_terms``, the samples are the pipelines'.

Matplotlib is used through ``matplotlib.figure.Figure`` only (never ``pyplot``), so the PNGs are rendered with the
Agg canvas, no display is needed and no global state is touched.

1. ``plot_forward_process``: data dissolving into N(0, I) under q(x_t | x_0), and ᾱ_t, SNR(t) per schedule.
2. ``plot_reverse_trajectories``: sampling paths x_T → x_0 of a pipeline over the data density.
3. ``plot_score_field``: a model's score ∇log p(x_t) beside the exact score of a Gaussian mixture, and the error.
4. ``plot_elbo_terms``: the ELBO's three terms and bits/dim, for several trained objectives side by side.
5. ``plot_guidance``: one class sampled under classifier guidance (several γ) and classifier-free guidance (several w).
6. ``plot_denoising_grid``: x_t and the predicted x̂_0 at several steps of one sampling run of an image pipeline.
"""

import math
import os

import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from .elbo import elbo_terms
from .forward_process import BETA_SCHEDULES, signal_to_noise_ratio

_CLASS_COLORS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)


def _save(figure: Figure, path) -> str:
    """Write ``figure`` as a PNG at ``path`` (creating its folder) and return the path."""
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"path must end in .png, got {path!r}")
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _check_vectors(samples, name: str) -> torch.Tensor:
    samples = torch.as_tensor(samples)
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"{name} must be 2-D points of shape [N, 2], got {tuple(samples.shape)}")
    return samples


def _square_axes(axes, extent: float, title: str | None = None) -> None:
    axes.set_xlim(-extent, extent)
    axes.set_ylim(-extent, extent)
    axes.set_aspect("equal")
    axes.set_xticks([])
    axes.set_yticks([])
    if title is not None:
        axes.set_title(title, fontsize=9)


def _data_background(axes, reference_samples) -> None:
    """The data as small grey points behind a plot."""
    reference = _check_vectors(reference_samples, "reference_samples").double().cpu().numpy()
    axes.scatter(reference[:, 0], reference[:, 1], s=0.5, color="0.78", rasterized=True)


# ---------------------------------------------------------------------------------------------------- figure 1


def plot_forward_process(
    original_samples,
    path,
    scheduler=None,
    timesteps=(0, 50, 100, 200, 400, 999),
    schedules=BETA_SCHEDULES,
    generator: torch.Generator | None = None,
    extent: float = 3.5,
) -> dict:
    """Figure 1: the fixed encoder. Data x_0 at several t under q(x_t | x_0), and ᾱ_t and SNR(t) per schedule.

    The top row draws x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (``scheduler.add_noise``) with one ε for all panels, so each
    point can be followed as it dissolves into N(0, I). The bottom row draws ᾱ_t and log₁₀ SNR(t) for each named
    schedule of an ``HVAEScheduler`` with ``scheduler``'s number of timesteps.

    Args:
        original_samples: x_0, 2-D points ``[N, 2]``.
        scheduler: the ``HVAEScheduler`` whose ᾱ_t makes the top row (the default linear one if None).
        timesteps: the t of the top row's panels.
        schedules: the ``beta_schedule`` names of the bottom row.
    Returns:
        ``{"timesteps", "noise" [N, 2], "noisy_samples" [len(timesteps), N, 2], "alphas_cumprod": {name: [T]},
        "snr": {name: [T]}}`` (float64 numpy arrays for the curves).
    """
    from .scheduling_hvae import HVAEScheduler

    original_samples = _check_vectors(original_samples, "original_samples").float()
    scheduler = HVAEScheduler() if scheduler is None else scheduler
    num_train_timesteps = scheduler.config.num_train_timesteps
    timesteps = [int(t) for t in timesteps]
    if not timesteps or any(not 0 <= t < num_train_timesteps for t in timesteps):
        raise ValueError(f"timesteps must be a non-empty list in [0, {num_train_timesteps}), got {timesteps}")
    if not schedules or any(name not in BETA_SCHEDULES for name in schedules):
        raise ValueError(f"schedules must be a non-empty list of {BETA_SCHEDULES}, got {schedules}")

    noise = torch.randn(original_samples.shape, generator=generator)
    noisy_samples = torch.stack(
        [scheduler.add_noise(original_samples, noise, torch.full((len(noise),), t)) for t in timesteps]
    )
    alphas_cumprod, snr = {}, {}
    for name in schedules:
        schedule = HVAEScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=name)
        alphas_cumprod[name] = schedule.alphas_cumprod.numpy()
        snr[name] = signal_to_noise_ratio(schedule.alphas_cumprod).numpy()

    figure = Figure(figsize=(2.2 * max(len(timesteps), 4), 5.6))
    grid = figure.add_gridspec(2, 2 * len(timesteps), height_ratios=[1, 1.1], hspace=0.35)
    for column, (t, points) in enumerate(zip(timesteps, noisy_samples)):
        axes = figure.add_subplot(grid[0, 2 * column : 2 * column + 2])
        axes.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5, color="tab:blue")
        alpha_bar = float(scheduler.alphas_cumprod[t])
        _square_axes(axes, extent, f"t = {t}\nᾱ_t = {alpha_bar:.3g}")
    half = len(timesteps)
    curve_axes = figure.add_subplot(grid[1, :half])
    snr_axes = figure.add_subplot(grid[1, half:])
    steps = np.arange(num_train_timesteps)
    for name in schedules:
        curve_axes.plot(steps, alphas_cumprod[name], label=name)
        snr_axes.plot(steps, np.log10(snr[name]), label=name)
    curve_axes.set(xlabel="t", ylabel="ᾱ_t", title="signal kept: ᾱ_t = Π α_s")
    snr_axes.set(xlabel="t", ylabel="log₁₀ SNR(t)", title="SNR(t) = ᾱ_t / (1 − ᾱ_t)")
    curve_axes.legend(fontsize=8)
    snr_axes.legend(fontsize=8)
    figure.suptitle("Forward process q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I): the data dissolves into N(0, I)")
    _save(figure, path)
    return {
        "timesteps": timesteps,
        "noise": noise,
        "noisy_samples": noisy_samples,
        "alphas_cumprod": alphas_cumprod,
        "snr": snr,
    }


# ---------------------------------------------------------------------------------------------------- figure 3


def _grid_points(extent: float, grid_size: int) -> torch.Tensor:
    axis = torch.linspace(-extent, extent, grid_size, dtype=torch.float64)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def model_score(model, scheduler, sample: torch.Tensor, timestep: int, class_labels=None) -> torch.Tensor:
    """A denoiser's estimate of ∇log p(x_t) at one timestep: its output converted with ``scheduler.convert_model_output``."""
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    model_input = sample.to(device=device, dtype=dtype)
    timesteps = torch.full((len(sample),), int(timestep), dtype=torch.long, device=device)
    with torch.no_grad():
        output = model(model_input, timesteps, class_labels=class_labels).sample
        score = scheduler.convert_model_output(output, model_input, timesteps, "score")
    return score.double().cpu()


def plot_score_field(
    mixture,
    path,
    scheduler,
    model=None,
    timesteps=(10, 100, 300),
    grid_size: int = 17,
    extent: float = 2.5,
) -> dict:
    """Figure 3: the exact score of a Gaussian mixture at a few t, beside a model's learned score and the error.

    Arrows show (1 − ᾱ_t) ∇log p(x_t): by Tweedie's formula this is √ᾱ_t E[x_0 | x_t] − x_t, the step from x_t toward
    the (scaled) expected clean point; arrows are drawn to one scale per column. The error panel shows √(1 − ᾱ_t) ‖ŝ − ∇log p(x_t)‖,
    the error in noise units (= ‖ε̂ − ε*‖), the quantity the ε objective penalizes.

    Args:
        mixture: a ``hvae_diffusion.testing.GaussianMixture`` over 2-D points (its ``score`` is the truth).
        scheduler: an ``HVAEScheduler`` (gives ᾱ_t and converts the model's output to a score).
        model: a denoiser called like ``UNet2DModel`` in ``scheduler.config.prediction_type``; None draws only
            the exact row.
        timesteps: the t of the columns; grid_size, extent: the evaluation grid, ``grid_size``² points in
            [−extent, extent]².
    Returns:
        ``{"timesteps", "grid" [G², 2], "exact_score" [len(timesteps), G², 2]}`` and, with a model,
        ``"learned_score"`` and ``"error"`` ([len(timesteps), G²]); float64 tensors.
    """
    if mixture.dim != 2:
        raise ValueError(f"mixture must be over 2-D points, got dimension {mixture.dim}")
    timesteps = [int(t) for t in timesteps]
    num_train_timesteps = scheduler.config.num_train_timesteps
    if not timesteps or any(not 0 <= t < num_train_timesteps for t in timesteps):
        raise ValueError(f"timesteps must be a non-empty list in [0, {num_train_timesteps}), got {timesteps}")
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 2:
        raise ValueError(f"grid_size must be an int ≥ 2, got {grid_size!r}")

    grid = _grid_points(extent, grid_size)
    alphas_cumprod = [float(scheduler.alphas_cumprod[t]) for t in timesteps]
    exact = torch.stack([mixture.score(grid, alpha_bar) for alpha_bar in alphas_cumprod])
    result = {"timesteps": timesteps, "grid": grid, "exact_score": exact}
    rows = [("exact ∇log q(x_t)", exact, "tab:blue")]
    if model is not None:
        learned = torch.stack([model_score(model, scheduler, grid, t) for t in timesteps])
        error = (learned - exact).norm(dim=-1) * torch.tensor([(1 - a) ** 0.5 for a in alphas_cumprod]).unsqueeze(1)
        result.update(learned_score=learned, error=error)
        rows.insert(0, ("learned ŝ_θ(x_t)", learned, "tab:red"))

    fine_grid = _grid_points(extent, 120)
    spacing = 2 * extent / (grid_size - 1)
    figure = Figure(figsize=(3.2 * len(timesteps), 3.2 * (len(rows) + (model is not None))))
    axes_grid = figure.subplots(len(rows) + (model is not None), len(timesteps), squeeze=False)
    for column, (t, alpha_bar) in enumerate(zip(timesteps, alphas_cumprod)):
        log_density = mixture.log_prob(fine_grid, alpha_bar).reshape(120, 120).numpy()
        for row, (label, scores, color) in enumerate(rows):
            axes = axes_grid[row, column]
            axes.imshow(np.exp(log_density), extent=(-extent, extent, -extent, extent), origin="lower", cmap="Greys")
            arrows = (1 - alpha_bar) * scores[column]
            # one scale per column (shared by the rows, so learned and exact compare): longest arrow = 1.2 cells
            longest = float((1 - alpha_bar) * exact[column].norm(dim=-1).max())
            axes.quiver(
                grid[:, 0],
                grid[:, 1],
                arrows[:, 0],
                arrows[:, 1],
                color=color,
                angles="xy",
                scale_units="xy",
                scale=longest / (1.2 * spacing),
                width=0.005,
            )
            _square_axes(axes, extent, f"{label}, t = {t} (ᾱ_t = {alpha_bar:.3g})")
        if model is not None:
            axes = axes_grid[-1, column]
            image = axes.imshow(
                result["error"][column].reshape(grid_size, grid_size).numpy(),
                origin="lower",
                extent=(-extent, extent, -extent, extent),
                cmap="magma",
            )
            figure.colorbar(image, ax=axes, fraction=0.046)
            axes.contour(
                *np.meshgrid(np.linspace(-extent, extent, 120), np.linspace(-extent, extent, 120)),
                log_density,
                levels=4,
                colors="white",
                linewidths=0.5,
            )
            _square_axes(axes, extent, f"error ‖ε̂ − ε*‖, t = {t}")
    figure.suptitle(
        "Score field over the density of x_t. Arrows: (1 − ᾱ_t) ∇log p(x_t) = √ᾱ_t E[x_0 | x_t] − x_t"
        " (Tweedie), scaled per column.\nError: √(1 − ᾱ_t) ‖ŝ_θ − ∇log q(x_t)‖ = ‖ε̂ − ε*‖ (noise units).",
        fontsize=10,
    )
    _save(figure, path)
    return result


# ---------------------------------------------------------------------------------------------------- figure 4


def plot_elbo_terms(models, original_samples, path, seed: int = 0, discrete: bool = False) -> dict:
    """Figure 4: the ELBO's three terms for trained denoisers, side by side (``elbo.elbo_terms``).

    Left: the denoising-matching term KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) per t (batch mean, nats).
    Right: −reconstruction E[−log p_θ(x_0 | x_1)], the prior-matching KL(q(x_T | x_0) ‖ N(0, I)), the summed
    denoising-matching terms and their total −ELBO (nats per sample), with bits/dim = −ELBO / (D ln 2) in the legend.

    Args:
        models: ``{label: (denoiser, scheduler)}``; each scheduler's current chain (``scheduler.timesteps``) is
            evaluated, one denoiser call per latent.
        original_samples: x_0, ``[B, D]``.
        seed: the seed of the noise of every x_t (the same for all models).
        discrete: the 8-bit reconstruction term (image data in [−1, 1]); False for continuous data like the toy.
    Returns:
        ``{label: {"terms": ELBOTerms, "timesteps", "denoising_matching" [num_terms] (batch means),
        "reconstruction", "prior_matching", "denoising_matching_total", "negative_elbo", "bits_per_dim"}}``
        (floats are batch means in nats, bits_per_dim in bits).
    """
    if not models:
        raise ValueError("models must be a non-empty dict {label: (denoiser, scheduler)}")
    original_samples = torch.as_tensor(original_samples)
    result = {}
    for label, (denoiser, scheduler) in models.items():
        terms = elbo_terms(
            scheduler, denoiser, original_samples, generator=torch.Generator().manual_seed(seed), discrete=discrete
        )
        result[label] = {
            "terms": terms,
            "timesteps": terms.timesteps.numpy(),
            "denoising_matching": terms.denoising_matching.double().mean(dim=0).numpy(),
            "reconstruction": float(terms.reconstruction.double().mean()),
            "prior_matching": float(terms.prior_matching.double().mean()),
            "denoising_matching_total": float(terms.denoising_matching_total.double().mean()),
            "negative_elbo": float(-terms.elbo.double().mean()),
            "bits_per_dim": float(terms.bits_per_dim.double().mean()),
        }

    figure = Figure(figsize=(14, 4.6))
    curve_axes, bar_axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    bar_names = (
        "−reconstruction\nE[−log p_θ(x_0|x_1)]",
        "prior matching\nKL(q(x_T|x_0)‖N(0,I))",
        "Σ_t denoising\nmatching",
        "−ELBO\n(total)",
    )
    width = 0.8 / len(result)
    for index, (label, values) in enumerate(result.items()):
        curve_axes.plot(values["timesteps"], values["denoising_matching"], label=label, linewidth=1)
        heights = [
            -values["reconstruction"],
            values["prior_matching"],
            values["denoising_matching_total"],
            values["negative_elbo"],
        ]
        positions = np.arange(len(bar_names)) + (index - (len(result) - 1) / 2) * width
        bars = bar_axes.bar(positions, heights, width=width, label=f"{label}: {values['bits_per_dim']:.3f} bits/dim")
        bar_axes.bar_label(bars, fmt="%.2f", fontsize=6)
    curve_axes.set_yscale("log")
    curve_axes.set(
        xlabel="t", ylabel="KL (nats)", title="denoising matching KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t))"
    )
    curve_axes.legend(fontsize=8)
    bar_axes.axhline(0, color="black", linewidth=0.5)
    bar_axes.set_xticks(np.arange(len(bar_names)), bar_names, fontsize=7)
    bar_axes.set(ylabel="nats per sample", title="−ELBO = −reconstruction + prior + Σ denoising")
    bar_axes.legend(fontsize=8)
    figure.suptitle("The ELBO of the hierarchical VAE, term by term, per training objective")
    _save(figure, path)
    return result


# ---------------------------------------------------------------------------------------------------- pipelines


def load_pipeline(pipeline):
    """A pipeline object as is, or a saved pipeline folder loaded with ``DiffusionPipeline.from_pretrained``."""
    if isinstance(pipeline, (str, os.PathLike)):
        from diffusers import DiffusionPipeline

        if not os.path.isdir(pipeline):
            raise ValueError(f"pipeline folder {os.fspath(pipeline)!r} does not exist")
        return DiffusionPipeline.from_pretrained(pipeline)
    if not callable(pipeline) or not hasattr(pipeline, "unet"):
        raise TypeError(
            f"pipeline must be a pipeline with a unet or a saved pipeline folder, got {type(pipeline).__name__}"
        )
    return pipeline


def _is_vector_pipeline(pipeline) -> bool:
    return getattr(pipeline.unet.config, "sample_size", None) is None


class _LatentRecorder:
    """A ``callback_on_step_end`` that keeps a copy of the latents after every step (on the CPU)."""

    def __init__(self):
        self.latents = []

    def __call__(self, pipeline, step_index, timestep, callback_kwargs):
        self.latents.append(callback_kwargs["latents"].detach().cpu().clone())
        return callback_kwargs


def _initial_latents(pipeline, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """x_T ~ N(0, I) for ``pipeline`` from ``seed`` (drawn as the pipelines draw it) and the generator, advanced past it."""
    from diffusers.utils.torch_utils import randn_tensor

    from .pipelines.sampling import sample_shape

    generator = torch.Generator().manual_seed(seed)
    latents = randn_tensor(
        sample_shape(pipeline.unet.config, batch_size), generator=generator, dtype=pipeline.unet.dtype
    )
    return latents, generator


def _tile_images(images: torch.Tensor) -> np.ndarray:
    """Images ``[B, C, H, W]`` in [−1, 1] as one near-square ``image_grid`` (white padding), an ``[H', W']`` or
    ``[H', W', 3]`` array in [0, 1]."""
    from .training.evaluation import image_grid

    columns = math.ceil(math.sqrt(images.shape[0]))
    grid = image_grid(images.detach().float().cpu(), num_columns=columns, min_cell_pixels=1, padding_value=255)
    grid = np.asarray(grid, dtype=np.float32) / 255
    return grid if grid.ndim == 2 else grid[:, :, :3]


def _show_images(axes, images: torch.Tensor, title: str) -> None:
    grid = _tile_images(images)
    axes.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title, fontsize=9)


# ---------------------------------------------------------------------------------------------------- figure 2


def plot_reverse_trajectories(
    pipeline,
    path,
    num_samples: int = 500,
    num_inference_steps: int = 100,
    seed: int = 0,
    reference_samples=None,
    num_trajectories: int = 8,
    extent: float = 3.5,
    call_kwargs: dict | None = None,
) -> dict:
    """Figure 2: the reverse process. Paths x_T → x_0 of a vector pipeline's sampling run over the data density.

    The pipeline is called once with ``output_type="latent"`` and a ``callback_on_step_end`` that records the
    latents after every ``scheduler.step``: left, ``num_trajectories`` paths over the density of
    ``reference_samples``; right, the whole batch at a few steps of the chain.

    Args:
        pipeline: a pipeline of a 2-D vector model (``unet.config.sample_size`` None, ``in_channels`` 2), or its folder.
        num_samples, num_inference_steps, seed: the sampling run (x_T and every step's noise from ``seed``).
        reference_samples: data ``[N, 2]`` drawn in grey behind the samples (optional).
        call_kwargs: extra arguments of the pipeline call (for example ``class_labels``).
    Returns:
        ``{"timesteps" [S], "trajectories" [S + 1, N, 2] (index 0 is x_T, index k the latents after step k),
        "samples" [N, 2] (the pipeline's output)}``.
    """
    pipeline = load_pipeline(pipeline)
    if not _is_vector_pipeline(pipeline) or pipeline.unet.config.in_channels != 2:
        raise ValueError("pipeline must sample 2-D vectors (unet.config.sample_size None and in_channels 2)")
    latents, generator = _initial_latents(pipeline, num_samples, seed)
    recorder = _LatentRecorder()
    samples = pipeline(
        batch_size=num_samples,
        num_inference_steps=num_inference_steps,
        generator=generator,
        latents=latents,
        output_type="latent",
        callback_on_step_end=recorder,
        **(call_kwargs or {}),
    ).images
    trajectories = torch.stack([latents.cpu()] + recorder.latents).float()
    timesteps = pipeline.scheduler.timesteps.cpu()

    figure = Figure(figsize=(13, 5.2))
    grid = figure.add_gridspec(2, 4, width_ratios=[2.2, 1, 1, 1], wspace=0.08, hspace=0.2)
    main_axes = figure.add_subplot(grid[:, 0])
    if reference_samples is not None:
        _data_background(main_axes, reference_samples)
    shown = trajectories[:, :num_trajectories].numpy()
    for index in range(shown.shape[1]):
        segments = np.stack([shown[:-1, index], shown[1:, index]], axis=1)
        main_axes.add_collection(
            LineCollection(segments, cmap="viridis", array=np.linspace(0, 1, len(segments)), linewidths=0.8, alpha=0.8)
        )
    main_axes.scatter(
        shown[0, :, 0],
        shown[0, :, 1],
        marker="o",
        facecolors="none",
        edgecolors="black",
        s=18,
        label="x_T ~ N(0, I)",
        zorder=4,
    )
    main_axes.scatter(shown[-1, :, 0], shown[-1, :, 1], marker="*", color="tab:red", s=50, label="x_0", zorder=5)
    main_axes.legend(fontsize=8, loc="upper right")
    _square_axes(
        main_axes, extent, f"{shown.shape[1]} sampling paths x_T → x_0, coloured early (purple) → late (yellow)"
    )
    # the whole batch at x_T, at the latents nearest to a few noise levels (structure appears late), and at x_0
    num_train_timesteps = pipeline.scheduler.config.num_train_timesteps
    latent_timesteps = timesteps.tolist()  # trajectories[k] is the latent at timesteps[k] for k < len(timesteps)
    picks = [0]
    for fraction in (0.4, 0.2, 0.1, 0.04):
        nearest = int(np.argmin([abs(t - fraction * num_train_timesteps) for t in latent_timesteps]))
        if nearest not in picks:
            picks.append(nearest)
    picks.append(len(trajectories) - 1)
    for panel, pick in enumerate(picks[:6]):
        axes = figure.add_subplot(grid[panel // 3, 1 + panel % 3])
        if reference_samples is not None:
            _data_background(axes, reference_samples)
        points = trajectories[pick]
        is_output = pick == len(trajectories) - 1
        axes.scatter(points[:, 0], points[:, 1], s=1.5, alpha=0.7, color="tab:red" if is_output else "tab:blue")
        label = "x_0 (output)" if is_output else f"{'x_T' if pick == 0 else 'x_t'}, t = {latent_timesteps[pick]}"
        _square_axes(axes, extent, label)
    figure.suptitle("Reverse process: ancestral sampling x_{t−1} ~ p_θ(x_{t−1} | x_t), from N(0, I) to the data")
    _save(figure, path)
    return {"timesteps": timesteps, "trajectories": trajectories, "samples": samples}


# ---------------------------------------------------------------------------------------------------- figure 5


def plot_guidance(
    path,
    class_label: int,
    classifier_pipeline=None,
    classifier_scales=(0.0, 1.0, 4.0, 16.0),
    cfg_pipeline=None,
    guidance_scales=(0.0, 1.0, 3.0, 7.0),
    num_samples: int = 400,
    num_inference_steps: int = 100,
    seed: int = 0,
    reference_samples=None,
    extent: float = 3.5,
) -> dict:
    """Figure 5: samples of one class under classifier guidance (several γ) and classifier-free guidance (several w).

    Row 1: ``ClassifierGuidedPipeline`` with ``guidance_scale`` = γ, the score ∇log p(x_t) + γ ∇log p(y | x_t).
    Row 2: ``ClassifierFreeGuidancePipeline`` with ``guidance_scale`` = w, ε̃ = ε(x_t, ∅) + w (ε(x_t, y) − ε(x_t, ∅)).
    Every panel starts from the same x_T and noise (``seed``), so the panels differ only by the guidance. Vector
    models are drawn as points (over the density of ``reference_samples``), image models as a grid of images.

    Args:
        class_label: y, the class asked for.
        classifier_pipeline, cfg_pipeline: pipelines or saved pipeline folders; either may be None (its row is left out).
        classifier_scales, guidance_scales: γ and w of the panels.
    Returns:
        ``{"classifier_guidance": {γ: samples}, "classifier_free_guidance": {w: samples}}``, the raw samples
        (``output_type="latent"``: ``[N, D]`` vectors or ``[N, C, H, W]`` images in [−1, 1]).
    """
    rows = []
    if classifier_pipeline is not None:
        rows.append(
            (
                "classifier_guidance",
                load_pipeline(classifier_pipeline),
                "guidance_scale",
                "γ",
                list(classifier_scales),
            )
        )
    if cfg_pipeline is not None:
        rows.append(
            ("classifier_free_guidance", load_pipeline(cfg_pipeline), "guidance_scale", "w", list(guidance_scales))
        )
    if not rows:
        raise ValueError("give a classifier_pipeline, a cfg_pipeline or both")
    if any(not scales for *_, scales in rows):
        raise ValueError("classifier_scales and guidance_scales must be non-empty")

    result = {}
    for name, pipeline, argument, _, scales in rows:
        result[name] = {}
        for scale in scales:
            latents, generator = _initial_latents(pipeline, num_samples, seed)
            result[name][scale] = pipeline(
                class_labels=class_label,
                batch_size=num_samples,
                generator=generator,
                latents=latents,
                num_inference_steps=num_inference_steps,
                output_type="latent",
                **{argument: scale},
            ).images.cpu()

    columns = max(len(scales) for *_, scales in rows)
    figure = Figure(figsize=(3.0 * columns, 3.2 * len(rows)))
    axes_grid = figure.subplots(len(rows), columns, squeeze=False)
    for row, (name, pipeline, argument, symbol, scales) in enumerate(rows):
        kind = "classifier guidance" if name == "classifier_guidance" else "classifier-free guidance"
        for column in range(columns):
            axes = axes_grid[row, column]
            if column >= len(scales):
                axes.set_axis_off()
                continue
            samples = result[name][scales[column]]
            title = f"{kind}, {symbol} = {scales[column]:g}"
            if _is_vector_pipeline(pipeline):
                if reference_samples is not None:
                    _data_background(axes, reference_samples)
                axes.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.6, color=_CLASS_COLORS[class_label % 10])
                _square_axes(axes, extent, title)
            else:
                _show_images(axes, samples[:64], title)
    figure.suptitle(f"Guidance toward class y = {class_label}: γ = 1 and w = 1 target p(x | y); larger values sharpen")
    _save(figure, path)
    return result


# ---------------------------------------------------------------------------------------------------- figure 6


def plot_denoising_grid(
    pipeline,
    path,
    num_inference_steps: int = 50,
    num_shown: int = 6,
    batch_size: int = 4,
    seed: int = 0,
    class_labels=None,
) -> dict:
    """Figure 6: x_t and the predicted x̂_0 at several steps of one sampling run of an image pipeline.

    The run records the latents after every step (``callback_on_step_end``); at ``num_shown`` steps of the chain
    x̂_0 = E[x_0 | x_t] is the UNet's output at (x_t, t) converted to "sample" with
    ``parameterization.convert_prediction`` and the scheduler's ᾱ_t (Tweedie's formula for ε and score models).

    Args:
        pipeline: an image pipeline (``HVAEPipeline`` and alike; any UNet with ``sample_size`` set) or its folder.
        num_inference_steps, batch_size, seed: the sampling run.
        num_shown: how many steps of the chain to show (evenly spaced, from x_T to the last step).
        class_labels: for a class-conditional UNet: passed to the pipeline and to the UNet for x̂_0.
    Returns:
        ``{"timesteps" [num_shown], "samples" [num_shown, B, C, H, W] (x_t), "predicted_original_samples"
        [num_shown, B, C, H, W] (x̂_0), "final" [B, C, H, W] (the pipeline's output, ``output_type="latent"``)}``.
    """
    from .parameterization import convert_prediction

    pipeline = load_pipeline(pipeline)
    if _is_vector_pipeline(pipeline):
        raise ValueError("plot_denoising_grid needs an image pipeline (unet.config.sample_size set)")
    if isinstance(num_shown, bool) or not isinstance(num_shown, int) or not 2 <= num_shown <= num_inference_steps:
        raise ValueError(
            f"num_shown must be an int in [2, num_inference_steps={num_inference_steps}], got {num_shown!r}"
        )
    latents, generator = _initial_latents(pipeline, batch_size, seed)
    recorder = _LatentRecorder()
    call_kwargs = {} if class_labels is None else {"class_labels": class_labels}
    final = pipeline(
        batch_size=batch_size,
        num_inference_steps=num_inference_steps,
        generator=generator,
        latents=latents,
        output_type="latent",
        callback_on_step_end=recorder,
        **call_kwargs,
    ).images.cpu()
    # the chain's x_t: x_T, then the latents after each step but the last (which is x_0, not a latent)
    chain_samples = [latents.cpu()] + recorder.latents[:-1]
    timesteps = pipeline.scheduler.timesteps.cpu()
    picks = np.linspace(0, len(timesteps) - 1, num_shown).round().astype(int)

    unet = pipeline.unet
    prediction_type = pipeline.scheduler.config.prediction_type
    labels = None if class_labels is None else torch.as_tensor(class_labels).reshape(-1).expand(batch_size)
    shown_samples, predicted = [], []
    for pick in picks:
        sample = chain_samples[pick].to(unet.device, unet.dtype)
        timestep = timesteps[pick]
        with torch.no_grad():
            unet_kwargs = {} if labels is None else {"class_labels": labels.to(unet.device)}
            output = unet(sample, timestep.to(unet.device), **unet_kwargs).sample[:, : sample.shape[1]]
        alphas_cumprod_t = float(pipeline.scheduler.alphas_cumprod[int(timestep)])
        predicted.append(convert_prediction(output, sample, alphas_cumprod_t, prediction_type, "sample").cpu())
        shown_samples.append(sample.cpu())
    samples = torch.stack(shown_samples)
    predicted_original_samples = torch.stack(predicted)

    figure = Figure(figsize=(2.1 * num_shown, 4.6))
    axes_grid = figure.subplots(2, num_shown, squeeze=False)
    for column, pick in enumerate(picks):
        t = int(timesteps[pick])
        _show_images(axes_grid[0, column], samples[column].clamp(-1, 1), f"x_t, t = {t}")
        _show_images(axes_grid[1, column], predicted_original_samples[column].clamp(-1, 1), f"x̂_0(x_t), t = {t}")
    figure.suptitle("One sampling run: the latent x_t (top) and the model's estimate x̂_0 = E[x_0 | x_t] (bottom)")
    _save(figure, path)
    return {
        "timesteps": timesteps[picks],
        "samples": samples,
        "predicted_original_samples": predicted_original_samples,
        "final": final,
    }
