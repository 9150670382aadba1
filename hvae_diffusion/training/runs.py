"""A run's output folder: its lock, its record, and its checkpoints, verified by content.

A training run owns its ``output_dir``:

- ``.training.lock`` (``filelock``) is held while the run writes, so a second run into the same folder is refused
  with a clear error instead of both writing and the last one silently winning.
- ``training_run.json`` records the run: its id, the settings that define its model and objective (the flags of
  ``RUN_DEFINING_FLAGS``, ``--use_ema`` and the model's class and config) with their sha256, and whether it finished.
- each ``checkpoint-<step>`` holds ``training_state.json``, written last, with the run's id and settings and the
  size and sha256 of every other file in the folder, whatever wrote it (accelerate, the model hooks, or any state a
  loss registers), so a checkpoint is verified by content, not by its file names and sizes.

``plan_run`` decides, before any work, what a run may do with its folder: start there (it is empty, or
``--overwrite_output_dir`` clears it), or resume the newest intact checkpoint of the run the folder holds with the
same settings. It never starts a new run over a finished one, never resumes another run's checkpoint, and names
the flag that changed. ``OutputFile`` is the same promise for a single file (``hvae-sample``'s outputs).
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_FILE = "training_state.json"
RUN_RECORD_FILE = "training_run.json"
LOCK_FILE = ".training.lock"

# the flags that change the model or its objective: resuming with another value would continue a different model
RUN_DEFINING_FLAGS = (
    "prediction_type",
    "variance_type",
    "loss_weighting",
    "snr_gamma",
    "num_train_timesteps",
    "beta_schedule",
    "conditioning",
    "cond_drop_prob",
    "kl_weight",
    "vae_dir",
    "denoiser_dir",
    "resolution",
    "center_crop",
    "random_flip",
    "num_classes",
)


class OutputInUseError(ValueError):
    """Another run holds the lock of the output folder (or file) this run would write."""


def run_flags_from_args(args, resolved=None):
    """``{flag: value}`` of the ``RUN_DEFINING_FLAGS`` a program has, with ``resolved`` values (a flag whose default
    the program resolves, e.g. ``prediction_type`` from a pretrained scheduler) in place of the parsed ones."""
    flags = {name: getattr(args, name) for name in RUN_DEFINING_FLAGS if hasattr(args, name)}
    flags.update({name: value for name, value in (resolved or {}).items() if name in flags})
    for name in ("vae_dir", "denoiser_dir"):
        if flags.get(name) is not None:
            flags[name] = os.path.normpath(flags[name])
    return flags


def normalized(value):
    """``value`` as JSON gives it back (tuples become lists, keys strings), so saved and current settings compare."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def model_identity(model):
    """The model's class and public config (a Diffusers model), or its class and parameter shapes (any module)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "items"):
        return normalized(
            {"class": type(model).__name__, "config": {k: v for k, v in config.items() if not k.startswith("_")}}
        )
    shapes = {name: list(parameter.shape) for name, parameter in model.state_dict().items()}
    return normalized({"class": type(model).__name__, "shapes": shapes})


def settings_sha256(settings):
    return hashlib.sha256(json.dumps(normalized(settings), sort_keys=True).encode()).hexdigest()


def settings_difference(saved, current, checkpoint):
    """A sentence naming the first flag (then the model) whose value differs between the ``saved`` settings of
    ``checkpoint`` and the ``current`` ones, or None. Parts missing on either side are not compared."""
    saved, current = normalized(saved), normalized(current)
    saved_flags, current_flags = saved.get("flags"), current.get("flags")
    if saved_flags is not None and current_flags is not None:
        for name in sorted(set(saved_flags) | set(current_flags)):
            if saved_flags.get(name) != current_flags.get(name):
                return (
                    f"--{name}: {checkpoint} was trained with {saved_flags.get(name)!r}, this run asks for "
                    f"{current_flags.get(name)!r}; resuming would continue a different model or objective. Resume "
                    f"with the flags of that run, or start a new run in another --output_dir"
                )
    saved_model, current_model = saved.get("model"), current.get("model")
    if saved_model is not None and current_model is not None and saved_model != current_model:
        if saved_model.get("class") != current_model.get("class"):
            detail = f"a {saved_model.get('class')} there, a {current_model.get('class')} here"
        else:
            saved_config, current_config = saved_model.get("config", {}), current_model.get("config", {})
            keys = sorted(
                k for k in set(saved_config) | set(current_config) if saved_config.get(k) != current_config.get(k)
            )
            detail = ", ".join(f"{k}={saved_config.get(k)!r} there, {current_config.get(k)!r} here" for k in keys[:3])
            detail = detail or "its parameter shapes differ"
        return (
            f"the model differs from the one {checkpoint} was trained with ({detail}): the flags that build it "
            "(--unet_config, --pretrained_model_name_or_path, --conditioning, the data's --resolution and classes) "
            "must be those of that run"
        )
    return None


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomically(path, value):
    """Write ``value`` to ``path`` through a temporary file and a rename: a reader sees the old file or the new one."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_training_state(folder, state):
    """Write ``training_state.json`` into the checkpoint ``folder``: ``state`` and, under ``files``, the size and
    sha256 of every other file in the folder as this process's disk holds it."""
    files = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, folder)
            if relative != TRAINING_STATE_FILE:
                files[relative.replace(os.sep, "/")] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    write_json_atomically(os.path.join(folder, TRAINING_STATE_FILE), {**state, "files": files})


def read_training_state(path):
    """The ``training_state.json`` of a checkpoint: global_step, run_id, settings, files, losses, ..."""
    with open(os.path.join(path, TRAINING_STATE_FILE)) as handle:
        return json.load(handle)


def checkpoint_problem(path, verify_content=True):
    """Why the checkpoint folder ``path`` cannot be resumed (a sentence), or None when its ``training_state.json``
    is whole and every file it lists is there with its size and (``verify_content``) its sha256."""
    try:
        state = read_training_state(path)
    except (OSError, ValueError) as error:
        return f"its {TRAINING_STATE_FILE} is missing or unreadable ({type(error).__name__})"
    if not isinstance(state, dict):
        return f"its {TRAINING_STATE_FILE} is not a JSON object"
    step = state.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"its {TRAINING_STATE_FILE} has no global_step"
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if match and int(match.group(1)) != step:
        return f"its {TRAINING_STATE_FILE} says step {step}, not the step of its name"
    if not isinstance(state.get("run_id"), str):
        return f"its {TRAINING_STATE_FILE} records no run id (a checkpoint of an older version)"
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        return f"its {TRAINING_STATE_FILE} lists no files"
    for name, entry in sorted(files.items()):
        if not (
            isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
        ):
            return f"its listing of {name} has no size and sha256 (a checkpoint of an older version)"
        if os.path.isabs(name) or os.path.normpath(name).startswith(".."):
            return f"its listing names {name}, outside the checkpoint"
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path) or os.path.getsize(file_path) != entry["size"]:
            return f"{name} is missing or not {entry['size']} bytes"
        if verify_content and file_sha256(file_path) != entry["sha256"]:
            return f"{name} does not match its sha256 (its content changed after it was saved)"
    return None


def checkpoint_folders(output_dir):
    """Every ``checkpoint-<step>`` folder in ``output_dir`` as ``[(step, path)]``, oldest first (``.tmp`` ones are
    writes cut off and never count)."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (int(m.group(1)), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if (m := CHECKPOINT_PATTERN.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    ]
    return sorted(found)


def list_checkpoints(output_dir, complete_only=True, verify_content=True, run_id=None):
    """Checkpoints in ``output_dir`` as ``[(step, path)]``, oldest first; by default only intact ones (see
    ``checkpoint_problem``; ``verify_content=False`` checks sizes only), and with ``run_id`` only that run's."""
    found = []
    for step, path in checkpoint_folders(output_dir):
        if complete_only and checkpoint_problem(path, verify_content) is not None:
            continue
        if run_id is not None and complete_only and read_training_state(path)["run_id"] != run_id:
            continue
        found.append((step, path))
    return found


def usable_problem(path, run_id):
    """``checkpoint_problem``, or that the checkpoint belongs to another run than ``run_id`` (when given)."""
    problem = checkpoint_problem(path)
    if problem is None and run_id is not None:
        other = read_training_state(path)["run_id"]
        if other != run_id:
            problem = f"it belongs to another run (run id {other}; this folder's run is {run_id})"
    return problem


def resolve_checkpoint(output_dir, resume_from_checkpoint, log=print, run_id=None):
    """The checkpoint to resume from: ``"latest"`` → the newest intact one of run ``run_id`` (None if there is none),
    else a path (or a ``checkpoint-<step>`` name inside ``output_dir``).

    Every newer checkpoint that is skipped is named through ``log`` with the reason. A given checkpoint that does
    not exist, is damaged or belongs to another run is a ``ValueError``.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        for step, path in reversed(checkpoint_folders(output_dir)):
            problem = usable_problem(path, run_id)
            if problem is None:
                log(f"resuming from {path}, the newest intact checkpoint")
                return path
            log(f"skipping the checkpoint {path}: {problem}")
        return None
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(output_dir, resume_from_checkpoint)
    name = os.path.basename(os.path.normpath(path))
    problem = usable_problem(path, run_id) if os.path.isdir(path) else None
    if not os.path.isdir(path) or not CHECKPOINT_PATTERN.match(name) or problem is not None:
        available = [os.path.basename(p) for _, p in list_checkpoints(output_dir, run_id=run_id)]
        reason = f"unusable checkpoint ({problem})" if problem else "no such checkpoint (a checkpoint-<step> folder)"
        raise ValueError(
            f"--resume_from_checkpoint={resume_from_checkpoint!r}: {reason}; intact checkpoints in {output_dir!r}: "
            f"{available or 'none'}; use 'latest' to pick the newest"
        )
    return path


def read_run_record(output_dir):
    """The folder's ``training_run.json`` (run_id, settings, settings_sha256, finished), or None."""
    try:
        with open(os.path.join(output_dir, RUN_RECORD_FILE)) as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_id"), str) else None


def write_run_record(output_dir, run_id, settings, finished=False):
    record = {
        "run_id": run_id,
        "settings_sha256": settings_sha256(settings),
        "settings": settings,
        "finished": finished,
    }
    write_json_atomically(os.path.join(output_dir, RUN_RECORD_FILE), normalized(record))


def folder_entries(output_dir):
    """What ``output_dir`` holds, its lock file aside."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir) if name != LOCK_FILE)


def lock_output_dir(output_dir):
    """Create ``output_dir`` and take its lock (released with ``.release()``); an ``OutputInUseError`` when
    another run holds it."""
    from filelock import FileLock, Timeout

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir={output_dir!r} is a file, not a folder")
    os.makedirs(output_dir, exist_ok=True)
    lock = FileLock(os.path.join(output_dir, LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputInUseError(
            f"--output_dir={output_dir!r} is in use: another run is writing there (it holds {LOCK_FILE}); wait for "
            "it to end, or choose another folder"
        ) from None
    return lock


def check_output_dir_free(output_dir):
    """An ``OutputInUseError`` when another run holds the lock of ``output_dir``; creates nothing."""
    if os.path.isfile(os.path.join(output_dir, LOCK_FILE)):
        lock_output_dir(output_dir).release()


def clear_output_dir(output_dir):
    """Remove everything in ``output_dir`` but its lock: ``--overwrite_output_dir`` replaces the old run whole, so
    none of its checkpoints, samples or logs can be mistaken for the new run's."""
    for name in folder_entries(output_dir):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def check_clearable(output_dir):
    here, target = os.path.abspath(os.getcwd()), os.path.abspath(output_dir)
    if os.path.commonpath([here, target]) == target:
        raise ValueError(
            f"--output_dir={output_dir!r} --overwrite_output_dir would delete the current folder ({here}); "
            "choose a folder of its own for the run"
        )


@dataclass
class RunPlan:
    """What a run does with its folder: ``run_id``, the checkpoint it resumes (or None), and whether the folder's
    old content is removed first (``clear``)."""

    run_id: str
    resume_path: str | None = None
    clear: bool = False


def plan_run(output_dir, resume_from_checkpoint, overwrite_output_dir, settings, log=print):
    """Decide, without writing anything, what a run asked for by these flags does with ``output_dir``; a
    ``ValueError`` naming the flag when it would replace, mix or lose a run.

    - ``--overwrite_output_dir``: a new run in the cleared folder (with a ``--resume_from_checkpoint`` from
      elsewhere, that checkpoint's run continues there).
    - no ``--resume_from_checkpoint``: a new run, in an empty folder only.
    - ``latest``: the newest intact checkpoint of the folder's run. With none, a new run only if the folder is empty
      or holds a run that stopped before its first checkpoint; a finished run or other files are refused.
    - a checkpoint path: that checkpoint, if it belongs to the folder's run (or the folder is empty).

    A resumed checkpoint must have been trained with the same ``settings`` (``settings_difference``).
    """
    entries = folder_entries(output_dir)
    record = read_run_record(output_dir)
    in_folder = resume_from_checkpoint is not None and (
        resume_from_checkpoint == "latest"
        or not os.path.isdir(resume_from_checkpoint)
        or os.path.abspath(os.path.dirname(os.path.normpath(resume_from_checkpoint))) == os.path.abspath(output_dir)
    )
    if overwrite_output_dir:
        if in_folder and entries:
            raise ValueError(
                f"--overwrite_output_dir removes everything in --output_dir={output_dir!r}, the checkpoint of "
                f"--resume_from_checkpoint={resume_from_checkpoint!r} included; pass one of them"
            )
        check_clearable(output_dir)
        plan = RunPlan(uuid.uuid4().hex, clear=bool(entries))
        if resume_from_checkpoint is not None:
            plan.resume_path = resolve_checkpoint(output_dir, resume_from_checkpoint, log)
            plan.run_id = read_training_state(plan.resume_path)["run_id"]
    elif resume_from_checkpoint is None:
        if entries:
            resumable = bool(list_checkpoints(output_dir, verify_content=False))
            resume = "pass --resume_from_checkpoint latest to continue the run there, " if resumable else ""
            raise ValueError(
                f"--output_dir={output_dir!r} already holds files ({', '.join(entries[:5])}, ...); choose a new "
                f"folder, {resume}or pass --overwrite_output_dir to replace it"
            )
        plan = RunPlan(uuid.uuid4().hex)
    elif resume_from_checkpoint == "latest":
        run_id = record["run_id"] if record else None
        path = resolve_checkpoint(output_dir, "latest", log, run_id)
        if path is not None:
            plan = RunPlan(read_training_state(path)["run_id"], resume_path=path)
        elif not entries or (record and not record.get("finished") and not checkpoint_folders(output_dir)):
            log(f"no checkpoint in {output_dir!r} to resume from: starting a new run")
            plan = RunPlan(uuid.uuid4().hex, clear=bool(entries))
        else:
            what = "a finished run" if record and record.get("finished") else "files"
            damaged = [os.path.basename(p) for _, p in checkpoint_folders(output_dir)]
            skipped = f" (its checkpoints {', '.join(damaged)} cannot be resumed, see above)" if damaged else ""
            raise ValueError(
                f"--resume_from_checkpoint latest: --output_dir={output_dir!r} holds {what} ({', '.join(entries[:5])}) "
                f"but no intact checkpoint to resume{skipped}; a new run there would replace it: choose a new "
                "folder, or pass --overwrite_output_dir without --resume_from_checkpoint to replace it"
            )
    else:
        path = resolve_checkpoint(output_dir, resume_from_checkpoint, log, record["run_id"] if record else None)
        if not in_folder and entries and record is None:
            raise ValueError(
                f"--output_dir={output_dir!r} already holds files ({', '.join(entries[:5])}) of no recorded run; "
                f"continue the checkpoint {path!r} in an empty folder, or pass --overwrite_output_dir"
            )
        plan = RunPlan(read_training_state(path)["run_id"], resume_path=path)
    if plan.resume_path is not None:
        saved = read_training_state(plan.resume_path).get("settings", {})
        problem = settings_difference(saved, settings, os.path.basename(os.path.normpath(plan.resume_path)))
        if problem is not None:
            raise ValueError(problem)
    return plan


class OutputFile:
    """Write one output file atomically, refusing a file another run is writing: a context manager.

    Entering takes a lock beside ``path`` (an ``OutputInUseError`` if another run holds it) and refuses an
    existing ``path`` unless ``overwrite``; ``write(function)`` calls ``function(handle)`` on a binary file in the
    same folder, then renames it to ``path``, so a reader sees the old file or the whole new one. Leaving releases
    the lock and removes the lock file.

        with OutputFile("samples.npz", overwrite=False, argument="--output") as output:
            ...  # the work
            output.write(lambda handle: np.savez(handle, images=images))
    """

    def __init__(self, path, overwrite=False, argument="--output"):
        self.path, self.overwrite, self.argument = path, overwrite, argument
        folder, name = os.path.split(os.path.abspath(path))
        self.lock_path = os.path.join(folder, f".{name}.lock")
        self.temporary_path = os.path.join(folder, f".{name}.tmp{os.path.splitext(name)[1]}")
        self.lock = None

    def __enter__(self):
        from filelock import FileLock, Timeout

        if os.path.isdir(self.path):
            raise ValueError(f"{self.argument}={self.path!r} is a folder, not a file")
        os.makedirs(os.path.dirname(self.lock_path), exist_ok=True)
        self.lock = FileLock(self.lock_path, timeout=0)
        try:
            self.lock.acquire()
        except Timeout:
            raise OutputInUseError(
                f"{self.argument}={self.path!r} is being written by another run; wait for it to end, or choose "
                "another file"
            ) from None
        if os.path.exists(self.path) and not self.overwrite:
            self.__exit__(None, None, None)
            raise ValueError(f"{self.argument}={self.path!r} exists; pass --overwrite_output_dir to replace it")
        return self

    def write(self, function):
        with open(self.temporary_path, "wb") as handle:
            function(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(self.temporary_path, self.path)

    def __exit__(self, *exc_info):
        with contextlib.suppress(OSError):
            os.remove(self.temporary_path)
        if self.lock is not None:
            with contextlib.suppress(OSError):
                os.remove(self.lock_path)
            self.lock.release()
            self.lock = None
        return False


def write_output_file(path, write, overwrite=False, argument="--output"):
    """``OutputFile(path, overwrite, argument)``, entered for one atomic ``write(handle)``."""
    with OutputFile(path, overwrite, argument) as output:
        output.write(write)
