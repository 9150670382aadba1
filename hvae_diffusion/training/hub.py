"""The model card of a trained pipeline and its upload to the Hugging Face Hub.

The card is rendered from the repository's top-level ``model_card.md`` Jinja template with
``huggingface_hub.ModelCard`` and written as ``README.md`` into the pipeline folder before anything is uploaded, so
the local output is complete whether or not the upload succeeds.
"""

import json
import os
from importlib import metadata, resources
from pathlib import Path

from ..guidance import DEFAULT_GUIDANCE_SCALE

PACKAGE = "hvae-diffusion"


def model_card_template():
    """The model card template: ``hvae_diffusion/model_card.md`` in a wheel (setup.py's build step copies it there
    from the top-level ``model_card.md``), else the top-level file of the checkout this package is imported from."""
    packaged = resources.files("hvae_diffusion").joinpath("model_card.md")
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "model_card.md"


def install_command():
    """A ``pip install`` line that works for someone who has only the model card.

    The package is on no index, so the line names where this copy came from: the git URL and commit it was installed
    from (PEP 610's ``direct_url.json``, e.g. after ``pip install git+https://...``), else the ``Source`` project URL
    of its metadata; None when neither is known (the card then says to install it from its source)."""
    try:
        distribution = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    direct_url = json.loads(distribution.read_text("direct_url.json") or "{}")
    vcs = direct_url.get("vcs_info", {})
    if vcs.get("vcs") == "git" and direct_url.get("url"):
        commit = f"@{vcs['commit_id']}" if vcs.get("commit_id") else ""
        return f'pip install "{PACKAGE} @ git+{direct_url["url"]}{commit}"'
    for entry in distribution.metadata.get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("source", "repository") and url.strip():
            return f'pip install "{PACKAGE} @ git+{url.strip()}"'
    return None


# Never uploaded: checkpoints (they stay beside the run), logs, and anything temporary (``checkpoint-N.tmp`` folders
# of an interrupted save, ``.tmp*`` files and folders of atomic writes).
UPLOAD_IGNORE_PATTERNS = (
    *("checkpoint-*", "logs/*", "*.tmp", "*.tmp/*", ".tmp*", "*/.tmp*", "__pycache__/*"),
    ".training.lock",  # the output folder's lock (training/runs.py), held while a run writes
)


# The guided calls show the package's one default guidance scale (guidance.DEFAULT_GUIDANCE_SCALE) explicitly.
USAGE = {
    "HVAEPipeline": "images = pipe(batch_size=16, num_inference_steps=100).images",
    "ClassifierFreeGuidancePipeline": (
        f"images = pipe(class_labels=list(range(10)), guidance_scale={DEFAULT_GUIDANCE_SCALE}, "
        "num_inference_steps=100).images"
    ),
    "ClassifierGuidedPipeline": (
        f"images = pipe(class_labels=list(range(10)), guidance_scale={DEFAULT_GUIDANCE_SCALE}, "
        "num_inference_steps=100).images"
    ),
}


class HubUploadError(RuntimeError):
    """The upload failed; the local folder is complete and the message says how to retry."""


def check_hub_credentials(token=None):
    """Before any training: a token (``--hub_token``, ``HF_TOKEN`` or a saved ``hf auth login``) that the Hub
    accepts (``whoami``), so that ``--push_to_hub`` does not fail after the run. Raises a ``ValueError`` naming the
    flag. Returns the account name."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ValueError("--push_to_hub cannot upload with HF_HUB_OFFLINE=1 set; unset it, or drop --push_to_hub")
    token = token or get_token()
    if token is None:
        raise ValueError(
            "--push_to_hub needs a Hugging Face token with write access: run `hf auth login`, set HF_TOKEN, or "
            "pass --hub_token"
        )
    try:
        return HfApi(token=token).whoami()["name"]
    except Exception as error:  # a rejected token (401) or an unreachable Hub: either way the upload would fail
        raise ValueError(
            f"--push_to_hub: could not check the token with the Hub ({type(error).__name__}: {error}); check "
            "--hub_token/HF_TOKEN and the connection, or drop --push_to_hub and upload later"
        ) from error


def render_model_card(output_dir, repo_id=None, template_path=None, **fields):
    """Render the model card into ``output_dir/README.md`` and return the ``ModelCard``.

    Args:
        output_dir: the saved pipeline folder.
        repo_id: the Hub repository the card will live in (for the loading snippet); otherwise the folder path as
            given (no absolute path of this machine in a card that may be uploaded later).
        template_path: a Jinja markdown template; ``model_card.md`` (``model_card_template``) by default.
        fields: the template's variables: ``pipeline_class``, ``dataset``, ``prediction_type``, ``loss_weighting``,
            ``variance_type``, ``conditioning``, ``num_train_steps``, ``final_loss``, ``bits_per_dim``,
            ``sample_grid`` (a file name inside ``output_dir``), ``frechet_distance`` (in the evaluation classifier's
            features), ``guided_accuracy``, ``extra``, ``usage`` (the sampling line of the loading snippet; by default
            from ``pipeline_class``) and ``install`` (by default ``install_command()``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    if template_path is None:
        template_text = model_card_template().read_text(encoding="utf-8")
    elif Path(template_path).is_file():
        template_text = Path(template_path).read_text(encoding="utf-8")
    else:
        raise FileNotFoundError(f"template_path: no model card template at {template_path}")
    card_data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=["diffusers", "hvae-diffusion"]
        + (["unconditional-image-generation"] if fields.get("pipeline_class") in (None, "HVAEPipeline") else []),
        datasets=[fields["dataset"]] if fields.get("dataset") and "/" in str(fields.get("dataset")) else None,
    )
    fields.setdefault("usage", USAGE.get(fields.get("pipeline_class"), USAGE["HVAEPipeline"]))
    fields.setdefault("install", install_command())
    fields.setdefault("version", __import__("hvae_diffusion").__version__)
    card = ModelCard.from_template(
        card_data, template_str=template_text, repo_id=repo_id or os.fspath(output_dir), **fields
    )
    card.save(os.path.join(output_dir, "README.md"))
    return card


def push_to_hub(
    output_dir,
    repo_id,
    token=None,
    private=False,
    commit_message="Upload pipeline trained with hvae-diffusion",
    ignore_patterns=UPLOAD_IGNORE_PATTERNS,
):
    """Create ``repo_id`` (if needed) and upload ``output_dir`` to it; return the commit URL.

    Checkpoints, logs and temporary files (``UPLOAD_IGNORE_PATTERNS``) are not uploaded. On any failure raises ``HubUploadError`` whose message says the local
    output is complete and gives the command that retries the upload.
    """
    from huggingface_hub import HfApi

    if not repo_id:
        raise ValueError("--hub_model_id is required with --push_to_hub (e.g. your-name/hvae-digits)")
    try:
        api = HfApi(token=token)  # made here so that the endpoint (HF_ENDPOINT) is read at call time
        repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            token=token,
            commit_message=commit_message,
            ignore_patterns=list(ignore_patterns),
        )
    except Exception as error:  # any network, HTTP or auth failure: the local folder is already complete
        raise HubUploadError(
            f"uploading {output_dir!r} to the Hub repo {repo_id!r} failed ({type(error).__name__}: {error}). "
            f"The local output in {output_dir!r} is complete. Retry the upload with:\n"
            f"  hf upload {repo_id} {output_dir} . "
            + " ".join(f"--exclude '{pattern}'" for pattern in ignore_patterns)
            + (" --private" if private else "")
        ) from error
    return getattr(commit, "commit_url", str(commit))
