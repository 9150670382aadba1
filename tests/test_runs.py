"""A user's runs are never replaced, mixed or lost: the output folder's lock and run record, checkpoints verified by
content (and the fallback to the newest intact one), resume refusing another run's checkpoint or changed flags,
Ctrl-C, the checkpoint hooks with the arguments DeepSpeed and FSDP pass, and 2 processes against 1 for every
training program."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from hvae_diffusion import HVAEScheduler
from hvae_diffusion.models import MLPDenoiser
from hvae_diffusion.training.loop import (
    TrainingConfig,
    diffusers_format_hooks,
    make_accelerator,
    max_abs_weight,
    train,
)
from hvae_diffusion.training.losses import DiffusionLoss
from hvae_diffusion.training.runs import (
    OutputFile,
    OutputInUseError,
    checkpoint_folders,
    lock_output_dir,
    read_run_record,
    read_training_state,
    resolve_checkpoint,
    write_output_file,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_command(name):
    return importlib.import_module(f"hvae_diffusion.commands.{name}")


# ------------------------------------------------------------------------------------------------ library runs


def vector_data(count=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (count,), generator=generator)
    return torch.utils.data.TensorDataset(torch.randn(count, 2, generator=generator) + labels[:, None] - 1, labels)


def run(tmp_path, name, loss_fn=None, accelerator=None, hidden_dim=16, **overrides):
    """A tiny MLP run; returns (result, the saved weights, the output folder)."""
    settings = dict(
        output_dir=str(tmp_path / name),
        train_batch_size=16,
        max_train_steps=6,
        learning_rate=1e-2,
        checkpointing_steps=2,
        checkpoints_total_limit=None,
        report_to=None,
        seed=7,
    )
    settings.update(overrides)
    torch.manual_seed(0)
    model = MLPDenoiser(in_channels=2, hidden_dim=hidden_dim, num_blocks=1, num_class_embeds=4)
    loss_fn = loss_fn or DiffusionLoss(HVAEScheduler(num_train_timesteps=100), cond_drop_prob=0.2, null_label=3)
    saved = {}
    result = train(
        TrainingConfig(**settings),
        model,
        loss_fn,
        vector_data(),
        save_fn=lambda m, d: saved.update({k: v.clone() for k, v in m.state_dict().items()}),
        accelerator=accelerator,
    )
    return result, saved, tmp_path / name


def dying_loss(at_call, exception=RuntimeError):
    """A diffusion loss that raises ``exception`` on its ``at_call``-th call: a run killed mid-step."""
    inner = DiffusionLoss(HVAEScheduler(num_train_timesteps=100), cond_drop_prob=0.2, null_label=3)
    calls = {"count": 0}

    def loss(model, batch, randomness, encode_prompt=None):
        calls["count"] += 1
        if calls["count"] == at_call:
            raise exception("killed")
        return inner(model, batch, randomness)

    return loss


def steps_of(folder):
    return [step for step, _ in checkpoint_folders(str(folder))]


def assert_same_weights(expected, actual):
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_overwrite_clears_the_old_run_and_another_runs_checkpoint_is_never_resumed(tmp_path, capsys):
    """The old run's checkpoint-4 and -6 used to stay after --overwrite_output_dir, win over the new run's and be
    resumed after a kill: now the folder is cleared, and a checkpoint of another run is skipped, saying why."""
    _, _, old = run(tmp_path, "run", seed=0)
    assert steps_of(old) == [2, 4, 6]
    with pytest.raises(
        ValueError, match="already holds files.*--resume_from_checkpoint latest.*--overwrite_output_dir"
    ):
        run(tmp_path, "run")
    with pytest.raises(RuntimeError, match="killed"):  # the new run (seed 7) dies in step 3
        run(tmp_path, "run", loss_fn=dying_loss(3), overwrite_output_dir=True)
    assert steps_of(old) == [2] and sorted(os.listdir(old)) == [".training.lock", "checkpoint-2", "training_run.json"]
    # a checkpoint of another run, copied in, is never resumed
    _, _, other = run(tmp_path, "other", seed=0, max_train_steps=4)
    shutil.copytree(other / "checkpoint-4", old / "checkpoint-4")
    with pytest.raises(ValueError, match="checkpoint-4.*belongs to another run"):
        resolve_checkpoint(str(old), "checkpoint-4", run_id=read_run_record(str(old))["run_id"])
    capsys.readouterr()
    resumed, weights, _ = run(tmp_path, "run", resume_from_checkpoint="latest")
    assert resumed.resumed_from.endswith("checkpoint-2")
    assert re.search(r"skipping the checkpoint \S*checkpoint-4: it belongs to another run", capsys.readouterr().out)
    _, uninterrupted, _ = run(tmp_path, "whole")
    assert_same_weights(uninterrupted, weights)


def test_resume_latest_restarts_a_run_killed_before_its_first_checkpoint(tmp_path, capsys):
    """A requeued job passes --resume_from_checkpoint latest every time: a run that stopped before its first
    checkpoint (its record says unfinished) starts again from scratch, its leftovers cleared."""
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path, "requeued", loss_fn=dying_loss(1))
    assert read_run_record(str(tmp_path / "requeued"))["finished"] is False
    (tmp_path / "requeued" / "samples").mkdir()  # what such a run may leave
    capsys.readouterr()
    restarted, weights, folder = run(tmp_path, "requeued", resume_from_checkpoint="latest")
    assert restarted.resumed_from is None and "starting a new run" in capsys.readouterr().out
    assert not (folder / "samples").exists() and read_run_record(str(folder))["finished"] is True
    _, uninterrupted, _ = run(tmp_path, "whole")
    assert_same_weights(uninterrupted, weights)


def test_a_checkpoint_corrupted_at_the_same_size_is_skipped_for_the_newest_intact_one(tmp_path, capsys):
    """Half of a safetensors file zeroed (same size), a corrupt header, a listing without global_step, an empty
    files list and a corrupted file that another part of the code wrote into the checkpoint: each falls back."""
    _, uninterrupted, _ = run(tmp_path, "whole", max_train_steps=8)
    accelerator = make_accelerator(TrainingConfig(output_dir=str(tmp_path / "run"), report_to=None))

    def extra_state_hook(models, weights, output_dir):  # a state some other part of the loop saves
        with open(os.path.join(output_dir, "timestep_sampler.json"), "w") as handle:
            json.dump({"history": [1.0, 2.0]}, handle)

    accelerator.register_save_state_pre_hook(extra_state_hook)
    run(tmp_path, "run", accelerator=accelerator, max_train_steps=8, checkpointing_steps=1)
    folder = tmp_path / "run"

    weights = folder / "checkpoint-8" / "model" / "diffusion_pytorch_model.safetensors"
    content = weights.read_bytes()
    weights.write_bytes(content[: len(content) // 2] + bytes(len(content) - len(content) // 2))
    header = folder / "checkpoint-7" / "model" / "diffusion_pytorch_model.safetensors"
    content = header.read_bytes()
    header.write_bytes(b"\xff" * 8 + content[8:])
    for step, change in ((6, lambda s: s.pop("global_step")), (5, lambda s: s.update(files={}))):
        state = read_training_state(str(folder / f"checkpoint-{step}"))
        change(state)
        (folder / f"checkpoint-{step}" / "training_state.json").write_text(json.dumps(state))
    (folder / "checkpoint-4" / "timestep_sampler.json").write_text('{"history": [1.0, 9.0]}')

    capsys.readouterr()
    resumed, final, _ = run(tmp_path, "run", max_train_steps=8, checkpointing_steps=1, resume_from_checkpoint="latest")
    out = capsys.readouterr().out
    assert resumed.resumed_from.endswith("checkpoint-3") and resumed.global_step == 8
    for step, why in [
        (8, "model/diffusion_pytorch_model.safetensors does not match its sha256"),
        (7, "model/diffusion_pytorch_model.safetensors does not match its sha256"),
        (6, "its training_state.json has no global_step"),
        (5, "its training_state.json lists no files"),
        (4, "timestep_sampler.json does not match its sha256"),
    ]:
        assert re.search(rf"skipping the checkpoint \S*checkpoint-{step}: {why}", out), (step, why, out)
    assert re.search(r"resuming from \S*checkpoint-3, the newest intact checkpoint", out)
    assert_same_weights(uninterrupted, final)


def test_sample_grids_during_a_run_use_the_ema_and_leave_the_run_unchanged(tmp_path):
    """A mid-run grid samples a gathered copy holding the EMA weights; the weights trained are those of a run
    without grids."""
    from diffusers.training_utils import EMAModel
    from PIL import Image

    seen = {}

    def sample_fn(model, step):
        seen[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return Image.new("L", (2, 2))

    settings = dict(use_ema=True, ema_max_decay=0.9, max_train_steps=4)
    _, plain, _ = run(tmp_path, "plain", **settings)
    config = TrainingConfig(output_dir=str(tmp_path / "grids"), train_batch_size=16, max_train_steps=4,
                            learning_rate=1e-2, checkpointing_steps=2, checkpoints_total_limit=None, report_to=None,
                            seed=7, save_images_steps=2, **{k: v for k, v in settings.items() if k != "max_train_steps"})  # fmt: skip
    torch.manual_seed(0)
    model = MLPDenoiser(in_channels=2, hidden_dim=16, num_blocks=1, num_class_embeds=4)
    saved = {}
    train(config, model, DiffusionLoss(HVAEScheduler(num_train_timesteps=100), cond_drop_prob=0.2, null_label=3),
          vector_data(), sample_fn=sample_fn, save_fn=lambda m, d: saved.update(m.state_dict()))  # fmt: skip
    assert sorted(seen) == [2, 4] and sorted(os.listdir(tmp_path / "grids" / "samples")) == [
        "step-000002.png",
        "step-000004.png",
    ]
    ema = EMAModel.from_pretrained(str(tmp_path / "grids" / "checkpoint-2" / "model_ema"), MLPDenoiser)
    for (name, _), shadow in zip(model.named_parameters(), ema.shadow_params):
        assert torch.equal(seen[2][name], shadow), name
    assert_same_weights(plain, saved)


def test_resume_refuses_a_changed_model(tmp_path):
    run(tmp_path, "run", max_train_steps=2)
    with pytest.raises(
        ValueError, match="the model differs from the one checkpoint-2 was trained with.*hidden_dim=16"
    ):
        run(tmp_path, "run", max_train_steps=4, hidden_dim=32, resume_from_checkpoint="latest")


def test_ctrl_c_leaves_nothing_half_written_and_says_how_to_resume(tmp_path, capsys):
    """Ctrl-C in a step, then in the middle of writing a checkpoint with --checkpoints_total_limit 1: the last
    checkpoint stays intact (Accelerate's automatic_checkpoint_naming deletes it before writing the new one)."""
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "step", loss_fn=dying_loss(5, KeyboardInterrupt))
    out = " ".join(capsys.readouterr().out.split())
    assert "interrupted at step 4" in out and "checkpoint-4" in out and "--resume_from_checkpoint latest" in out

    accelerator = make_accelerator(TrainingConfig(output_dir=str(tmp_path / "save"), report_to=None))
    saves = {"count": 0}

    def interrupted_save(models, weights, output_dir):
        saves["count"] += 1
        if saves["count"] == 2:
            raise KeyboardInterrupt

    accelerator.register_save_state_pre_hook(interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "save", accelerator=accelerator, checkpoints_total_limit=1)
    assert sorted(os.listdir(tmp_path / "save")) == [".training.lock", "checkpoint-2", "training_run.json"]
    assert resolve_checkpoint(str(tmp_path / "save"), "latest").endswith("checkpoint-2")

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    theirs = Accelerator(
        project_config=ProjectConfiguration(
            project_dir=str(tmp_path / "theirs"), automatic_checkpoint_naming=True, total_limit=1
        )
    )
    theirs.prepare(torch.nn.Linear(2, 2))
    theirs.save_state()
    theirs.register_save_state_pre_hook(lambda models, weights, output_dir: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        theirs.save_state()
    assert os.listdir(tmp_path / "theirs" / "checkpoints") == ["checkpoint_1"]  # checkpoint_0 deleted first
    assert os.listdir(tmp_path / "theirs" / "checkpoints" / "checkpoint_1") == []


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    lock = lock_output_dir(str(tmp_path / "run"))
    try:
        with pytest.raises(OutputInUseError, match="--output_dir=.* is in use: another run is writing there"):
            run(tmp_path, "run")
    finally:
        lock.release()
    run(tmp_path, "run", max_train_steps=2)


def test_output_files_are_written_atomically_and_never_by_two_runs(tmp_path):
    path = tmp_path / "out" / "samples.npz"
    with OutputFile(str(path), argument="--output") as first:
        with pytest.raises(OutputInUseError, match="--output=.*samples.npz' is being written by another run"):
            write_output_file(str(path), lambda handle: handle.write(b"second"))
        first.write(lambda handle: handle.write(b"first"))
    assert path.read_bytes() == b"first" and os.listdir(path.parent) == ["samples.npz"]
    with pytest.raises(ValueError, match="samples.npz' exists; pass --overwrite_output_dir"):
        write_output_file(str(path), lambda handle: handle.write(b"again"))

    def failing(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_output_file(str(path), failing, overwrite=True)
    assert path.read_bytes() == b"first" and os.listdir(path.parent) == ["samples.npz"]


# ------------------------------------------------------------------------------------------------ the programs


def train_args(output_dir, *extra):
    return [
        *["--output_dir", str(output_dir), "--max_train_steps", "2", "--train_batch_size", "8"],
        *["--checkpointing_steps", "0", "--report_to", "none", "--num_inference_steps", "2", "--skip_elbo"],
        *map(str, extra),
    ]


def vae_args(output_dir, *extra):
    return [
        *["--output_dir", str(output_dir), "--max_train_steps", "2", "--train_batch_size", "8"],
        *["--checkpointing_steps", "0", "--report_to", "none", "--eval_num_samples", "0", "--resolution", "8"],
        *["--block_out_channels", "8", "8", "--norm_num_groups", "4", "--latent_channels", "2"],
        *map(str, extra),
    ]


def test_resume_latest_never_replaces_a_finished_run(tmp_path):
    """``--resume_from_checkpoint latest`` on a finished run without checkpoints used to start a new run over it
    ("fin is now a 5-step model"), for hvae-train and hvae-train-vae. hvae-sample then refuses a file in use."""
    train, train_vae, sample = load_command("train"), load_command("train_vae"), load_command("sample")
    for command, args, weights in [
        (train.main, train_args, "unet/diffusion_pytorch_model.safetensors"),
        (train_vae.main, vae_args, "diffusion_pytorch_model.safetensors"),
    ]:
        finished = tmp_path / command.__module__.rsplit(".", 1)[1]
        command(args(finished, "--max_train_steps", "3"))
        before = (finished / weights).read_bytes()
        with pytest.raises(ValueError, match="latest: --output_dir=.* holds a finished run .* --overwrite_output_dir"):
            command(args(finished, "--seed", "7", "--resume_from_checkpoint", "latest"))
        assert (finished / weights).read_bytes() == before
    grid = tmp_path / "grid.png"
    with OutputFile(str(grid), argument="--grid"):
        with pytest.raises(OutputInUseError, match="--grid=.* is being written by another run"):
            sample.main(["--pipeline_dir", str(tmp_path / "train"), "--grid", str(grid), "--num_inference_steps", "2"])
    assert not grid.exists()


def test_resume_refuses_changed_flags_naming_them_before_any_work(tmp_path):
    """An ε model resumed with v_prediction continued silently; --use_ema failed with "couldn't connect to
    huggingface.co"; --conditioning none with a state_dict key error."""
    train = load_command("train")
    folder = tmp_path / "run"
    train.main(train_args(folder, "--conditioning", "class", "--checkpointing_steps", "2"))
    listing = sorted(os.listdir(folder))
    resume = ["--conditioning", "class", "--resume_from_checkpoint", "latest", "--max_train_steps", "4"]
    for change, message in [
        (["--prediction_type", "v_prediction"], "--prediction_type: checkpoint-2 was trained with 'epsilon', this run asks for 'v_prediction'"),
        (["--use_ema"], "--use_ema: checkpoint-2 was trained with False, this run asks for True"),
        (["--conditioning", "none"], "--conditioning: checkpoint-2 was trained with 'class', this run asks for 'none'"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            train.main(train_args(folder, *resume, *change))
    assert sorted(os.listdir(folder)) == listing


# ------------------------------------------------------------------------------------------------ scale out


def test_checkpoint_hooks_take_the_arguments_deepspeed_and_fsdp_pass(tmp_path):
    """DeepSpeed and FSDP save the model with their engines and pass the hooks no weights (the save hook used to
    ``weights.pop(index)`` an empty list) and no models; the EMA, whole on every process, is still saved."""
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = MLPDenoiser(in_channels=2, hidden_dim=8, num_blocks=1)
    ema = EMAModel(model.parameters(), model_cls=MLPDenoiser, model_config=model.config)
    save_hook, load_hook = diffusers_format_hooks(Accelerator(), ema)
    save_hook([model], [], str(tmp_path / "engine"))
    assert sorted(os.listdir(tmp_path / "engine")) == ["model_ema"]
    for parameter in ema.shadow_params:
        parameter.data.zero_()
    load_hook([], str(tmp_path / "engine"))
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, model.parameters()))
    weights = [model.state_dict()]
    save_hook([model], weights, str(tmp_path / "ddp"))
    assert weights == [] and sorted(os.listdir(tmp_path / "ddp")) == ["model", "model_ema"]


def test_every_process_resumes_the_newest_checkpoint_intact_on_all_of_them(tmp_path):
    """Without a shared file system each node verifies its own copy; a checkpoint damaged on one node is skipped by
    all processes (the other process's verdicts stand in for ``gather_object`` across nodes)."""
    from accelerate import Accelerator

    from hvae_diffusion.training.loop import agreed_checkpoint
    from hvae_diffusion.training.runs import RunPlan

    _, _, folder = run(tmp_path, "run")
    run_id = read_run_record(str(folder))["run_id"]
    config = TrainingConfig(output_dir=str(folder), resume_from_checkpoint="latest")
    plan = RunPlan(run_id, resume_path=str(folder / "checkpoint-6"))

    def gather_with(other_node):
        return lambda intact: intact + [other_node]

    assert agreed_checkpoint(
        Accelerator(), config, plan, gather_with(["checkpoint-2", "checkpoint-4", "checkpoint-6"])
    ) == str(folder / "checkpoint-6")
    assert agreed_checkpoint(Accelerator(), config, plan, gather_with(["checkpoint-2", "checkpoint-4"])) == str(
        folder / "checkpoint-4"
    )
    with pytest.raises(ValueError, match="no checkpoint of the run is intact on every process"):
        agreed_checkpoint(Accelerator(), config, plan, gather_with([]))


def test_max_abs_weight_reads_zero3_shards():
    """Under ZeRO-3 a parameter is an empty placeholder and its shard is ``ds_tensor``."""
    model = torch.nn.Linear(2, 1)
    model.weight.data = torch.empty(0)
    model.weight.ds_tensor = torch.tensor([0.5, -7.0])
    model.bias.data = torch.tensor([2.0])
    assert max_abs_weight(model) == 7.0


TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from safetensors.torch import save_file

    from hvae_diffusion import HVAEScheduler
    from hvae_diffusion.commands import train, train_classifier, train_vae
    from hvae_diffusion.models import MLPDenoiser
    from hvae_diffusion.training.loop import TrainingConfig, train as train_loop
    from hvae_diffusion.training.losses import DiffusionLoss


    def programs(root, processes, batch):
        common = ["--max_train_steps", "2", "--train_batch_size", str(batch), "--checkpointing_steps", "0",
                  "--report_to", "none", "--seed", "3", "--learning_rate", "1e-5"]
        denoiser = ["--num_inference_steps", "2", "--skip_elbo", "--conditioning"]
        out = os.path.join(root, str(processes))
        train.run(train.parse_args([*common, *denoiser, "class", "--cond_drop_prob", "0.2",
                                    "--output_dir", os.path.join(out, "class")]))
        text = os.path.join(root, "text")
        train.run(train.parse_args([*common, *denoiser, "text", "--cond_drop_prob", "0.2",
                                    "--train_data_dir", os.path.join(text, "images"),
                                    "--unet_config", os.path.join(text, "unet.json"),
                                    "--text_encoder_name_or_path", os.path.join(text, "encoder"),
                                    "--output_dir", os.path.join(out, "text")]))
        train.run(train.parse_args([*common, *denoiser, "none", "--resolution", "8",
                                    "--vae_dir", os.path.join(root, "1", "vae"),
                                    "--unet_config", os.path.join(root, "latent_unet.json"),
                                    "--output_dir", os.path.join(out, "latent")]))
        train_classifier.run(train_classifier.parse_args([*common, "--output_dir", os.path.join(out, "classifier")]))


    def vae(root, processes, batch):
        train_vae.main(["--max_train_steps", "2", "--train_batch_size", str(batch), "--checkpointing_steps", "0",
                        "--report_to", "none", "--seed", "3", "--learning_rate", "1e-5", "--eval_num_samples", "0", "--resolution", "8",
                        "--block_out_channels", "8", "8", "--norm_num_groups", "4", "--latent_channels", "2",
                        "--output_dir", os.path.join(root, str(processes), "vae")])


    def killed_and_resumed(root, processes, batch):
        data_generator = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(64, 2, generator=data_generator),
                                              torch.randint(0, 3, (64,), generator=data_generator))
        inner = DiffusionLoss(HVAEScheduler(num_train_timesteps=100), cond_drop_prob=0.3, null_label=3)

        def one(name, loss, **overrides):
            torch.manual_seed(0)
            model = MLPDenoiser(in_channels=2, hidden_dim=16, num_blocks=1, num_class_embeds=4)
            config = TrainingConfig(output_dir=os.path.join(root, str(processes), name), train_batch_size=batch,
                                    max_train_steps=6, gradient_accumulation_steps=2, learning_rate=1e-2,
                                    checkpointing_steps=2, report_to=None, use_ema=True, seed=7, **overrides)
            train_loop(config, model, loss, data,
                       save_fn=lambda m, d: save_file(m.state_dict(), os.path.join(d, "weights.safetensors")))

        calls = {"count": 0}

        def dying(model, batch, randomness, encode_prompt=None):
            calls["count"] += 1
            if calls["count"] == 7:  # step 4, after checkpoint-2
                raise RuntimeError("killed")
            return inner(model, batch, randomness)

        one("whole", inner)
        try:
            one("resumed", dying)
        except RuntimeError:
            pass
        one("resumed", inner, resume_from_checkpoint="latest")


    if __name__ == "__main__":
        root, processes, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        for part in sys.argv[4:]:
            globals()[part](root, processes, batch)
""")


def load_weights(folder):
    for name in ("unet/diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors"):
        if os.path.isfile(os.path.join(folder, name)):
            return load_file(os.path.join(folder, name))
    return load_file(os.path.join(folder, "weights.safetensors"))


def test_two_processes_train_what_one_process_trains_and_resume_bitwise(tmp_path):
    """``accelerate launch`` with 2 CPU processes of batch 4 against 1 process of batch 8, for hvae-train (class and
    text conditioning, and on a VAE's latents), hvae-train-classifier and hvae-train-vae: allclose at 1e-6. With 2
    processes a run killed after its first checkpoint and resumed ends bitwise equal to an uninterrupted one.

    The programs' learning rate is 1e-5: Adam moves every weight by about the learning rate whatever its gradient's
    size, so the float rounding of gradients that are zero in exact arithmetic (a convolution's bias before a
    GroupNorm) moves those weights by up to the learning rate; at 1e-5 the tolerance still sees any other
    difference, since each of the 2 steps moves every weight by about 1e-5."""
    from test_scripts import make_text_setup

    (tmp_path / "text").mkdir()
    make_text_setup(tmp_path / "text")
    latent_unet = {"sample_size": 4, "in_channels": 2, "out_channels": 2, "block_out_channels": [8, 16],
                   "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
                   "layers_per_block": 1, "norm_num_groups": 4}  # fmt: skip
    (tmp_path / "latent_unet.json").write_text(json.dumps(latent_unet))
    script = tmp_path / "two_process_programs.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    spec = importlib.util.spec_from_file_location("two_process_programs", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.vae(str(tmp_path), 1, 8)  # the VAE the latent runs use, and the 1-process VAE
    command = [
        *[sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"],
        *["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
        *[str(tmp_path), "2", "4", "vae", "programs", "killed_and_resumed"],
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    module.programs(str(tmp_path), 1, 8)
    for name in ("class", "text", "latent", "classifier", "vae"):
        one, two = load_weights(tmp_path / "1" / name), load_weights(tmp_path / "2" / name)
        assert one.keys() == two.keys(), name
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")
        summary = "classifier_accuracy.json" if name == "classifier" else "training_summary.json"
        assert json.loads((tmp_path / "2" / name / summary).read_text())["global_step"] == 2
    whole, resumed = load_weights(tmp_path / "2" / "whole"), load_weights(tmp_path / "2" / "resumed")
    assert_same_weights(whole, resumed)
    assert "resuming from" in result.stdout and "checkpoint-2" in result.stdout
