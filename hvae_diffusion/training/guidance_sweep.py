"""Guided accuracy against the guidance scale, for classifier-free and classifier guidance, clipping on and off.

Guided accuracy is the fraction of samples asked for class y that an independent judge (a classifier of clean data,
not the guidance classifier) labels y. Sweeping it over ``guidance_scale`` shows which scale a user needs: with an
exact model and a calibrated p(y | x_t), scale 1 samples p(x | y) for both kinds of guidance.
"""

import time

import numpy as np
import torch
from matplotlib.figure import Figure

from ..guidance import check_guidance_scale, logits_of
from ..pipelines import ClassifierFreeGuidancePipeline, ClassifierGuidedPipeline
from ..plotting import _save


def _guided_call(pipeline, class_labels, guidance_scale, num_inference_steps, generator):
    """The pipeline's samples for ``class_labels`` at ``guidance_scale`` (both pipelines name it so), as the judge
    sees data: images in [−1, 1] (decoded, for a latent model), vectors as they are."""
    samples = pipeline(
        class_labels=class_labels,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        generator=generator,
        output_type="pt",
    ).images
    return samples if pipeline.is_vector_model else samples * 2 - 1


def _check_sweep_arguments(pipelines, judge, guidance_scales, class_labels, clip_samples, batch_size):
    if not pipelines:
        raise ValueError("pipelines must map at least one name to a pipeline")
    for name, pipeline in pipelines.items():
        if not isinstance(pipeline, (ClassifierFreeGuidancePipeline, ClassifierGuidedPipeline)):
            raise TypeError(
                f"pipelines[{name!r}] must be a ClassifierFreeGuidancePipeline or ClassifierGuidedPipeline, "
                f"got {type(pipeline).__name__}"
            )
        if "clip_sample" not in pipeline.scheduler.config:
            raise ValueError(
                f"pipelines[{name!r}] has a {type(pipeline.scheduler).__name__}, which has no clip_sample setting "
                "to sweep"
            )
    if not callable(judge):
        raise TypeError(f"judge must be callable (samples -> logits), got {type(judge).__name__}")
    if len(guidance_scales) == 0:
        raise ValueError("guidance_scales must hold at least one scale")
    for scale in guidance_scales:
        check_guidance_scale(scale, "guidance_scales")
    if len(class_labels) == 0 or not all(isinstance(label, int) and label >= 0 for label in class_labels):
        raise ValueError(f"class_labels must be a non-empty list of ints >= 0, got {class_labels!r}")
    if len(clip_samples) == 0 or not all(isinstance(clip, bool) for clip in clip_samples):
        raise ValueError(f"clip_samples must be a non-empty sequence of True/False, got {clip_samples!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


@torch.no_grad()
def guided_accuracy_sweep(
    pipelines,
    judge,
    guidance_scales,
    class_labels,
    clip_samples=(True, False),
    num_inference_steps: int = 50,
    seed: int = 0,
    batch_size: int = 256,
):
    """Guided accuracy of each pipeline at each ``guidance_scale``, with the scheduler's ``clip_sample`` on and off.

    Every setting draws one sample per entry of ``class_labels`` from the same seed, so settings differ only by the
    scale and the clipping. Each pipeline's scheduler is replaced by a copy with ``clip_sample`` set for the run and
    restored afterwards.

    Args:
        pipelines: ``{name: pipeline}``, each a ``ClassifierFreeGuidancePipeline`` or ``ClassifierGuidedPipeline``
            whose scheduler has a ``clip_sample`` setting (``HVAEScheduler``, ``DDPMScheduler``, ``DDIMScheduler``).
        judge: ``judge(samples) -> logits [N, num_classes]`` on samples as data (images in [−1, 1], decoded for a latent model); an independent
            classifier of clean data.
        guidance_scales: the scales to sweep, each ≥ 0.
        class_labels: the label asked for each sample (ints); balanced labels give chance accuracy 1/num_classes
            to an unguided sampler.
        clip_samples: the ``clip_sample`` values to sweep.
        num_inference_steps, seed: of every sampling run.
        batch_size: samples per pipeline call.

    Returns:
        a list of ``{"guidance": name, "clip_sample": bool, "guidance_scale": float, "accuracy": float,
        "num_samples": int}``, one per setting, in sweep order.
    """
    _check_sweep_arguments(pipelines, judge, guidance_scales, class_labels, clip_samples, batch_size)
    labels = torch.as_tensor(class_labels)
    results = []
    for name, pipeline in pipelines.items():
        original_scheduler = pipeline.scheduler
        try:
            for clip_sample in clip_samples:
                pipeline.scheduler = type(original_scheduler).from_config(
                    original_scheduler.config, clip_sample=clip_sample
                )
                for scale in guidance_scales:
                    generator = torch.Generator().manual_seed(seed)
                    correct = 0
                    for start in range(0, len(labels), batch_size):
                        batch_labels = labels[start : start + batch_size]
                        samples = _guided_call(
                            pipeline, batch_labels.tolist(), float(scale), num_inference_steps, generator
                        )
                        predicted = logits_of(judge(samples)).argmax(-1)
                        correct += int((predicted.cpu() == batch_labels).sum())
                    results.append(
                        {
                            "guidance": name,
                            "clip_sample": clip_sample,
                            "guidance_scale": float(scale),
                            "accuracy": correct / len(labels),
                            "num_samples": len(labels),
                        }
                    )
        finally:
            pipeline.scheduler = original_scheduler
    return results


def plot_guidance_sweep(results, path, chance=None):
    """PNG of guided accuracy against ``guidance_scale``: one line per guidance kind and clipping (dashed: off).

    Args:
        results: the list ``guided_accuracy_sweep`` returns.
        path: the PNG to write.
        chance: if given, a horizontal line at this accuracy (1/num_classes for balanced labels).

    Returns:
        ``{(name, clip_sample): (scales, accuracies)}``, the plotted lines.
    """
    if not results:
        raise ValueError("results must hold at least one sweep entry")
    lines = {}
    for entry in results:
        scales, accuracies = lines.setdefault((entry["guidance"], entry["clip_sample"]), ([], []))
        scales.append(entry["guidance_scale"])
        accuracies.append(entry["accuracy"])
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for (name, clip_sample), (scales, accuracies) in lines.items():
        order = sorted(range(len(scales)), key=scales.__getitem__)
        axes.plot(
            [scales[i] for i in order],
            [accuracies[i] for i in order],
            marker="o",
            linestyle="-" if clip_sample else "--",
            label=f"{name}, clip_sample={clip_sample}",
        )
    if chance is not None:
        axes.axhline(chance, color="gray", linewidth=0.8, linestyle=":", label="chance")
    axes.set_xlabel("guidance_scale")
    axes.set_ylabel("guided accuracy (judge)")
    axes.set_ylim(0, 1.02)
    axes.legend(fontsize=8)
    _save(figure, path)
    return lines


def binomial_standard_error(fraction: float, count: int) -> float:
    """√(p (1 − p) / n): the standard error of a fraction p of n independent draws."""
    return float(np.sqrt(fraction * (1 - fraction) / count))


def bootstrap_frechet_distance(features, reference_features, num_resamples=50, seed=0):
    """(Fréchet distance of ``features`` to ``reference_features``, its bootstrap standard error).

    The standard error is the spread of the distance over ``num_resamples`` resamples (with replacement) of the
    generated features, the reference held fixed: it says how much the value moves with the draw of samples, at this
    sample count (the distance itself is biased upward for finite sets, so compare only at equal counts).
    """
    from .evaluation import frechet_distance

    features = np.asarray(features, dtype=np.float64)
    distance = frechet_distance(features, reference_features)
    rng = np.random.default_rng(seed)
    resampled = [
        frechet_distance(features[rng.integers(0, len(features), len(features))], reference_features)
        for _ in range(num_resamples)
    ]
    return distance, float(np.std(resampled, ddof=1))


class ForwardCounter:
    """Counts the samples a module's forward passes see (a forward hook): denoiser forwards and classifier passes
    per image are the cost of a guidance setting that no timing noise blurs."""

    def __init__(self, module):
        self.samples = 0
        self.handle = module.register_forward_hook(self._hook) if module is not None else None

    def _hook(self, module, inputs, output):
        first = inputs[0] if inputs else None
        self.samples += first.shape[0] if isinstance(first, torch.Tensor) else 0

    def remove(self):
        if self.handle is not None:
            self.handle.remove()


@torch.no_grad()
def guidance_table(
    settings,
    judge,
    reference_samples,
    class_labels,
    num_inference_steps: int = 100,
    seed: int = 0,
    batch_size: int = 250,
    num_bootstrap: int = 50,
    on_row=None,
):
    """Guided accuracy, Fréchet distance, KID and cost per image of each guidance setting, each with its error.

    Every setting draws one sample per entry of ``class_labels`` from the same seed. The guided accuracy is the
    fraction the judge labels as asked (standard error √(p (1 − p) / n)); the Fréchet distance (bootstrap standard
    error, ``bootstrap_frechet_distance``) and the KID (``evaluation.kernel_inception_distance``, standard error over
    disjoint subsets) are measured in the judge's feature space (``judge.features``) against ``reference_samples``.
    The cost is the wall time per image and the denoiser forwards and classifier passes per image.

    Args:
        settings: a list of ``{"method": str, "guidance_scale": float, "pipeline": pipeline, "kwargs": dict}``;
            the pipeline is called as ``pipeline(class_labels=..., guidance_scale=..., **kwargs)``.
        judge: a clean-data classifier with ``judge(samples) -> logits`` and ``judge.features(samples)``, on
            samples as data (images in [−1, 1]).
        reference_samples: real data ``[M, ...]`` in [−1, 1] (the test split).
        class_labels: the label asked for each sample.
        num_inference_steps, seed, batch_size: of every sampling run.
        num_bootstrap: resamples of the Fréchet distance's standard error.
        on_row: called with each row as it is done (to save partial results).

    Returns:
        a list of ``{"method", "guidance_scale", "num_samples", "accuracy", "accuracy_se", "frechet_distance",
        "frechet_distance_se", "kid", "kid_se", "seconds_per_image", "denoiser_forwards_per_image",
        "classifier_passes_per_image"}``, one per setting.
    """
    from .evaluation import kernel_inception_distance

    if len(class_labels) == 0:
        raise ValueError("class_labels must hold at least one label")
    labels = torch.as_tensor(class_labels)
    reference_features = judge.features(reference_samples).double()
    rows = []
    for setting in settings:
        pipeline, scale = setting["pipeline"], float(setting["guidance_scale"])
        check_guidance_scale(scale, "guidance_scale")
        generator = torch.Generator().manual_seed(seed)
        denoiser_counter = ForwardCounter(pipeline.denoiser)
        classifier_counter = ForwardCounter(getattr(pipeline, "classifier", None))
        chunks = []
        started = time.perf_counter()
        try:
            for start in range(0, len(labels), batch_size):
                batch = labels[start : start + batch_size].tolist()
                images = pipeline(
                    class_labels=batch,
                    guidance_scale=scale,
                    num_inference_steps=num_inference_steps,
                    generator=generator,
                    output_type="pt",
                    **setting.get("kwargs", {}),
                ).images
                chunks.append(images if pipeline.is_vector_model else images * 2 - 1)
        finally:
            denoiser_counter.remove()
            classifier_counter.remove()
        seconds = time.perf_counter() - started
        samples = torch.cat(chunks).cpu()
        accuracy = float((logits_of(judge(samples)).argmax(-1) == labels).double().mean())
        features = judge.features(samples).double()
        distance, distance_se = bootstrap_frechet_distance(
            features.numpy(), reference_features.numpy(), num_bootstrap, seed
        )
        kid = kernel_inception_distance(features, reference_features, generator=torch.Generator().manual_seed(seed))
        row = {
            "method": setting["method"],
            "guidance_scale": scale,
            "num_samples": len(labels),
            "accuracy": accuracy,
            "accuracy_se": binomial_standard_error(accuracy, len(labels)),
            "frechet_distance": distance,
            "frechet_distance_se": distance_se,
            "kid": kid["kid"],
            "kid_se": kid["standard_error"],
            "seconds_per_image": seconds / len(labels),
            "denoiser_forwards_per_image": denoiser_counter.samples / len(labels),
            "classifier_passes_per_image": classifier_counter.samples / len(labels),
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def plot_guidance_table(rows, path):
    """PNG of the table: Fréchet distance against guided accuracy, one line per method through its scales (labelled),
    with standard-error bars; down and to the right is better.

    Returns ``{method: (accuracies, distances)}``, the plotted lines.
    """
    if not rows:
        raise ValueError("rows must hold at least one row of guidance_table")
    lines = {}
    for row in rows:
        lines.setdefault(row["method"], []).append(row)
    figure = Figure(figsize=(7, 5))
    axes = figure.subplots()
    plotted = {}
    for method, method_rows in lines.items():
        method_rows = sorted(method_rows, key=lambda row: row["guidance_scale"])
        accuracies = [row["accuracy"] for row in method_rows]
        distances = [row["frechet_distance"] for row in method_rows]
        axes.errorbar(
            accuracies,
            distances,
            xerr=[row["accuracy_se"] for row in method_rows],
            yerr=[row["frechet_distance_se"] for row in method_rows],
            marker="o",
            capsize=2,
            label=method,
        )
        for row in method_rows:
            axes.annotate(f"{row['guidance_scale']:g}", (row["accuracy"], row["frechet_distance"]), fontsize=7)
        plotted[method] = (accuracies, distances)
    axes.set_xlabel("guided accuracy (judge)")
    axes.set_ylabel("Fréchet distance to the test split")
    axes.legend(fontsize=7)
    _save(figure, path)
    return plotted


def format_guidance_table(rows) -> str:
    """The rows of ``guidance_table`` as a Markdown table."""
    lines = [
        "| method | scale | guided accuracy | Fréchet distance | KID ×10³ | denoiser forwards / image | "
        "classifier passes / image | ms / image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        kid_se = "" if row["kid_se"] is None else f" ± {1e3 * row['kid_se']:.2f}"
        lines.append(
            f"| {row['method']} | {row['guidance_scale']:g} | {row['accuracy']:.3f} ± {row['accuracy_se']:.3f} | "
            f"{row['frechet_distance']:.1f} ± {row['frechet_distance_se']:.1f} | {1e3 * row['kid']:.2f}{kid_se} | "
            f"{row['denoiser_forwards_per_image']:g} | {row['classifier_passes_per_image']:g} | "
            f"{1e3 * row['seconds_per_image']:.1f} |"
        )
    return "\n".join(lines) + "\n"
