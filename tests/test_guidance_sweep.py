"""guided_accuracy_sweep and plot_guidance_sweep, on exact Gaussian-mixture models where the answer is known."""

import pytest
import torch

from hvae_diffusion import ClassifierFreeGuidancePipeline, ClassifierGuidedPipeline, HVAEPipeline, HVAEScheduler
from hvae_diffusion.testing import ExactMixtureClassifier, ExactMixtureDenoiser, GaussianMixture
from hvae_diffusion.training.guidance_sweep import guided_accuracy_sweep, plot_guidance_sweep

# wide components, so that p(x | y) is not perfectly separable: the exact guided accuracy at scale 1 is ~0.85
MEANS = [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
STD = 0.6
COMPONENT_LABELS = [0, 0, 1]
LABELS = [0, 1] * 150


def build_pipelines(clip_sample=False):
    scheduler = HVAEScheduler(num_train_timesteps=200, clip_sample=clip_sample)
    alphas_cumprod = scheduler.alphas_cumprod.tolist()
    denoiser = ExactMixtureDenoiser(
        MEANS, STD, component_labels=COMPONENT_LABELS, alphas_cumprod=alphas_cumprod, in_channels=2, num_class_embeds=3
    )
    classifier = ExactMixtureClassifier(MEANS, STD, component_labels=COMPONENT_LABELS, alphas_cumprod=alphas_cumprod)
    pipelines = {
        "classifier-free": ClassifierFreeGuidancePipeline(denoiser, scheduler),
        "classifier": ClassifierGuidedPipeline(denoiser, scheduler, classifier),
    }
    for pipeline in pipelines.values():
        pipeline.set_progress_bar_config(disable=True)
    return pipelines


def mixture():
    return GaussianMixture(MEANS, STD, component_labels=COMPONENT_LABELS)


def exact_judge(samples):
    """The Bayes classifier of clean data: log p(y | x_0)."""
    return mixture().class_log_posterior(samples.double(), torch.ones(samples.shape[0], dtype=torch.float64))


def exact_conditional_accuracy(num_draws=20000):
    """P(the judge labels x as y) for x ~ p(x | y), averaged over balanced y: what scale 1 samples must score."""
    accuracies = []
    for label in (0, 1):
        draws = mixture().sample(num_draws, torch.Generator().manual_seed(label), class_label=label)[0]
        accuracies.append(float((exact_judge(draws).argmax(-1) == label).double().mean()))
    return sum(accuracies) / 2


def test_sweep_matches_the_exact_accuracies(single_thread):
    """Scale 0 samples p(x): accuracy 1/2 for balanced labels. Scale 1 samples p(x | y) for both kinds of guidance,
    so it scores the exact conditional accuracy; a larger classifier scale sharpens p(y | x) and scores higher."""
    results = guided_accuracy_sweep(
        build_pipelines(), exact_judge, [0.0, 1.0, 4.0], LABELS, clip_samples=(False,), num_inference_steps=40
    )
    accuracy = {(entry["guidance"], entry["guidance_scale"]): entry["accuracy"] for entry in results}
    assert len(results) == 6 and all(entry["num_samples"] == len(LABELS) for entry in results)
    exact = exact_conditional_accuracy()
    assert 0.75 < exact < 0.95  # the case is not trivially separable
    for name in ("classifier-free", "classifier"):
        assert abs(accuracy[(name, 0.0)] - 0.5) < 0.08, accuracy
        assert abs(accuracy[(name, 1.0)] - exact) < 0.07, (accuracy, exact)
        assert accuracy[(name, 4.0)] > accuracy[(name, 1.0)] + 0.05, accuracy


def test_sweep_equals_direct_calls_with_clipping_set_and_restores_the_scheduler(single_thread):
    pipelines = build_pipelines()
    schedulers = {name: pipeline.scheduler for name, pipeline in pipelines.items()}
    labels = LABELS[:40]
    results = guided_accuracy_sweep(pipelines, exact_judge, [2.0], labels, num_inference_steps=10, batch_size=16)
    assert [(entry["guidance"], entry["clip_sample"]) for entry in results] == [
        ("classifier-free", True),
        ("classifier-free", False),
        ("classifier", True),
        ("classifier", False),
    ]
    for name, pipeline in pipelines.items():
        assert pipeline.scheduler is schedulers[name] and pipeline.scheduler.config.clip_sample is False
    for entry in results:
        direct = build_pipelines(clip_sample=entry["clip_sample"])[entry["guidance"]]
        generator = torch.Generator().manual_seed(0)
        samples = torch.cat(
            [
                direct(
                    class_labels=labels[start : start + 16],
                    num_inference_steps=10,
                    generator=generator,
                    output_type="latent",
                    guidance_scale=2.0,
                ).images
                for start in range(0, len(labels), 16)
            ]
        )
        expected = float((exact_judge(samples).argmax(-1) == torch.tensor(labels)).double().mean())
        assert entry["accuracy"] == pytest.approx(expected, abs=1e-12), (entry, expected)


def test_plot_draws_one_line_per_guidance_and_clipping_sorted_by_scale(tmp_path):
    results = [
        {"guidance": "classifier", "clip_sample": True, "guidance_scale": 2.0, "accuracy": 0.9, "num_samples": 10},
        {"guidance": "classifier", "clip_sample": True, "guidance_scale": 1.0, "accuracy": 0.7, "num_samples": 10},
        {"guidance": "classifier", "clip_sample": False, "guidance_scale": 1.0, "accuracy": 0.6, "num_samples": 10},
        {
            "guidance": "classifier-free",
            "clip_sample": True,
            "guidance_scale": 1.0,
            "accuracy": 1.0,
            "num_samples": 10,
        },
    ]
    path = tmp_path / "sweep.png"
    lines = plot_guidance_sweep(results, path, chance=0.1)
    assert path.stat().st_size > 0
    assert lines == {
        ("classifier", True): ([2.0, 1.0], [0.9, 0.7]),
        ("classifier", False): ([1.0], [0.6]),
        ("classifier-free", True): ([1.0], [1.0]),
    }


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"pipelines": {}}, ValueError, "pipelines must map"),
        ({"judge": "not callable"}, TypeError, "judge must be callable"),
        ({"guidance_scales": []}, ValueError, "guidance_scales must hold"),
        ({"guidance_scales": [-1.0]}, ValueError, "guidance_scales must be a finite number"),
        ({"class_labels": []}, ValueError, "class_labels must be"),
        ({"class_labels": [0, 1.5]}, ValueError, "class_labels must be"),
        ({"clip_samples": ("yes",)}, ValueError, "clip_samples must be"),
        ({"batch_size": 0}, ValueError, "batch_size must be"),
    ],
)
def test_bad_arguments_are_refused_before_sampling(change, error, match):
    arguments = dict(pipelines=build_pipelines(), judge=exact_judge, guidance_scales=[1.0], class_labels=[0, 1])
    arguments.update(change)
    with pytest.raises(error, match=match):
        guided_accuracy_sweep(**arguments)


def test_pipelines_without_guidance_are_refused():
    scheduler = HVAEScheduler(num_train_timesteps=20)
    denoiser = ExactMixtureDenoiser(MEANS, STD, alphas_cumprod=scheduler.alphas_cumprod.tolist(), in_channels=2)
    with pytest.raises(TypeError, match=r"pipelines\['plain'\] must be"):
        guided_accuracy_sweep({"plain": HVAEPipeline(denoiser, scheduler)}, exact_judge, [1.0], [0])


class ExactJudge:
    """The exact judge with its input as the feature space (2-D), as guidance_table wants."""

    def __call__(self, samples):
        return exact_judge(samples)

    def features(self, samples):
        return samples.double()


def test_guidance_table_rows_errors_and_costs(single_thread, tmp_path):
    """Each row's standard error is √(p (1 − p) / n); classifier-free guidance costs two denoiser forwards per image and
    step, one outside the interval; classifier guidance one classifier pass per guided step and none outside."""
    from hvae_diffusion.training.guidance_sweep import format_guidance_table, guidance_table, plot_guidance_table

    pipelines = build_pipelines()
    labels = [0, 1] * 20
    steps = 10
    interval = (60, 160)  # of 200 train timesteps: 10 steps at 180, 160, ..., 0 guide 160, 140, 120, 100, 80
    settings = [
        {"method": "cfg", "guidance_scale": 3.0, "pipeline": pipelines["classifier-free"]},
        {
            "method": "cfg",
            "guidance_scale": 3.0,
            "pipeline": pipelines["classifier-free"],
            "kwargs": {"guidance_interval": interval},
        },
        {
            "method": "classifier",
            "guidance_scale": 2.0,
            "pipeline": pipelines["classifier"],
            "kwargs": {"guidance_interval": interval},
        },
    ]
    reference = mixture().sample(200, torch.Generator().manual_seed(5))[0]
    seen = []
    rows = guidance_table(settings, ExactJudge(), reference, labels, num_inference_steps=steps, on_row=seen.append)
    assert seen == rows and len(rows) == 3
    for row in rows:
        assert row["num_samples"] == 40 and 0.5 < row["accuracy"] <= 1
        assert row["accuracy_se"] == pytest.approx((row["accuracy"] * (1 - row["accuracy"]) / 40) ** 0.5)
        assert row["frechet_distance"] > 0 and row["frechet_distance_se"] > 0 and row["kid_se"] > 0
    assert [row["denoiser_forwards_per_image"] for row in rows] == [2 * steps, steps + 5, steps]
    assert [row["classifier_passes_per_image"] for row in rows] == [0, 0, 5]
    table = format_guidance_table(rows)
    assert table.count("\n") == 5 and "| cfg | 3 |" in table
    lines = plot_guidance_table(rows, tmp_path / "table.png")
    assert (tmp_path / "table.png").stat().st_size > 0 and set(lines) == {"cfg", "classifier"}
