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
import json
import unittest.mock

import diffusers
import pytest
from packaging.version import Version

# The vendored tests import what the Diffusers release they were taken from has (hooks, test mixins); the oldest
# Diffusers that setup.cfg allows lacks some of it and runs the loading tests only.
VENDORED_FOR = Version("0.42")
if Version(Version(diffusers.__version__).base_version) < VENDORED_FOR:
    pytest.skip(
        f"Diffusers' vendored pipeline tests need diffusers>={VENDORED_FOR}, found {diffusers.__version__}",
        allow_module_level=True,
    )

from diffusers_tests.pipelines.ddim import test_ddim  # noqa: E402
from diffusers_tests.pipelines.dit import test_dit  # noqa: E402
from diffusers_tests.pipelines.stable_diffusion import test_stable_diffusion  # noqa: E402
from huggingface_hub import try_to_load_from_cache  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from hvae_diffusion import ClassifierFreeGuidancePipeline, HVAEPipeline  # noqa: E402

# Diffusers' Stable Diffusion dummies load this tokenizer from the Hub; the tests run offline.
HUB_TOKENIZER = "hf-internal-testing/tiny-random-clip"
HUB_TOKENIZER_CACHED = isinstance(try_to_load_from_cache(HUB_TOKENIZER, "vocab.json"), str)
NEEDS_HUB_TOKENIZER = (
    f"its expected pixel values were computed with {HUB_TOKENIZER}'s vocabulary, which is not in the local Hub "
    "cache (the tests run offline with a byte-level CLIP tokenizer of the same size in its place)"
)
NEEDS_HUB = "loads a checkpoint of Diffusers' StableDiffusionPipeline from the Hub (the tests run offline)"
NEEDS_ACCELERATOR_OFFLOAD = "CPU offloading moves components between an accelerator and the CPU"


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


# ---------------------------------------------------------------------------------------------- DDIMPipeline


class TestHVAEPipelineAsDDIMPipeline(test_ddim.DDIMPipelineFastTests):
    pipeline_class = HVAEPipeline


# ---------------------------------------------------------------------------------------------- DiTPipeline


class TestClassifierFreeGuidancePipelineAsDiTPipeline(test_dit.DiTPipelineFastTests):
    pipeline_class = ClassifierFreeGuidancePipeline


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
    pass
