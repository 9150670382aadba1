"""The model card of a trained pipeline and its upload to the Hugging Face Hub.

The card is rendered from the repository's ``model_card.md`` Jinja template with ``huggingface_hub.ModelCard`` and
written as ``README.md`` into the pipeline folder before anything is uploaded, so the local output is complete
whether or not the upload succeeds.
"""

import os
from pathlib import Path

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[2] / "model_card.md"


USAGE = {
    "HVAEPipeline": "images = pipe(batch_size=16, num_inference_steps=100).images",
    "ClassifierFreeGuidancePipeline": (
        "images = pipe(class_labels=list(range(10)), guidance_scale=3.0, num_inference_steps=100).images"
    ),
    "ClassifierGuidedPipeline": (
        "images = pipe(class_labels=list(range(10)), guidance_scale=2.0, num_inference_steps=100).images"
    ),
}


class HubUploadError(RuntimeError):
    """The upload failed; the local folder is complete and the message says how to retry."""


def render_model_card(output_dir, repo_id=None, template_path=None, **fields):
    """Render the model card into ``output_dir/README.md`` and return the ``ModelCard``.

    Args:
        output_dir: the saved pipeline folder.
        repo_id: the Hub repository the card will live in (for the loading snippet); the folder path otherwise.
        template_path: a Jinja markdown template; the repository's ``model_card.md`` by default.
        fields: the template's variables: ``pipeline_class``, ``dataset``, ``prediction_type``, ``loss_weighting``,
            ``variance_type``, ``conditioning``, ``num_train_steps``, ``final_loss``, ``bits_per_dim``,
            ``sample_grid`` (a file name inside ``output_dir``), ``fid``, ``guided_accuracy``, ``extra``, and
            ``usage`` (the sampling line of the loading snippet; by default from ``pipeline_class``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    template_path = Path(template_path or MODEL_CARD_TEMPLATE)
    if not template_path.is_file():
        raise FileNotFoundError(f"model card template not found: {template_path} (pass template_path)")
    card_data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=["diffusers", "hvae-diffusion", "unconditional-image-generation"],
        datasets=[fields["dataset"]] if fields.get("dataset") and "/" in str(fields.get("dataset")) else None,
    )
    fields.setdefault("usage", USAGE.get(fields.get("pipeline_class"), USAGE["HVAEPipeline"]))
    card = ModelCard.from_template(
        card_data, template_path=str(template_path), repo_id=repo_id or os.path.abspath(output_dir), **fields
    )
    card.save(os.path.join(output_dir, "README.md"))
    return card


def push_to_hub(
    output_dir,
    repo_id,
    token=None,
    private=False,
    commit_message="Upload pipeline trained with hvae-diffusion",
    ignore_patterns=("checkpoint-*", "logs/*", "*.tmp"),
):
    """Create ``repo_id`` (if needed) and upload ``output_dir`` to it; return the commit URL.

    Checkpoints and logs are not uploaded. On any failure raises ``HubUploadError`` whose message says the local
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
            f"  hf upload {repo_id} {output_dir} . --exclude 'checkpoint-*' --exclude 'logs/*'"
            + (" --private" if private else "")
        ) from error
    return getattr(commit, "commit_url", str(commit))
