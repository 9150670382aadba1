"""Saving and loading the pipelines: the standard layout, DiffusionPipeline.from_pretrained with and without the
package imported (in fresh processes), Diffusers' own DDPMPipeline folders, and missing components."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from test_pipelines import quiet, seeded, tiny_classifier, tiny_text_components, tiny_unet

from hvae_diffusion import ClassifierFreeGuidancePipeline, ClassifierGuidedPipeline, HVAEPipeline, HVAEScheduler
from hvae_diffusion.pipelines.serialization import COMPONENT_MODULE_NAME, PIPELINE_MODULE_NAME


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved folder per pipeline class, with the components it was built from."""
    root = tmp_path_factory.mktemp("pipelines")
    scheduler = HVAEScheduler(num_train_timesteps=20)
    pipelines = {
        "hvae": HVAEPipeline(tiny_unet(), scheduler),
        "classifier": ClassifierGuidedPipeline(tiny_unet(), scheduler, tiny_classifier(3)),
        "free": ClassifierFreeGuidancePipeline(tiny_unet(num_class_embeds=4), scheduler),
    }
    folders = {}
    for name, pipeline in pipelines.items():
        folders[name] = root / name
        pipeline.save_pretrained(folders[name])
    return pipelines, folders


def run_python(code: str, **environment) -> str:
    """Run ``code`` in a fresh interpreter (offline), returning stdout; fail the test with stderr on error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **environment}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_standard_layout(saved):
    _, folders = saved
    folder = folders["classifier"]
    for path in (
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "classifier/config.json",
        "classifier/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        f"{PIPELINE_MODULE_NAME}.py",
        f"scheduler/{COMPONENT_MODULE_NAME}.py",
        f"classifier/{COMPONENT_MODULE_NAME}.py",
    ):
        assert os.path.isfile(folder / path), path
    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["_class_name"] == [PIPELINE_MODULE_NAME, "ClassifierGuidedPipeline"]
    assert model_index["scheduler"] == [COMPONENT_MODULE_NAME, "HVAEScheduler"]
    assert model_index["classifier"] == [COMPONENT_MODULE_NAME, "NoisyClassifier"]
    assert model_index["unet"] == ["diffusers", "UNet2DModel"]
    assert model_index["classifier_input"] == "noisy"
    free_index = json.loads((folders["free"] / "model_index.json").read_text())
    assert free_index["null_class_label"] == 3


@pytest.mark.parametrize(
    "name, pipeline_class, kwargs",
    [
        ("hvae", HVAEPipeline, {"batch_size": 2}),
        ("classifier", ClassifierGuidedPipeline, {"class_labels": [0, 2], "guidance_scale": 2.0}),
        ("free", ClassifierFreeGuidancePipeline, {"class_labels": [0, 2], "guidance_scale": 2.0}),
    ],
)
def test_round_trip_samples_the_same(saved, name, pipeline_class, kwargs):
    pipelines, folders = saved

    def run(pipeline):
        return pipeline(num_inference_steps=3, output_type="pt", generator=seeded(), **kwargs).images

    expected = run(quiet(pipelines[name]))
    for loader in (pipeline_class, DiffusionPipeline):
        loaded = quiet(loader.from_pretrained(folders[name]))
        assert type(loaded) is pipeline_class
        torch.testing.assert_close(run(loaded), expected)


def test_import_then_diffusion_pipeline_in_a_fresh_process(saved):
    """Also: importing the package patches one Diffusers function only, the one docs/pipelines.md names with its
    upstream change; every other function and class of the Diffusers modules loaded before it is the same object
    after it."""
    _, folders = saved
    output = run_python(f"""
        import sys
        from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel, UNet2DModel
        from diffusers.pipelines import pipeline_loading_utils, pipeline_utils
        from diffusers.utils import dynamic_modules_utils

        def diffusers_snapshot():
            return {{
                (module_name, name): id(value)
                for module_name, module in list(sys.modules.items())
                if module_name.split(".")[0] == "diffusers" and module is not None
                for name, value in list(vars(module).items())
                if callable(value)
            }}

        before = diffusers_snapshot()
        import hvae_diffusion, torch
        after = diffusers_snapshot()
        changed = sorted(".".join(key) for key, identity in before.items() if after[key] != identity)
        print("compared", len(before), "changed", changed)
        for folder in {[str(f) for f in folders.values()]!r}:
            pipeline = DiffusionPipeline.from_pretrained(folder)
            print(type(pipeline).__name__, sorted(pipeline.components))
        pipeline.set_progress_bar_config(disable=True)
        print(pipeline(class_labels=[1], num_inference_steps=2, output_type="pt").images.shape)
    """)
    compared = int(output.split()[1])
    assert compared > 1000  # Diffusers' loading code was imported before the package, and compared
    assert "changed ['diffusers.pipelines.pipeline_loading_utils.get_class_from_dynamic_module']" in output
    # the components each holds: those it was built without (the other denoiser, ...) stay None and unlisted
    assert "HVAEPipeline ['scheduler', 'unet']" in output
    assert "ClassifierGuidedPipeline ['classifier', 'scheduler', 'unet']" in output
    assert "ClassifierFreeGuidancePipeline ['scheduler', 'unet']" in output
    assert "torch.Size([1, 1, 8, 8])" in output


def test_trust_remote_code_without_importing_the_package(saved, tmp_path):
    _, folders = saved
    output = run_python(
        f"""
        import sys
        from diffusers import DiffusionPipeline
        assert "hvae_diffusion" not in sys.modules
        pipeline = DiffusionPipeline.from_pretrained({str(folders["classifier"])!r}, trust_remote_code=True)
        print(type(pipeline).__module__, type(pipeline).__name__, type(pipeline.classifier).__name__)
        pipeline.set_progress_bar_config(disable=True)
        print(pipeline(class_labels=[1], num_inference_steps=2, output_type="np").images.shape)
    """,
        HF_MODULES_CACHE=str(tmp_path),
    )
    assert "hvae_diffusion.pipelines.pipeline_classifier_guided ClassifierGuidedPipeline NoisyClassifier" in output
    assert "(1, 8, 8, 1)" in output


def test_text_pipeline_round_trip(tmp_path):
    unet, text_encoder, tokenizer = tiny_text_components(tmp_path)
    pipeline = quiet(
        ClassifierFreeGuidancePipeline(unet, HVAEScheduler(num_train_timesteps=20), text_encoder, tokenizer)
    )
    pipeline.save_pretrained(tmp_path / "saved")
    loaded = quiet(DiffusionPipeline.from_pretrained(tmp_path / "saved"))
    assert type(loaded).__name__ == "ClassifierFreeGuidancePipeline"
    assert type(loaded.text_encoder).__name__ == "CLIPTextModel" and loaded.tokenizer is not None
    run = lambda p: p(prompt="a cat", num_inference_steps=2, output_type="pt", generator=seeded()).images  # noqa: E731
    torch.testing.assert_close(run(loaded), run(pipeline))


def test_unexported_component_keeps_its_module_and_loads_from_a_folder(tmp_path):
    """docs/pipelines.md saves pipelines of hvae_diffusion.testing's exact denoiser, which the package does not
    export: its model_index.json entry keeps the module path, and the folder loads and samples the same."""
    from hvae_diffusion.testing import ExactMixtureDenoiser

    scheduler = HVAEScheduler(num_train_timesteps=20, clip_sample=False)
    unet = ExactMixtureDenoiser(
        [[-1.0, 0.0], [1.0, 0.0]], 0.3, alphas_cumprod=scheduler.alphas_cumprod.tolist(), in_channels=2
    )
    pipeline = quiet(HVAEPipeline(unet, scheduler))
    pipeline.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["unet"] == ["hvae_diffusion.testing", "ExactMixtureDenoiser"]
    assert model_index["scheduler"] == [COMPONENT_MODULE_NAME, "HVAEScheduler"]
    loaded = quiet(DiffusionPipeline.from_pretrained(tmp_path))
    assert type(loaded.unet) is ExactMixtureDenoiser
    run = lambda p: p(batch_size=3, num_inference_steps=4, generator=seeded()).images  # noqa: E731
    torch.testing.assert_close(run(loaded), run(pipeline))


def test_ddpm_pipeline_folder_loads_and_samples(tmp_path):
    unet = tiny_unet()
    ddpm = quiet(DDPMPipeline(unet, DDPMScheduler(num_train_timesteps=5)))
    ddpm.save_pretrained(tmp_path)
    loaded = quiet(HVAEPipeline.from_pretrained(tmp_path))
    assert isinstance(loaded.scheduler, DDPMScheduler)
    expected = ddpm(batch_size=2, num_inference_steps=5, generator=seeded(), output_type="np").images
    ours = loaded(batch_size=2, num_inference_steps=5, generator=seeded(), output_type="np").images
    assert abs(ours - expected).max() < 1e-5
    # and with the HVAE scheduler swapped in from DDPM's config
    loaded.scheduler = HVAEScheduler.from_config(loaded.scheduler.config)
    assert loaded(batch_size=2, num_inference_steps=5, output_type="np").images.shape == (2, 8, 8, 1)


@pytest.mark.parametrize("loader", [HVAEPipeline, DiffusionPipeline])
def test_missing_component_names_component_and_folder(saved, tmp_path, loader):
    pipelines, _ = saved
    folder = tmp_path / "broken"
    pipelines["classifier"].save_pretrained(folder)
    for path in (folder / "classifier").iterdir():
        path.unlink()
    (folder / "classifier").rmdir()
    with pytest.raises(ValueError, match=r"component 'classifier' .* folder .*broken.classifier is missing"):
        loader.from_pretrained(folder)


@pytest.mark.parametrize(
    "version, loader, cause",
    [
        ("0.37.1", lambda path, module_file, class_name=None: None, "checks trust_remote_code before"),
        ("0.42.1", None, "has no get_class_from_dynamic_module"),
        ("0.42.1", lambda path, file, name=None: None, "not the module_file and class_name"),
    ],
)
def test_loader_hook_that_cannot_be_installed_names_the_cause(monkeypatch, version, loader, cause):
    """Importing the package wraps a private Diffusers function; a Diffusers without it in the expected form gives an
    ImportError naming the version, the cause and the fix, instead of pipelines that silently fail to load."""
    import diffusers
    from diffusers.pipelines import pipeline_loading_utils

    from hvae_diffusion.pipelines.serialization import register_pipeline_classes

    monkeypatch.setattr(diffusers, "__version__", version)
    if loader is None:
        monkeypatch.delattr(pipeline_loading_utils, "get_class_from_dynamic_module")
    else:
        monkeypatch.setattr(pipeline_loading_utils, "get_class_from_dynamic_module", loader)
    with pytest.raises(ImportError, match=rf"diffusers {version}: .*{cause}.*install diffusers>=0\.38"):
        register_pipeline_classes(HVAEPipeline)


# ---------------------------------------------------------------------- any Diffusers scheduler, score models included

MIXTURE_MEANS = [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
SWAPPED_SCHEDULERS = [
    DDIMScheduler,
    DPMSolverMultistepScheduler,  # its default algorithm_type is "dpmsolver++"
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
]


def exact_mixture_denoiser(prediction_type, scheduler):
    """The exact denoiser of a 2-D Gaussian mixture in ``prediction_type``: its ε and score versions are the same model
    converted exactly."""
    from hvae_diffusion.testing import ExactMixtureDenoiser

    table = scheduler.alphas_cumprod.tolist()
    return ExactMixtureDenoiser(
        MIXTURE_MEANS, 0.3, alphas_cumprod=table, in_channels=2, prediction_type=prediction_type
    )


@pytest.fixture(scope="module")
def saved_score_pipeline(tmp_path_factory):
    """A score model saved as a pipeline with an HVAEScheduler built for it (prediction_type="score")."""
    folder = tmp_path_factory.mktemp("score")
    scheduler = HVAEScheduler(num_train_timesteps=100, prediction_type="score")
    pipeline = quiet(HVAEPipeline(exact_mixture_denoiser("score", scheduler), scheduler))
    pipeline.save_pretrained(folder)
    return pipeline, folder


def sample_mixture(pipeline, num_inference_steps=10):
    return pipeline(batch_size=6, num_inference_steps=num_inference_steps, generator=seeded()).images


def test_a_score_pipeline_is_saved_with_an_epsilon_scheduler_and_samples_the_same(saved_score_pipeline):
    from hvae_diffusion.pipelines.serialization import denoiser_scheduler, load_denoiser_scheduler

    pipeline, folder = saved_score_pipeline
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    assert json.loads((folder / "model_index.json").read_text())["prediction_type"] == "score"
    assert pipeline.scheduler.config.prediction_type == "score"  # the pipeline in memory is left as it was
    loaded = quiet(DiffusionPipeline.from_pretrained(folder))
    assert loaded.config.prediction_type == "score" and loaded.scheduler.config.prediction_type == "epsilon"
    torch.testing.assert_close(sample_mixture(loaded), sample_mixture(pipeline), rtol=1e-5, atol=1e-5)
    # what the ELBO and fine-tuning read: the scheduler in the denoiser's own parameterization
    assert denoiser_scheduler(loaded).config.prediction_type == "score"
    assert load_denoiser_scheduler(folder).config.prediction_type == "score"


@pytest.mark.parametrize("scheduler_class", SWAPPED_SCHEDULERS, ids=lambda cls: cls.__name__)
def test_one_line_scheduler_swap_on_a_saved_score_pipeline(saved_score_pipeline, scheduler_class):
    """``pipe.scheduler = AnyScheduler.from_config(pipe.scheduler.config)`` on a saved score model samples what the same
    scheduler gives the exact ε model (the score model converted by hand)."""
    _, folder = saved_score_pipeline
    loaded = quiet(DiffusionPipeline.from_pretrained(folder))
    loaded.scheduler = scheduler_class.from_config(loaded.scheduler.config)
    # the ε model of the same mixture, sampled by the same scheduler built from the same (saved) config
    by_hand = quiet(
        HVAEPipeline(
            exact_mixture_denoiser("epsilon", HVAEScheduler(num_train_timesteps=100)),
            scheduler_class.from_config(loaded.scheduler.config),
        )
    )
    for num_inference_steps in (10, 4):  # two calls in a row with different step counts
        samples = sample_mixture(loaded, num_inference_steps)
        assert bool(torch.isfinite(samples).all())
        torch.testing.assert_close(samples, sample_mixture(by_hand, num_inference_steps), rtol=1e-4, atol=1e-4)


def test_an_old_score_pipeline_folder_still_loads_and_samples_the_same(saved_score_pipeline, tmp_path):
    """Folders saved before score schedulers were saved as ε: scheduler prediction_type="score", none in the pipeline."""
    import shutil

    pipeline, folder = saved_score_pipeline
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    for path, key, value in (
        (old / "scheduler" / "scheduler_config.json", "prediction_type", "score"),
        (old / "model_index.json", "prediction_type", None),
    ):
        content = json.loads(path.read_text())
        content[key] = value
        path.write_text(json.dumps(content))
    loaded = quiet(DiffusionPipeline.from_pretrained(old))
    assert loaded.scheduler.config.prediction_type == "score" and loaded.config.prediction_type is None
    torch.testing.assert_close(sample_mixture(loaded), sample_mixture(pipeline), rtol=1e-5, atol=1e-5)
    # saving it again writes the new layout
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["prediction_type"] == "score"


def test_fine_tuning_a_saved_score_pipeline_keeps_training_the_score(saved_score_pipeline):
    """``hvae-train --pretrained_model_name_or_path`` reads the model's parameterization, not the saved scheduler's."""
    import argparse

    from hvae_diffusion.commands.train import make_scheduler

    _, folder = saved_score_pipeline
    for requested in (None, "score"):
        args = argparse.Namespace(
            pretrained_model_name_or_path=str(folder), prediction_type=requested, variance_type=None
        )
        assert make_scheduler(args).config.prediction_type == "score"
    with pytest.raises(ValueError, match="--prediction_type='epsilon' contradicts"):
        make_scheduler(
            argparse.Namespace(
                pretrained_model_name_or_path=str(folder), prediction_type="epsilon", variance_type=None
            )
        )


@pytest.mark.parametrize("pipeline_class", [ClassifierGuidedPipeline, ClassifierFreeGuidancePipeline])
def test_one_line_scheduler_swap_on_saved_guided_score_pipelines(pipeline_class, tmp_path):
    """The guided pipelines saved with a score model take the one-line swap too, and then sample what the same
    scheduler gives the exact ε model of the same mixture."""
    from hvae_diffusion.testing import ExactMixtureClassifier, ExactMixtureDenoiser

    scheduler = HVAEScheduler(num_train_timesteps=100, prediction_type="score")
    table = scheduler.alphas_cumprod.tolist()
    labels = dict(component_labels=[0, 0, 1], alphas_cumprod=table)

    def build(prediction_type, scheduler):
        unet = ExactMixtureDenoiser(
            MIXTURE_MEANS, 0.3, **labels, prediction_type=prediction_type, in_channels=2, num_class_embeds=3
        )
        if pipeline_class is ClassifierGuidedPipeline:
            return quiet(pipeline_class(unet, scheduler, ExactMixtureClassifier(MIXTURE_MEANS, 0.3, **labels)))
        return quiet(pipeline_class(unet, scheduler))

    build("score", scheduler).save_pretrained(tmp_path)
    loaded = quiet(DiffusionPipeline.from_pretrained(tmp_path))
    loaded.scheduler = DDIMScheduler.from_config(loaded.scheduler.config)
    by_hand = build("epsilon", DDIMScheduler.from_config(loaded.scheduler.config))

    def run(pipeline):
        return pipeline(class_labels=[1] * 4, guidance_scale=2.0, num_inference_steps=8, generator=seeded()).images

    torch.testing.assert_close(run(loaded), run(by_hand), rtol=1e-4, atol=1e-4)
