"""How a saved hvae-diffusion pipeline folder names its class, so that ``DiffusionPipeline.from_pretrained`` finds it.

Diffusers resolves a folder's pipeline class from model_index.json's ``_class_name``: a plain name must be an
attribute of the ``diffusers`` module; a pair ``[module_file, class_name]`` names a module file in the folder,
which Diffusers imports only with ``trust_remote_code=True``. Components are resolved separately, by importing the
library module named in their entry (``["hvae_diffusion.scheduling_hvae", "HVAEScheduler"]`` imports the
installed package).

So ``save_pretrained`` writes ``_class_name = ["hvae_diffusion_pipeline", "<Class>"]`` and a two-line
``hvae_diffusion_pipeline.py`` that imports the class from the installed package: a fresh process loads the folder
with ``trust_remote_code=True``. Once ``hvae_diffusion`` is imported, ``register_pipeline_classes`` makes Diffusers
resolve that pair to the class directly (no remote code involved) and checks that every component's folder exists.
"""

import functools
import json
import os

PIPELINE_MODULE_NAME = "hvae_diffusion_pipeline"

_REFERENCE_MODULE = '''"""Written by hvae-diffusion: the pipeline class lives in the installed `hvae_diffusion` package."""

from hvae_diffusion import {class_name}  # noqa: F401
'''

_registered_classes: dict[str, type] = {}


def write_pipeline_reference(save_directory, pipeline_class: type) -> None:
    """Rewrite ``save_directory``'s model_index.json to name ``pipeline_class`` and write the module that imports it.

    Components keep Diffusers' own entries: ``["hvae_diffusion.scheduling_hvae", "HVAEScheduler"]`` names the
    defining module, which Diffusers imports and searches for the base class (``SchedulerMixin``) that says how to load.
    """
    index_path = os.path.join(save_directory, "model_index.json")
    with open(index_path, encoding="utf-8") as file:
        model_index = json.load(file)
    model_index["_class_name"] = [PIPELINE_MODULE_NAME, pipeline_class.__name__]
    with open(index_path, "w", encoding="utf-8") as file:
        json.dump(model_index, file, indent=2, sort_keys=True)
        file.write("\n")
    with open(os.path.join(save_directory, PIPELINE_MODULE_NAME + ".py"), "w", encoding="utf-8") as file:
        file.write(_REFERENCE_MODULE.format(class_name=pipeline_class.__name__))


def check_components_present(folder, config: dict) -> None:
    """A ``ValueError`` naming the component and the folder when a component listed in model_index.json is missing."""
    for name, entry in config.items():
        if name.startswith("_") or not (isinstance(entry, (list, tuple)) and len(entry) == 2) or entry[0] is None:
            continue
        component_folder = os.path.join(folder, name)
        if not os.path.isdir(component_folder):
            raise ValueError(
                f"component {name!r} ({entry[0]}.{entry[1]}) is listed in {os.path.join(folder, 'model_index.json')} "
                f"but its folder {component_folder} is missing"
            )


def register_pipeline_classes(*pipeline_classes: type) -> None:
    """Let ``DiffusionPipeline.from_pretrained`` resolve folders saved by ``write_pipeline_reference`` to these classes.

    Wraps Diffusers' ``_resolve_custom_pipeline_and_cls`` (the step that reads ``_class_name``): a pair naming
    ``PIPELINE_MODULE_NAME`` and a registered class resolves to that class by name, which is made an attribute of
    ``diffusers`` as Diffusers' own pipelines are. Any other folder is resolved by Diffusers as before.
    """
    import diffusers
    from diffusers.pipelines import pipeline_utils

    for pipeline_class in pipeline_classes:
        _registered_classes[pipeline_class.__name__] = pipeline_class
        setattr(diffusers, pipeline_class.__name__, pipeline_class)

    original = pipeline_utils._resolve_custom_pipeline_and_cls
    if getattr(original, "_resolves_hvae_diffusion", False):
        return

    @functools.wraps(original)
    def resolve(folder, config, custom_pipeline):
        class_name = config.get("_class_name")
        is_ours = (
            isinstance(class_name, (list, tuple))
            and len(class_name) == 2
            and class_name[0] == PIPELINE_MODULE_NAME
            and class_name[1] in _registered_classes
        )
        if custom_pipeline is None and is_ours:
            check_components_present(folder, config)
            return None, class_name[1]
        return original(folder, config, custom_pipeline)

    resolve._resolves_hvae_diffusion = True
    pipeline_utils._resolve_custom_pipeline_and_cls = resolve
