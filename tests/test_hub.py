"""Model card, Hub upload and loading back from the Hub, against the loopback stand-in in tests/hub_server.py (never
the real Hub). Everything that talks to the stand-in runs in a subprocess whose HF_ENDPOINT points at it, because
huggingface_hub reads the endpoint at import time."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hub_server import FakeHub, hub_environment

from hvae_diffusion.training.hub import HubUploadError, render_model_card

CARD_FIELDS = dict(
    pipeline_class="ClassifierFreeGuidancePipeline",
    dataset="scikit-learn digits (built in)",
    prediction_type="v_prediction",
    loss_weighting="min_snr",
    variance_type="fixed_small",
    conditioning="class",
    num_train_steps=1234,
    final_loss="0.0421",
    bits_per_dim="1.234",
    sample_grid="samples/step-001234.png",
    frechet_distance=None,
    guided_accuracy="0.950",
    extra=None,
)


def make_output_folder(root):
    """A pipeline-like output folder with checkpoints and logs that must not be uploaded."""
    for relative, content in {
        "model_index.json": "{}",
        "unet/config.json": "{}",
        "unet/diffusion_pytorch_model.safetensors": "weights",
        "scheduler/scheduler_config.json": "{}",
        "samples/step-001234.png": "png",
        "checkpoint-5/model.safetensors": "ckpt",
        "checkpoint-6.tmp/model.safetensors": "half-written checkpoint",
        ".tmpk2x9/model.safetensors": "a temporary folder",
        "unet/.tmp_config.json": "a temporary file",
        "logs/train/events": "log",
    }.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(content)
    return root


# Uploads folder_1 to repo_1, folder_2 to repo_2, ... (argv), as --push_to_hub does.
UPLOAD_SNIPPET = """
import sys
from hvae_diffusion.training.hub import HubUploadError, push_to_hub
try:
    for folder, repo_id in zip(sys.argv[1::2], sys.argv[2::2]):
        print(push_to_hub(folder, repo_id, token="hf_fake", private=True))
except HubUploadError as error:
    print(error, file=sys.stderr)
    sys.exit(3)
"""


def run_with_hub(code: str, hub: FakeHub, *args, **environment):
    """Run ``code`` in a fresh interpreter that talks to ``hub``, with its own empty Hugging Face cache."""
    env = {**os.environ, **hub_environment(hub.endpoint), **environment}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, env=env, timeout=300
    )


def run_upload(hub, *folders_and_repo_ids):
    return run_with_hub(UPLOAD_SNIPPET, hub, *map(str, folders_and_repo_ids))


def test_model_card_renders_every_field(tmp_path):
    card = render_model_card(str(tmp_path), repo_id="someone/hvae-digits", **CARD_FIELDS)
    text = (tmp_path / "README.md").read_text()
    assert text == str(card)
    for expected in [
        "ClassifierFreeGuidancePipeline",
        "scikit-learn digits",
        "`v_prediction`",
        "`min_snr`",
        "1234",
        "0.0421",
        "1.234",
        "0.950",
        "samples/step-001234.png",
        'from_pretrained("someone/hvae-digits")',
        "guidance_scale=2.0",
        "library_name: diffusers",
    ]:
        assert expected in text, expected
    assert "Fréchet" not in text  # a missing metric leaves no empty row


def test_upload_sends_files_and_model_card(tmp_path):
    folder = make_output_folder(str(tmp_path / "out"))
    render_model_card(folder, repo_id="someone/hvae-digits", **CARD_FIELDS)
    with FakeHub() as hub:
        result = run_upload(hub, folder, "someone/hvae-digits")
    assert result.returncode == 0, result.stderr
    assert hub.repos_created == [("someone/hvae-digits", "private")]
    files = hub.repos["someone/hvae-digits"]
    assert set(files) == {
        "README.md",
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "samples/step-001234.png",
    }
    assert files["unet/diffusion_pytorch_model.safetensors"] == b"weights"
    assert b"ClassifierFreeGuidancePipeline" in files["README.md"]
    assert hub.validated and "library_name: diffusers" in hub.validated[0]
    assert "/commit/" in result.stdout


def test_failed_upload_keeps_local_output_and_says_how_to_retry(tmp_path):
    folder = make_output_folder(str(tmp_path / "out"))
    render_model_card(folder, repo_id="someone/hvae-digits", **CARD_FIELDS)
    before = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    with FakeHub(fail=True) as hub:
        result = run_upload(hub, folder, "someone/hvae-digits")
    assert result.returncode == 3
    assert "is complete" in result.stderr and "hf upload someone/hvae-digits" in result.stderr
    after = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    assert before == after and "README.md" in after


def test_push_without_repo_id_is_an_error(tmp_path):
    from hvae_diffusion.training.hub import push_to_hub

    with pytest.raises(ValueError, match="--hub_model_id"):
        push_to_hub(str(tmp_path), None)
    assert issubclass(HubUploadError, RuntimeError)


DDPM_LOADING = """
import sys
import numpy as np
from diffusers import DiffusionPipeline
import torch
pipeline = DiffusionPipeline.from_pretrained("someone/ddpm")
pipeline.set_progress_bar_config(disable=True)
images = pipeline(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np")
print(type(pipeline).__name__)
np.save(sys.argv[1], images.images)
"""


def test_stand_in_serves_a_plain_ddpm_pipeline(tmp_path):
    """The stand-in's read API is enough for Diffusers' own loading of a plain DDPMPipeline repo."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler
    from test_pipelines import quiet, tiny_unet

    pipeline = quiet(DDPMPipeline(tiny_unet(), DDPMScheduler(num_train_timesteps=5)))
    pipeline.save_pretrained(tmp_path / "ddpm")
    expected = pipeline(
        batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    with FakeHub() as hub:
        hub.publish("someone/ddpm", tmp_path / "ddpm")
        result = run_with_hub(DDPM_LOADING, hub, str(tmp_path / "out.npy"), HF_HOME=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["DDPMPipeline"]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected.images)
    assert ("GET", "/api/models/someone/ddpm/revision/main") in hub.requests
    assert any(method == "HEAD" and "/resolve/" in path for method, path in hub.requests)


# Loads every pushed repo in one fresh process and saves its samples. ``case`` is "imported" (a: import the package,
# no trust_remote_code), "remote_code" (b: the package is installed but never imported; trust_remote_code=True) or
# "own_class" (c: each pipeline's own class).
HUB_LOADING = """
import json, sys
import numpy as np
import torch
from diffusers import DiffusionPipeline

case, out, calls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if case != "remote_code":
    import hvae_diffusion
print("imported" if "hvae_diffusion" in sys.modules else "not-imported", "before loading")
for repo_id, (class_name, kwargs) in calls.items():
    if case == "own_class":
        pipeline = getattr(hvae_diffusion, class_name).from_pretrained(repo_id)
    else:
        pipeline = DiffusionPipeline.from_pretrained(repo_id, **({"trust_remote_code": True} if case == "remote_code" else {}))
    assert type(pipeline).__name__ == class_name, type(pipeline)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs)
    np.save(f"{out}/{repo_id.replace('/', '--')}.npy", images.images)
"""

HUB_CALLS = {
    "someone/hvae": ("HVAEPipeline", {"batch_size": 2}),
    "someone/classifier": ("ClassifierGuidedPipeline", {"class_labels": [0, 2]}),
    "someone/free": ("ClassifierFreeGuidancePipeline", {"class_labels": [0, 2], "guidance_scale": 2.0}),
}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """The three pipelines saved as a training run leaves them (with a stray temporary folder and a checkpoint),
    each with its model card, uploaded by ``push_to_hub`` to a stand-in Hub that stays up for the module's tests."""
    import torch
    from test_pipelines import quiet, tiny_classifier, tiny_unet

    from hvae_diffusion import ClassifierFreeGuidancePipeline, ClassifierGuidedPipeline, HVAEPipeline, HVAEScheduler

    root = tmp_path_factory.mktemp("pushed")
    scheduler = HVAEScheduler(num_train_timesteps=100)  # the card's snippet samples 100 steps
    pipelines = {
        "someone/hvae": HVAEPipeline(tiny_unet(), scheduler),
        "someone/classifier": ClassifierGuidedPipeline(tiny_unet(), scheduler, tiny_classifier(3)),
        "someone/free": ClassifierFreeGuidancePipeline(tiny_unet(num_class_embeds=11), scheduler),
    }
    expected, upload_arguments = {}, []
    for repo_id, pipeline in pipelines.items():
        folder = root / repo_id.replace("/", "--")
        pipeline.save_pretrained(folder)
        (folder / ".tmpa1b2").mkdir()
        (folder / ".tmpa1b2" / "model_index.json").write_text("{}")
        (folder / "checkpoint-3").mkdir()
        (folder / "checkpoint-3" / "model.safetensors").write_text("ckpt")
        render_model_card(str(folder), repo_id=repo_id, **{**CARD_FIELDS, "pipeline_class": HUB_CALLS[repo_id][0]})
        upload_arguments += [folder, repo_id]
        class_name, kwargs = HUB_CALLS[repo_id]
        expected[repo_id] = quiet(pipeline)(
            num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs
        ).images
    with FakeHub() as hub:
        result = run_upload(hub, *upload_arguments)
        assert result.returncode == 0, result.stderr[-3000:]
        yield hub, expected


def test_push_uploads_only_the_pipeline(pushed):
    hub, _ = pushed
    assert sorted(hub.repos["someone/classifier"]) == [
        "README.md",
        "classifier/config.json",
        "classifier/diffusion_pytorch_model.safetensors",
        "classifier/hvae_diffusion_component.py",
        "hvae_diffusion_pipeline.py",
        "model_index.json",
        "scheduler/hvae_diffusion_component.py",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]


@pytest.mark.parametrize("case", ["imported", "remote_code", "own_class"])
def test_pushed_pipelines_load_from_the_hub_and_sample_the_same(pushed, tmp_path, case):
    hub, expected = pushed
    result = run_with_hub(HUB_LOADING, hub, case, str(tmp_path), json.dumps(HUB_CALLS), HF_HOME=str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["not-imported" if case == "remote_code" else "imported", "before", "loading"]
    for repo_id, images in expected.items():
        np.testing.assert_array_equal(np.load(tmp_path / f"{repo_id.replace('/', '--')}.npy"), images)


def test_model_card_snippets_run_as_written(pushed, tmp_path):
    """The cards' loading snippets, copied from the uploaded README.md files, run one after the other in a fresh
    process against the repos they were pushed to."""
    hub, _ = pushed
    script = ""
    for repo_id in ("someone/hvae", "someone/free"):
        card = hub.repos[repo_id]["README.md"].decode()
        assert "must be installed. It is on no\npackage index" in card and '"hvae-diffusion @ git+' in card
        snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
        assert f'DiffusionPipeline.from_pretrained("{repo_id}")' in snippet
        script += snippet + "print(type(pipe).__name__, len(images))\n"
    result = run_with_hub(script, hub, HF_HOME=str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["HVAEPipeline", "16", "ClassifierFreeGuidancePipeline", "10"]


def test_a_card_rendered_without_a_repo_names_the_folder_as_given_not_an_absolute_path(tmp_path, monkeypatch):
    from hvae_diffusion.training.hub import render_model_card

    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/digits")
    card = render_model_card("runs/digits", pipeline_class="ClassifierFreeGuidancePipeline", dataset="digits")
    assert 'DiffusionPipeline.from_pretrained("runs/digits")' in card.content
    assert str(tmp_path) not in card.content


def test_push_to_hub_credentials_are_checked_with_the_hub(tmp_path):
    """``--push_to_hub`` asks the Hub's ``whoami`` before any training: an accepted token gives its account, a
    rejected one (401) is a ``ValueError`` naming the flag, not an upload that fails after the run."""
    code = """
    from hvae_diffusion.training.hub import check_hub_credentials
    print("account:", check_hub_credentials("hf_fake"))
    try:
        check_hub_credentials("hf_rejected")
    except ValueError as error:
        print("refused:", error)
    """
    with FakeHub() as hub:
        completed = run_with_hub(code, hub, HF_HOME=str(tmp_path / "hf_home"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "account: tester" in completed.stdout, completed.stdout
    assert "refused: --push_to_hub: could not check the token with the Hub" in completed.stdout, completed.stdout
    assert sum(path == "/api/whoami-v2" for _, path in hub.requests) == 2
