"""Diffusers' own pipeline tests, run against this package's pipelines.

The tests in ``tests/diffusers_tests`` are Diffusers' (vendored whole, unchanged: see its README.md). Each class here
is one of Diffusers' fast-test classes with ``pipeline_class`` set to one of ours and Diffusers' own
``get_dummy_components`` and ``get_dummy_inputs``:

- ``DDIMPipelineFastTests`` (Diffusers' ``DDIMPipeline``) with ``HVAEPipeline``;
- ``DiTPipelineFastTests`` (``DiTPipeline``) and ``TestStableDiffusionPipeline`` (``StableDiffusionPipeline``)
  with ``ClassifierFreeGuidancePipeline``.

Every skip below names its reason (docs/pipelines.md, "Diffusers' contracts", lists them all).
"""

import contextlib
import copy
import json
import unittest.mock

import diffusers
import numpy as np
import pytest
import torch
from packaging.version import Version

# The vendored tests import what the Diffusers release they were taken from has (hooks, test mixins); the oldest
# Diffusers that setup.cfg allows lacks some of it and runs the loading tests only.
VENDORED_FOR = Version("0.42")
if Version(Version(diffusers.__version__).base_version) < VENDORED_FOR:
    pytest.skip(
        f"Diffusers' vendored pipeline tests need diffusers>={VENDORED_FOR}, found {diffusers.__version__}",
        allow_module_level=True,
    )

# what the vendored tests import besides Diffusers (setup.cfg's test extra)
pytest.importorskip("parameterized", reason="Diffusers' vendored tests need the test extra: pip install -e '.[test]'")
pytest.importorskip("requests_mock", reason="Diffusers' vendored tests need the test extra: pip install -e '.[test]'")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DiTPipeline,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from diffusers.schedulers import AysSchedules  # noqa: E402
from diffusers_tests.pipelines.ddim import test_ddim  # noqa: E402
from diffusers_tests.pipelines.dit import test_dit  # noqa: E402
from diffusers_tests.pipelines.stable_diffusion import test_stable_diffusion  # noqa: E402
from huggingface_hub import try_to_load_from_cache  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from hvae_diffusion import ClassifierFreeGuidancePipeline, HVAEPipeline  # noqa: E402

# Diffusers' Stable Diffusion dummies load this tokenizer from the Hub; the tests run offline.
HUB_TOKENIZER = "hf-internal-testing/tiny-random-clip"
HUB_TOKENIZER_CACHED = isinstance(try_to_load_from_cache(HUB_TOKENIZER, "vocab.json"), str)
EXPECTED_VALUES = (
    f"its expected pixel values are StableDiffusionPipeline's with {HUB_TOKENIZER}'s vocabulary (not in the local "
    "Hub cache: offline, a byte-level CLIP tokenizer of the same size stands in), after StableDiffusionPipeline "
    "rewrote the dummy scheduler's steps_offset from 0 to 1 (a deprecated fix-up of old configs that this pipeline "
    "does not make); test_same_images_as_stable_diffusion_pipeline makes the same call side by side with "
    "StableDiffusionPipeline instead"
)


def byte_level_clip_tokenizer(directory) -> CLIPTokenizer:
    """A CLIP tokenizer with one token per byte (and per byte at the end of a word) and no merges: 514 tokens, within
    the dummy text encoder's 1000, max length 77 as Stable Diffusion's."""
    # GPT-2's byte-to-unicode map, which CLIP's byte-level BPE uses: printable bytes stand for themselves
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    characters = [chr(byte) for byte in printable] + [chr(256 + n) for n in range(len(others))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in characters:
        vocab.setdefault(character, len(vocab))
        vocab.setdefault(character + "</w>", len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>"
    )


@contextlib.contextmanager
def offline_tokenizer(directory):
    """``CLIPTokenizer.from_pretrained(HUB_TOKENIZER)`` answered from the Hub cache, else by the byte-level tokenizer."""
    if HUB_TOKENIZER_CACHED:
        yield
        return
    from_pretrained = CLIPTokenizer.from_pretrained

    def load(name, *args, **kwargs):
        if name == HUB_TOKENIZER:
            return byte_level_clip_tokenizer(directory)
        return from_pretrained(name, *args, **kwargs)

    with unittest.mock.patch.object(CLIPTokenizer, "from_pretrained", side_effect=load):
        yield


def skipped(reason: str):
    """Diffusers' test of this name, not run here, for ``reason``."""
    return pytest.mark.skip(reason=reason)(lambda self: None)


# ---------------------------------------------------------------------------------------------- DDIMPipeline


class TestHVAEPipelineAsDDIMPipeline(test_ddim.DDIMPipelineFastTests):
    pipeline_class = HVAEPipeline


# ---------------------------------------------------------------------------------------------- DiTPipeline


class TestClassifierFreeGuidancePipelineAsDiTPipeline(test_dit.DiTPipelineFastTests):
    pipeline_class = ClassifierFreeGuidancePipeline

    test_StableDiffusionMixin_component = skipped(
        "one class takes DiTPipeline's and StableDiffusionPipeline's components: it is a StableDiffusionMixin (FreeU, "
        "fused QKV projections, VAE slicing and tiling) for the unet and VAE of Stable Diffusion's components, where "
        "this test runs and passes; with a DiT transformer those methods raise, as they do without a unet"
    )
    test_encode_prompt_works_in_isolation = skipped(
        "encode_prompt is for text-conditional denoisers (StableDiffusionPipeline's, tested with Stable Diffusion's "
        "components below); DiTPipeline has none, and Diffusers skips this test for it"
    )


# ---------------------------------------------------------------------------------------------- StableDiffusionPipeline


class StableDiffusionComponents(test_stable_diffusion.StableDiffusionPipelineTesterConfig):
    """Diffusers' Stable Diffusion dummies for ``ClassifierFreeGuidancePipeline``: its tokenizer offline
    (``offline_tokenizer``), and without the parts this package leaves out, which the dummies set to None: the
    ``safety_checker`` with its ``feature_extractor``, and the IP-Adapter's ``image_encoder``."""

    pipeline_class = ClassifierFreeGuidancePipeline

    @pytest.fixture(scope="class", autouse=True)
    def tokenizer_directory(self, tmp_path_factory):
        type(self).tokenizer_path = tmp_path_factory.mktemp("tokenizer")

    def get_dummy_components(self, time_cond_proj_dim=None):
        with offline_tokenizer(self.tokenizer_path):
            components = super().get_dummy_components(time_cond_proj_dim=time_cond_proj_dim)
        for name in ("safety_checker", "feature_extractor", "image_encoder"):
            assert components.pop(name) is None
        return components


class TestClassifierFreeGuidancePipelineAsStableDiffusionPipeline(
    StableDiffusionComponents, test_stable_diffusion.TestStableDiffusionPipeline
):
    test_stable_diffusion_ddim = skipped(EXPECTED_VALUES)
    test_stable_diffusion_ddim_factor_8 = skipped(EXPECTED_VALUES)
    test_stable_diffusion_pndm = skipped(EXPECTED_VALUES)
    test_stable_diffusion_k_lms = skipped(EXPECTED_VALUES)
    test_stable_diffusion_k_euler_ancestral = skipped(EXPECTED_VALUES)
    test_stable_diffusion_k_euler = skipped(EXPECTED_VALUES)
    test_stable_diffusion_negative_prompt = skipped(EXPECTED_VALUES)
    test_stable_diffusion_lcm = skipped(EXPECTED_VALUES)
    test_stable_diffusion_lcm_custom_timesteps = skipped(EXPECTED_VALUES)
    test_stable_diffusion_no_safety_checker = skipped(
        "tests StableDiffusionPipeline itself (not pipeline_class) on a checkpoint from the Hub, with its safety "
        "checker, which this package leaves out"
    )
    test_pipeline_accept_tuple_type_unet_sample_size = skipped(
        "tests StableDiffusionPipeline itself (not pipeline_class) on a checkpoint from the Hub; this pipeline's "
        "(h, w) sample_size is tested with height_width_opt's components"
    )

    def test_encode_prompt_works_in_isolation(self, monkeypatch):
        # Diffusers' test reads the names encode_prompt returns from its source, found as
        # diffusers.pipelines.<class name>, where Diffusers' own pipelines live
        monkeypatch.setattr(diffusers.pipelines, self.pipeline_class.__name__, self.pipeline_class, raising=False)
        super().test_encode_prompt_works_in_isolation()


class TestClassifierFreeGuidancePipelineAsStableDiffusionPipelineMemory(
    StableDiffusionComponents, test_stable_diffusion.TestStableDiffusionPipelineMemory
):
    pass


@pytest.mark.skip(
    reason="IP-Adapter (image prompts through an image_encoder and IPAdapterMixin) is a feature this package does not "
    "support"
)
class TestClassifierFreeGuidancePipelineAsStableDiffusionPipelineIPAdapter(
    StableDiffusionComponents, test_stable_diffusion.TestStableDiffusionPipelineIPAdapter
):
    pass


# ---------------------------------------------------------------------------------------------- side by side


STABLE_DIFFUSION_CALLS = {
    # the calls of Diffusers' tests with expected pixel values: scheduler (from the dummy DDIM's config), arguments
    "ddim": (None, {}),
    "ddim_factor_8": (None, {"height": 136, "width": 136}),
    "pndm": (lambda config: PNDMScheduler(skip_prk_steps=True), {}),
    "k_lms": (LMSDiscreteScheduler.from_config, {}),
    "k_euler_ancestral": (EulerAncestralDiscreteScheduler.from_config, {}),
    "k_euler": (EulerDiscreteScheduler.from_config, {}),
    "negative_prompt": (lambda config: PNDMScheduler(skip_prk_steps=True), {"negative_prompt": "french fries"}),
    # a Latent Consistency Model's unet (the dummies with time_cond_proj_dim=256): w embedded, not guided
    "lcm": (LCMScheduler.from_config, {}),
    "lcm_custom_timesteps": (LCMScheduler.from_config, {"timesteps": [999, 499], "num_inference_steps": None}),
    # arguments of StableDiffusionPipeline's call that those tests leave at their defaults
    "num_images_per_prompt": (None, {"num_images_per_prompt": 2}),
    "ays_sigmas": (
        EulerDiscreteScheduler.from_config,
        {"sigmas": AysSchedules["StableDiffusionSigmas"], "num_inference_steps": None},
    ),
    # StableDiffusionPipeline's defaults: guidance_scale 7.5, 50 steps
    "defaults": (None, {"guidance_scale": None, "num_inference_steps": None}),
}


@pytest.mark.parametrize("call", STABLE_DIFFUSION_CALLS)
def test_same_images_as_stable_diffusion_pipeline(call, tmp_path):
    """On Diffusers' Stable Diffusion dummies (their tokenizer offline), the images of StableDiffusionPipeline, same
    seed and arguments, for each call of Diffusers' tests that checks expected pixel values (EXPECTED_VALUES), and
    with StableDiffusionPipeline's defaults."""
    make_scheduler, arguments = STABLE_DIFFUSION_CALLS[call]
    config = StableDiffusionComponents()
    config.tokenizer_path = tmp_path
    components = test_stable_diffusion.StableDiffusionPipelineTesterConfig.get_dummy_components
    with offline_tokenizer(tmp_path):
        components = components(config, time_cond_proj_dim=256 if call.startswith("lcm") else None)
    if make_scheduler is not None:
        components["scheduler"] = make_scheduler(components["scheduler"].config)
    images = []
    for pipeline_class in (StableDiffusionPipeline, ClassifierFreeGuidancePipeline):
        # each pipeline steps its own copy of the scheduler, ours of the one StableDiffusionPipeline uses (it sets
        # a scheduler's steps_offset to 1: EXPECTED_VALUES)
        scheduler = components["scheduler"] = copy.deepcopy(components["scheduler"])
        kept = {**components, "scheduler": scheduler}
        if pipeline_class is ClassifierFreeGuidancePipeline:
            kept = {name: part for name, part in kept.items() if part is not None}
        pipe = pipeline_class(**kept)
        pipe.set_progress_bar_config(disable=True)
        inputs = {**config.get_dummy_inputs(), **arguments}
        inputs = {name: value for name, value in inputs.items() if value is not None}
        images.append(pipe(**inputs).images)
    assert images[0].shape == images[1].shape
    torch.testing.assert_close(images[1], images[0], atol=1e-4, rtol=0)


def test_same_images_as_dit_pipeline_with_its_defaults():
    """On Diffusers' DiT dummies, with DiTPipeline's defaults (guidance_scale 4.0, 50 steps), its images."""
    components = test_dit.DiTPipelineFastTests().get_dummy_components()
    images = []
    for pipeline_class in (DiTPipeline, ClassifierFreeGuidancePipeline):
        scheduler = DDIMScheduler.from_config(components["scheduler"].config)
        pipe = pipeline_class(**{**components, "scheduler": scheduler})
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe([1, 3], generator=torch.Generator().manual_seed(0), output_type="np").images)
    np.testing.assert_allclose(images[1], images[0], atol=1e-4, rtol=0)
