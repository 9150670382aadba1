"""The programs as a user meets them: a bad flag or input is one line ``hvae-<name>: error: ...`` with exit status 2,
before any work (no output folder, no step); --help shows the defaults; no prefix matching; Ctrl-C prints the resume
command; a missing extra is named; the data checks name the file or flag; --center_crop and --random_flip."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from hvae_diffusion import commands
from hvae_diffusion.training import cli


def run_program(program, argv, capsys):
    """``hvae-<program> argv`` as the console script runs it: (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        commands.run_program(program, [str(arg) for arg in argv])
    return exit_info.value.code, capsys.readouterr().err


def assert_user_error(program, argv, message, capsys):
    """One stderr line ``hvae-<program>: error: ...`` matching ``message``, exit status 2."""
    code, err = run_program(program, argv, capsys)
    lines = err.strip().splitlines()
    prefix = f"{commands.program_name(program)}: error: "
    assert code == 2, err
    assert lines[-1].startswith(prefix), err
    assert "Traceback" not in err
    # one error line (argparse's own errors print the usage before it; progress bars may come before it)
    assert sum(": error:" in line for line in lines) == 1, err
    assert message in lines[-1], lines[-1]


def tiny_train(output_dir, *extra):
    return ["--output_dir", output_dir, "--max_train_steps", 1, "--train_batch_size", 4, "--report_to", "none", *extra]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


TRAIN_CASES = [
    (["--guidance_scale", "nan"], "--guidance_scale must be a finite number >= 0, got nan"),
    (["--ema_power", "nan"], "--ema_power must be a finite number > 0, got nan"),
    (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number > 0, got nan"),
    (["--adam_beta1", "1.5"], "--adam_beta1 must be a finite number >= 0 and < 1, got 1.5"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number > 0, got inf"),
    (["--num_classes", "0"], "--num_classes must be >= 1, got 0"),
    (["--train_batch_size", "0"], "--train_batch_size must be a positive integer, got 0"),
    (["--num_train_timesteps", "1", "--num_inference_steps", "1"], "--skip_elbo"),
    (["--center_crop"], "--center_crop needs --resolution"),
    (["--random_flip", "--vae_dir", "some_vae"], "--random_flip flips images, and --vae_dir"),
    (["--max_train_step", "3"], "unrecognized arguments: --max_train_step 3"),
]


@pytest.mark.parametrize("extra, message", TRAIN_CASES)
def test_train_refuses_bad_flags_in_one_line_before_any_work(tmp_path, capsys, extra, message):
    output = tmp_path / "run"
    assert_user_error("train", tiny_train(output, *extra), message, capsys)
    assert not output.exists()


def test_every_training_program_refuses_its_own_bad_flags(tmp_path, a_file, capsys):
    cases = [
        ("train", tiny_train(a_file), f"--output_dir='{a_file}' is a file, not a folder"),
        ("train", tiny_train(tmp_path / "r", "--train_data_dir", tmp_path / "nope"), "no such folder"),
        (
            "train_classifier",
            tiny_train(tmp_path / "c", "--num_timestep_bands", 0),
            "--num_timestep_bands must be >= 1",
        ),
        (
            "train_classifier",
            tiny_train(tmp_path / "c", "--num_train_timesteps", 3, "--num_timestep_bands", 5),
            "--num_timestep_bands=5 exceeds the 3 training timesteps",
        ),
        ("train_vae", tiny_train(tmp_path / "v", "--latent_channels", 0), "--latent_channels must be >= 1, got 0"),
        ("train_vae", tiny_train(tmp_path / "v", "--kl_weight", "nan"), "--kl_weight must be a finite number"),
        ("demo", ["--output_dir", tmp_path / "d", "--num_inference_steps", 5000], "--num_inference_steps must lie"),
        ("toy2d", ["--output_dir", tmp_path / "t", "--skip_toy"], "--skip_toy leaves nothing to draw"),
    ]
    if not torch.cuda.is_available():
        cases.append(("train", tiny_train(tmp_path / "r", "--mixed_precision", "fp16"), "fp16 needs a CUDA GPU"))
    for program, argv, message in cases:
        assert_user_error(program, argv, message, capsys)
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_train_refuses_a_resolution_the_unet_cannot_downsample(tmp_path, capsys):
    """7x7 digits through two down blocks would fail at step 1 with "Sizes of tensors must match"."""
    output = tmp_path / "run"
    assert_user_error(
        "train", tiny_train(output, "--resolution", 7), "--resolution=7: the UNet's 2 down blocks", capsys
    )
    assert not output.exists()


def test_push_to_hub_checks_the_token_before_training(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    output = tmp_path / "run"
    argv = tiny_train(output, "--push_to_hub", "--hub_model_id", "someone/digits")
    assert_user_error("train", argv, "--push_to_hub cannot upload with HF_HUB_OFFLINE=1", capsys)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert_user_error("train", argv, "--push_to_hub needs a Hugging Face token", capsys)
    assert not output.exists()


def test_a_missing_extra_is_named(tmp_path, capsys, monkeypatch):
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real_find_spec(name, *a)
    )
    assert_user_error("train", tiny_train(tmp_path / "run"), "hvae-train needs the [training] extra (datasets", capsys)
    assert commands.extra_of_module("matplotlib.figure") == "plots" and commands.extra_of_module("numpy") is None


def test_ctrl_c_prints_the_resume_command(tmp_path, capsys, monkeypatch):
    from hvae_diffusion.commands import train

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run", interrupted)
    code, err = run_program("train", ["--output_dir", "runs/x", "--resume_from_checkpoint", "checkpoint-5"], capsys)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("hvae-train --output_dir runs/x --resume_from_checkpoint latest"), err


def test_help_shows_defaults_and_flags_are_never_prefix_matched(capsys):
    from hvae_diffusion.commands import train

    with pytest.raises(SystemExit):
        train.main(["--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "--adam_beta1 ADAM_BETA1 (default: 0.9)" in usage
    assert "--conditioning {none,class,text} (default: none)" in usage
    assert "--max_train_steps MAX_TRAIN_STEPS optimizer steps; overrides --num_epochs (default: --num_epochs" in usage
    assert "(default: None)" not in usage and "(default: False)" not in usage
    with pytest.raises(SystemExit):
        train.parse_args(["--output_dir", "x", "--max_train_step", "3"])


def test_building_a_training_config_changes_no_global_state():
    from hvae_diffusion.commands import train

    before = torch.get_num_threads()
    args = train.parse_args(["--output_dir", "never_written", "--num_threads", str(before + 1)])
    config = cli.training_config_from_args(args)
    assert config.output_dir == "never_written" and torch.get_num_threads() == before


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """A tiny unconditional pipeline (what hvae-train makes by default) and a class-conditional one (10 classes)."""
    from test_pipelines import tiny_unet

    from hvae_diffusion import ClassifierFreeGuidancePipeline, HVAEPipeline, HVAEScheduler

    root = tmp_path_factory.mktemp("pipelines")
    scheduler = HVAEScheduler(num_train_timesteps=20)
    HVAEPipeline(tiny_unet(), scheduler).save_pretrained(root / "unconditional")
    ClassifierFreeGuidancePipeline(tiny_unet(num_class_embeds=11), scheduler).save_pretrained(root / "cfg")
    return root


def test_sample_refuses_bad_flags_before_sampling(pipelines, tmp_path, capsys):
    base = ["--pipeline_dir", pipelines / "cfg", "--guidance", "cfg", "--grid", tmp_path / "grid.png"]
    (tmp_path / "runs").mkdir()
    cases = [
        (["--num_columns", 0], "--num_columns must be >= 1, got 0"),
        (["--num_samples", 0], "--num_samples must be >= 1"),
        (["--num_samples", -3], "--num_samples must be >= 1"),
        (["--batch_size", 0], "--batch_size must be >= 1"),
        (["--guidance_scale", "nan"], "--guidance_scale must be a finite number >= 0, got nan"),
        (["--grid", tmp_path / "out.txt"], "not an image file name PIL can write"),
        (["--output", tmp_path / "samples"], "must end with .npz"),
        (["--pipeline_dir", tmp_path / "runs" / "digit"], "runs/digit': no such folder"),
        (["--class_labels", 12], "--class_labels must lie in [0, 9] (the pipeline's 10 classes), got [12]"),
    ]
    for extra, message in cases:
        assert_user_error("sample", [*base, *extra], message, capsys)
    assert sorted(os.listdir(tmp_path)) == ["runs"]


def test_sample_saves_the_arrays_before_the_grid(pipelines, tmp_path, capsys, monkeypatch):
    """A grid that cannot be written (here: a full disk) leaves the samples saved."""
    output = tmp_path / "samples.npz"

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    argv = ["--pipeline_dir", pipelines / "unconditional", "--num_samples", 3, "--num_inference_steps", 2]
    with pytest.raises(OSError, match="No space left"):
        commands.run_program("sample", [str(a) for a in [*argv, "--grid", tmp_path / "g.png", "--output", output]])
    assert np.load(output)["images"].shape == (3, 8, 8, 1)


def test_evaluate_an_unconditional_pipeline_with_default_flags(pipelines, tmp_path, capsys):
    """What hvae-train makes by default evaluates with the default --guidance_scales (no classifier-free guidance
    to sweep: only the unconditional samples); bits/dim and samples are in evaluation.json."""
    from hvae_diffusion.commands import evaluate

    output = tmp_path / "eval"
    assert_user_error(
        "evaluate",
        ["--pipeline_dir", pipelines / "unconditional", "--output_dir", output, "--num_inference_steps", 5000],
        "--num_inference_steps=5000 does not fit the pipeline's noise schedule of 20 training timesteps",
        capsys,
    )
    assert not output.exists()
    # an untrained feature classifier in the cache: its features serve as well here, and training one takes long
    from hvae_diffusion.training.evaluation import FeatureClassifier, save_feature_classifier

    save_feature_classifier(FeatureClassifier(), str(output / "feature_classifier.safetensors"))
    small = ["--bpd_num_samples", 4, "--bpd_nfe", 3, "--num_unconditional_samples", 6, "--num_inference_steps", 2]
    argv = ["--pipeline_dir", pipelines / "unconditional", "--output_dir", output, "--overwrite_output_dir", *small]
    report = evaluate.main([str(a) for a in argv])
    saved = json.loads((output / "evaluation.json").read_text())
    assert saved["unconditional"] == report["unconditional"] and "cfg" not in saved
    assert saved["elbo"]["images"] == "the first 4 of the 297 images of the test split"
    assert set(saved["unconditional"]) == {"num_samples", "frechet_distance", "kid", "kid_standard_error"}
    assert "not Inception FID/KID" in saved["feature_space"]


# ---------------------------------------------------------------------------------------------- data


def write_images(folder, sizes, mode="L"):
    folder.mkdir(parents=True, exist_ok=True)
    for index, size in enumerate(sizes):
        Image.fromarray(np.full(size[::-1], 40 * index, dtype=np.uint8), mode=mode).save(folder / f"{index}.png")


def test_image_folder_errors_name_the_file_or_the_flag(tmp_path, capsys):
    mixed = tmp_path / "mixed"
    write_images(mixed, [(8, 8), (8, 8), (12, 10), (8, 8), (8, 8), (8, 8)])
    assert_user_error(
        "train", tiny_train(tmp_path / "r", "--train_data_dir", mixed), "holds images of mixed sizes", capsys
    )
    corrupt = tmp_path / "corrupt"
    write_images(corrupt, [(8, 8)] * 6)
    (corrupt / "3.png").write_bytes((corrupt / "3.png").read_bytes()[:20])
    assert_user_error("train", tiny_train(tmp_path / "r", "--train_data_dir", corrupt), "3.png", capsys)
    single = tmp_path / "single"
    write_images(single, [(8, 8)])
    assert_user_error(
        "train", tiny_train(tmp_path / "r", "--train_data_dir", single), "has 1 image(s); at least 2", capsys
    )
    assert not (tmp_path / "r").exists()


def test_center_crop_keeps_the_aspect_ratio_as_diffusers_does():
    from hvae_diffusion.training.data import image_to_tensor

    # a 12x6 image: left half black, right half white; the 6x6 centre crop is columns 3..8
    array = np.zeros((6, 12), dtype=np.uint8)
    array[:, 6:] = 255
    image = Image.fromarray(array, mode="L")
    cropped = image_to_tensor(image, resolution=6, center_crop=True)
    assert torch.equal(cropped, torch.from_numpy(array[:, 3:9] / 127.5 - 1).float()[None])
    assert image_to_tensor(image, resolution=6).shape == (1, 6, 6)  # squeezed, aspect ratio lost


def test_random_flip_is_drawn_from_the_batch_randomness():
    """Each sample is mirrored with probability 1/2; the same generator state flips the same samples (so a resumed
    or multi-process run flips as the uninterrupted one), and the two process halves together equal one process."""
    from hvae_diffusion.training.data import RandomFlip
    from hvae_diffusion.training.losses import BatchRandomness

    seen = []
    flip = RandomFlip(lambda model, batch, randomness: seen.append(batch["sample"]) or (torch.zeros(()), {}))
    samples = torch.arange(64 * 4, dtype=torch.float32).view(64, 1, 1, 4)
    flip(None, {"sample": samples}, torch.Generator().manual_seed(3))
    flip(None, {"sample": samples}, torch.Generator().manual_seed(3))
    mirrored = (seen[0] != samples).flatten(1).any(1)
    assert torch.equal(seen[0], seen[1]) and 16 < int(mirrored.sum()) < 48
    assert torch.equal(seen[0][mirrored], samples[mirrored].flip(-1))
    for rank in (0, 1):
        flip(
            None,
            {"sample": samples[32 * rank : 32 * (rank + 1)]},
            BatchRandomness(torch.Generator().manual_seed(3), 2, rank),
        )
    assert torch.equal(torch.cat(seen[2:]), seen[0])
    # what the training loop reads from a loss (its timestep sampler, trainable modules) passes through the wrapper
    loss = type("Loss", (), {"timestep_sampler": "sampler", "__call__": lambda self, *a, **k: None})()
    assert RandomFlip(loss).timestep_sampler == "sampler" and not hasattr(RandomFlip(loss), "trainable_modules")


def test_resuming_prints_no_warnings_about_diffusers_own_calls(tmp_path, capfd):
    """EMAModel.from_pretrained warned about its own from_config call (FutureWarning) and the EMA fields of its
    config.json (twice "config attributes ... ignored"), on every resume with --use_ema."""
    import warnings

    from hvae_diffusion.commands import train

    argv = tiny_train(
        tmp_path / "run", "--use_ema", "--checkpointing_steps", 1, "--skip_elbo", "--num_inference_steps", 1
    )
    train.main([str(a) for a in argv])
    argv[argv.index("--max_train_steps") + 1] = 2
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.main([str(a) for a in [*argv, "--resume_from_checkpoint", "latest"]])
    printed = "".join(capfd.readouterr())
    assert "resuming from" in printed and "config attributes" not in printed, printed
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
