"""How a saved hvae-diffusion pipeline names its classes, so that ``DiffusionPipeline.from_pretrained`` finds them
in a local folder and on the Hub, with or without ``trust_remote_code``.

Diffusers resolves a pipeline class from model_index.json's ``_class_name`` and each component's class from its
``[library, class]`` entry. A library that is neither ``diffusers``, ``transformers``, ... nor a module in
``diffusers.pipelines`` is accepted from a Hub repo only when the repo holds ``<component>/<library>.py``; a
``_class_name`` pair ``[module, class]`` names ``<module>.py`` at the repo's root. Diffusers imports those files only
with ``trust_remote_code=True``.

So ``save_pretrained`` writes ``_class_name = ["hvae_diffusion_pipeline", "<Class>"]`` and each of the package's own
components as ``["hvae_diffusion_component", "<Class>"]``, with a two-line module of that name (at the root and in
the component's folder) that imports the class from the installed package:

- without importing ``hvae_diffusion``, ``trust_remote_code=True`` runs those modules (they only import the package);
- after ``import hvae_diffusion``, ``register_pipeline_classes`` has wrapped Diffusers' module loader so that these
  two module names with one of the package's classes resolve to that class directly: no file from the folder or
  repo is run, so no ``trust_remote_code`` is needed. Any other module goes through Diffusers' loader unchanged.

The wrapped function is ``diffusers.pipelines.pipeline_loading_utils.get_class_from_dynamic_module``, the single
place where Diffusers (0.38 and later) both downloads and trust-checks pipeline and component code. Older versions
check trust in ``DiffusionPipeline.download`` before calling it, which is why setup.cfg requires diffusers>=0.38.
It is the only Diffusers function the package patches, and only because no public route exists: docs/pipelines.md
("The one Diffusers function the package wraps") names the Diffusers code that blocks the other two routes, and
docs/upstream/diffusers-register-installed-class.diff is the upstream change, with its test, that replaces the wrapper
by a public registration call.

A score model's scheduler is saved as one that steps ε (``write_steppable_scheduler_config``), so every Diffusers
scheduler can be built from a saved pipeline's scheduler config.
"""

import functools
import inspect
import json
import os

PIPELINE_MODULE_NAME = "hvae_diffusion_pipeline"
COMPONENT_MODULE_NAME = "hvae_diffusion_component"
MINIMUM_DIFFUSERS = "0.38"

_REFERENCE_MODULE = '''"""Written by hvae-diffusion: the class lives in the `hvae_diffusion` package (pip install hvae-diffusion)."""

from hvae_diffusion import {class_name}  # noqa: F401
'''

_registered_classes: dict[str, type] = {}


def _write_reference_module(folder, module_name: str, class_name: str) -> None:
    with open(os.path.join(folder, module_name + ".py"), "w", encoding="utf-8") as file:
        file.write(_REFERENCE_MODULE.format(class_name=class_name))


def write_steppable_scheduler_config(save_directory) -> None:
    """Save a score model's scheduler as one that steps ε, and the model's parameterization in the pipeline config.

    Every Diffusers scheduler steps "epsilon", "sample" or "v_prediction", none steps "score". A scheduler saved with
    ``prediction_type="score"`` is rewritten to ``"epsilon"`` (the same sampler: the pipeline converts the model's
    score to ε with ᾱ_t of each step), and model_index.json's ``prediction_type``, the model's own parameterization,
    becomes ``"score"`` unless it names one already. So ``pipe.scheduler = AnyScheduler.from_config(
    pipe.scheduler.config)`` works on every saved pipeline.
    """
    index_path = os.path.join(save_directory, "model_index.json")
    scheduler_path = os.path.join(save_directory, "scheduler", "scheduler_config.json")
    if not os.path.isfile(scheduler_path):
        return
    with open(scheduler_path, encoding="utf-8") as file:
        scheduler_config = json.load(file)
    if scheduler_config.get("prediction_type") != "score":
        return
    with open(index_path, encoding="utf-8") as file:
        model_index = json.load(file)
    model_index["prediction_type"] = model_index.get("prediction_type") or "score"
    scheduler_config["prediction_type"] = "epsilon"
    _write_json(scheduler_path, scheduler_config)
    _write_json(index_path, model_index)


def _write_json(path, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(content, file, indent=2, sort_keys=True)
        file.write("\n")


def write_pipeline_reference(save_directory, pipeline_class: type) -> None:
    """Rewrite ``save_directory``'s model_index.json to name ``pipeline_class`` and the package's own components by
    the reference modules, and write those modules (see the module docstring).

    A component class that the package exports (``from hvae_diffusion import X``, what its reference module imports)
    is named by the reference module; any other class of the package (``hvae_diffusion.testing``'s exact denoisers)
    keeps its ``[module, class]`` entry, which Diffusers imports from a local folder but not from a Hub repo.
    """
    import hvae_diffusion

    index_path = os.path.join(save_directory, "model_index.json")
    with open(index_path, encoding="utf-8") as file:
        model_index = json.load(file)
    model_index["_class_name"] = [PIPELINE_MODULE_NAME, pipeline_class.__name__]
    _write_reference_module(save_directory, PIPELINE_MODULE_NAME, pipeline_class.__name__)
    for name, entry in model_index.items():
        if name.startswith("_") or not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            continue
        library, class_name = entry
        if library != "hvae_diffusion" and not library.startswith("hvae_diffusion."):
            continue
        if not isinstance(getattr(hvae_diffusion, class_name, None), type):
            continue
        model_index[name] = [COMPONENT_MODULE_NAME, class_name]
        _write_reference_module(os.path.join(save_directory, name), COMPONENT_MODULE_NAME, class_name)
    _write_json(index_path, model_index)
    write_steppable_scheduler_config(save_directory)


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


def resolve_reference(location, module_file, class_name):
    """The class that a reference module written by ``write_pipeline_reference`` names, or ``None`` if
    ``module_file`` is not one of them or names a class this package does not provide.

    ``location`` is a local folder or a Hub repo id; for a local pipeline folder, every component it lists must be
    present (``check_components_present``).
    """
    import hvae_diffusion

    module_name = os.path.basename(str(module_file or ""))
    if module_name == PIPELINE_MODULE_NAME + ".py":
        resolved = _registered_classes.get(class_name)
        index_path = os.path.join(str(location), "model_index.json")
        if resolved is not None and os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as file:
                check_components_present(str(location), json.load(file))
        return resolved
    if module_name == COMPONENT_MODULE_NAME + ".py" and class_name and not class_name.startswith("_"):
        resolved = getattr(hvae_diffusion, class_name, None)
        return resolved if isinstance(resolved, type) else None
    return None


def _loader_hook_error(reason: str):
    import diffusers

    return ImportError(
        f"hvae_diffusion cannot register its pipelines with diffusers {diffusers.__version__}: {reason}. "
        f"Saved hvae-diffusion pipelines load through that function; install diffusers>={MINIMUM_DIFFUSERS} "
        "(pip install -U diffusers)."
    )


def register_pipeline_classes(*pipeline_classes: type) -> None:
    """Let ``DiffusionPipeline.from_pretrained`` load folders and Hub repos saved by ``write_pipeline_reference`` as
    these classes, without ``trust_remote_code``.

    Wraps ``diffusers.pipelines.pipeline_loading_utils.get_class_from_dynamic_module`` once (see the module
    docstring); an ``ImportError`` names the cause when the installed Diffusers does not have it in the expected form.
    """
    import diffusers
    from diffusers.pipelines import pipeline_loading_utils
    from packaging import version

    for pipeline_class in pipeline_classes:
        _registered_classes[pipeline_class.__name__] = pipeline_class

    original = getattr(pipeline_loading_utils, "get_class_from_dynamic_module", None)
    if getattr(original, "_resolves_hvae_diffusion", False):
        return
    if version.parse(diffusers.__version__).release < version.parse(MINIMUM_DIFFUSERS).release:
        raise _loader_hook_error("it checks trust_remote_code before its module loader, which this package wraps")
    if not callable(original):
        raise _loader_hook_error("diffusers.pipelines.pipeline_loading_utils has no get_class_from_dynamic_module")
    parameters = inspect.signature(original).parameters
    if not {"module_file", "class_name"} <= set(parameters):
        raise _loader_hook_error(
            f"get_class_from_dynamic_module takes {list(parameters)}, not the module_file and class_name it wraps"
        )

    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_class_from_dynamic_module(pretrained_model_name_or_path, *args, **kwargs):
        bound = signature.bind_partial(pretrained_model_name_or_path, *args, **kwargs).arguments
        resolved = resolve_reference(pretrained_model_name_or_path, bound.get("module_file"), bound.get("class_name"))
        if resolved is not None:
            return resolved
        return original(pretrained_model_name_or_path, *args, **kwargs)

    get_class_from_dynamic_module._resolves_hvae_diffusion = True
    pipeline_loading_utils.get_class_from_dynamic_module = get_class_from_dynamic_module


def denoiser_prediction_type(pipeline_config: dict, scheduler_config: dict) -> str:
    """The parameterization a saved pipeline's denoiser was trained in: the pipeline's ``prediction_type``, else its
    scheduler's (``write_steppable_scheduler_config`` saves a score model's scheduler as ε)."""
    return pipeline_config.get("prediction_type") or scheduler_config["prediction_type"]


def denoiser_scheduler(pipeline):
    """An ``HVAEScheduler`` with ``pipeline``'s forward process, in the parameterization of its denoiser: what the
    ELBO and the training losses need, which read the model's output as ``scheduler.config.prediction_type``."""
    from ..scheduling_hvae import HVAEScheduler

    prediction_type = denoiser_prediction_type(pipeline.config, pipeline.scheduler.config)
    return HVAEScheduler.from_config(pipeline.scheduler.config, prediction_type=prediction_type)


def load_denoiser_scheduler(pretrained_model_name_or_path, **kwargs):
    """``denoiser_scheduler`` of a saved pipeline (a folder or Hub repo), loading only its scheduler and
    model_index.json; ``kwargs`` go to both ``from_pretrained`` calls (``revision``, ``token``, ...)."""
    from diffusers import DiffusionPipeline

    from ..scheduling_hvae import HVAEScheduler

    scheduler = HVAEScheduler.from_pretrained(pretrained_model_name_or_path, subfolder="scheduler", **kwargs)
    try:
        pipeline_config = DiffusionPipeline.load_config(pretrained_model_name_or_path, **kwargs)
    except OSError:  # a scheduler saved on its own, without a pipeline around it
        pipeline_config = {}
    prediction_type = denoiser_prediction_type(pipeline_config, scheduler.config)
    return HVAEScheduler.from_config(scheduler.config, prediction_type=prediction_type)
