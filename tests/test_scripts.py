"""The scripts end to end on tiny runs: --help, the demo pipeline (train → classifier → sample → evaluate) as a
subprocess, sample.py's arrays, the objectives' options, the errors that name their argument, and a 2-process
Accelerate run against the 1-process run with the same global batch."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def load_script(name):
    return importlib.import_module(f"hvae_diffusion.commands.{name}")


def run_script(name, *args, timeout=600):
    """Run scripts/<name>.py as a user would (a subprocess from the repository root)."""
    result = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, f"{name}.py"), *map(str, args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


COMMANDS = ["train", "train_classifier", "train_vae", "sample", "evaluate", "demo", "toy2d"]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_and_the_shared_flags(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(name).main(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    assert "usage:" in usage
    assert "--num_threads" in usage
    assert "--scale " not in usage and "--cfg_scale " not in usage and "--classifier_scale " not in usage


@pytest.mark.parametrize("name", COMMANDS)
def test_scripts_are_wrappers_and_entry_points_name_the_commands(name):
    """scripts/<name>.py only runs the program as setup.cfg's hvae-<name> does, through ``<name>_cli``, which runs
    hvae_diffusion.commands.<name>.main and returns None (a console script exits with status 1 on any other
    return value)."""
    with open(os.path.join(SCRIPTS, f"{name}.py")) as handle:
        lines = [line for line in handle.read().splitlines() if line.strip()]
    assert lines == [
        f"from hvae_diffusion.commands import {name}_cli",
        'if __name__ == "__main__":',
        f"    {name}_cli()",
    ]
    import configparser

    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    entry = f"hvae-{name.replace('_', '-')} = hvae_diffusion.commands:{name}_cli"
    assert entry in config["options.entry_points"]["console_scripts"]
    from hvae_diffusion import commands

    assert getattr(commands, f"{name}_cli").__name__ == f"{name}_cli" and name in commands.PROGRAMS


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """``demo.py --quick``: every script's main, a few steps each, in one subprocess."""
    out = tmp_path_factory.mktemp("demo")
    run_script("demo", "--quick", "--output_dir", out)
    return out


def test_demo_writes_pipelines_grids_and_report(demo_dir):
    from diffusers import DiffusionPipeline

    import hvae_diffusion  # noqa: F401
    from hvae_diffusion.pipelines import ClassifierFreeGuidancePipeline, ClassifierGuidedPipeline

    for name in [
        "samples_unconditional.png",
        "samples_classifier_guided.png",
        "samples_cfg.png",
        "evaluation/elbo_denoising_terms.png",
        "evaluation/grid_cfg_2.png",
        "evaluation/grid_classifier_2.png",
        "evaluation/feature_classifier.safetensors",
        "denoiser/README.md",
        "denoiser/samples/cfg_grid.png",
        "classifier_guided/classifier_accuracy.json",
    ]:
        assert (demo_dir / name).is_file(), name
    assert not list(demo_dir.glob("denoiser/checkpoint-*"))  # 4 steps, checkpoints every 1000
    denoiser = DiffusionPipeline.from_pretrained(demo_dir / "denoiser")
    assert isinstance(denoiser, ClassifierFreeGuidancePipeline) and denoiser.config.null_class_label == 10
    assert denoiser.unet.config.num_class_embeds == 11
    guided = DiffusionPipeline.from_pretrained(demo_dir / "classifier_guided")
    assert isinstance(guided, ClassifierGuidedPipeline)  # its class-conditional unet is called with the null label
    assert guided.unconditional_kwargs(1)["class_labels"].tolist() == [guided.unet.config.num_class_embeds - 1]
    report = json.loads((demo_dir / "demo_report.json").read_text())
    assert set(report["wall_time_seconds"]) >= {"train denoiser", "train noisy classifier", "sample", "evaluate"}
    evaluation = json.loads((demo_dir / "evaluation" / "evaluation.json").read_text())
    elbo = evaluation["elbo"]
    assert elbo["bits_per_dim"] == pytest.approx(
        elbo["reconstruction"] + elbo["prior_matching"] + elbo["denoising_matching"], rel=1e-6
    )
    assert elbo["estimator"] == "importance" and f"{elbo['bits_per_dim']:.3f} ± " in elbo["summary"]
    assert [band["timesteps"][0] for band in evaluation["classifier_calibration"]] == [0, 200, 400, 600, 800]
    assert evaluation["feature_classifier_test_accuracy"] > 0.9  # the evaluation classifier is a real classifier
    # w = 0 is the unconditional model: the folded null-label UNet gives the same samples from the same seed
    assert evaluation["cfg"]["0"]["num_samples"] == evaluation["unconditional"]["num_samples"] == 20
    assert evaluation["cfg"]["0"]["frechet_distance"] == pytest.approx(
        evaluation["unconditional"]["frechet_distance"], rel=1e-3
    )
    card = (demo_dir / "denoiser" / "README.md").read_text()
    assert "bits/dim" in card and "classifier-free guidance" in card


def test_sample_writes_arrays(demo_dir, tmp_path):
    output = tmp_path / "samples.npz"
    run_script(
        "sample",
        "--pipeline_dir",
        demo_dir / "denoiser",
        "--guidance",
        "cfg",
        "--guidance_scale",
        "3",
        "--class_labels",
        3,
        7,
        "--num_samples",
        4,
        "--num_inference_steps",
        4,
        "--scheduler",
        "dpmsolver",
        "--grid",
        tmp_path / "grid.png",
        "--output",
        output,
    )
    arrays = np.load(output)
    assert arrays["images"].shape == (4, 8, 8, 1) and arrays["images"].dtype == np.uint8
    assert arrays["labels"].tolist() == [3, 7, 3, 7]
    assert (tmp_path / "grid.png").is_file()


def tiny_train_args(output_dir, *extra):
    return [
        "--output_dir",
        str(output_dir),
        "--max_train_steps",
        "2",
        "--train_batch_size",
        "8",
        "--checkpointing_steps",
        "0",
        "--report_to",
        "none",
        "--num_inference_steps",
        "3",
        "--elbo_timesteps",
        "3",
        "--elbo_num_samples",
        "8",
        *map(str, extra),
    ]


def train_result(train, argv):
    """What ``hvae-train`` with ``argv`` returns from its run (its ``main`` returns nothing, for the exit status)."""
    return train.run(train.parse_args(argv))


@pytest.mark.parametrize(
    "objective",
    [
        ["--prediction_type", "v_prediction", "--loss_weighting", "min_snr", "--variance_type", "learned_range"],
        ["--prediction_type", "score", "--loss_weighting", "elbo", "--use_ema", "--mixed_precision", "bf16"],
    ],
)
def test_train_objectives(tmp_path, objective):
    if "bf16" in objective:  # Accelerate fixes the mixed precision once per process: a process of its own
        run_script("train", *tiny_train_args(tmp_path / "run", *objective))
    else:
        train_result(load_script("train"), tiny_train_args(tmp_path / "run", *objective))
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert summary["global_step"] == 2 and np.isfinite(summary["final_loss"])
    assert summary["prediction_type"] == objective[1] and np.isfinite(summary["test_bits_per_dim"])
    assert summary["test_bits_per_dim_images"] == "the first 8 of the 297 images of the test split"
    unet_config = json.loads((tmp_path / "run" / "unet" / "config.json").read_text())
    assert unet_config["out_channels"] == (2 if "learned_range" in objective else 1)


def test_train_errors_name_the_argument(demo_dir, tmp_path):
    train = load_script("train")
    cases = [
        (["--image_column", "picture"], "--image_column='picture'"),
        (["--conditioning", "class", "--num_classes", "5"], r"--label_column='label' has labels .* outside \[0, 5\)"),
        (
            [
                "--pretrained_model_name_or_path",
                demo_dir / "denoiser",
                "--conditioning",
                "class",
                "--prediction_type",
                "v_prediction",
            ],
            "--prediction_type='v_prediction' contradicts the pretrained scheduler config",
        ),
        (["--resume_from_checkpoint", "checkpoint-99"], "--resume_from_checkpoint='checkpoint-99'"),
        (["--cond_drop_prob", "0.1"], "--cond_drop_prob needs --conditioning"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--elbo_timesteps", "0"], "--elbo_timesteps and --elbo_num_samples must be >= 1.*--skip_elbo"),
        (["--lr_scheduler", "cosine_annealing"], "--lr_scheduler must be one of"),
        (["--num_threads", "-1"], "--num_threads must be an integer >= 0"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            train.main(tiny_train_args(tmp_path / "bad", *extra))


def test_train_checks_every_flag_before_the_first_step(tmp_path):
    """--num_inference_steps 100 cannot sample a 50-step schedule: refused before any work, not after training."""
    train = load_script("train")
    output = tmp_path / "late"
    argv = tiny_train_args(output, "--num_train_timesteps", "50", "--num_inference_steps", "100")
    with pytest.raises(ValueError, match="--num_inference_steps=100 .* 50 training timesteps"):
        train.main(argv)
    assert not output.exists()


def test_train_never_writes_over_a_finished_run(tmp_path):
    train = load_script("train")
    output = tmp_path / "run"
    train.main(tiny_train_args(output, "--skip_elbo"))
    summary = (output / "training_summary.json").read_text()
    with pytest.raises(ValueError, match="--output_dir=.*already holds files.*--overwrite_output_dir"):
        train.main(tiny_train_args(output, "--skip_elbo", "--seed", "1"))
    assert (output / "training_summary.json").read_text() == summary
    result = train_result(train, tiny_train_args(output, "--skip_elbo", "--seed", "1", "--overwrite_output_dir"))
    assert result.global_step == 2 and "test_bits_per_dim" not in json.loads(summary)


def test_demo_and_sample_never_replace_earlier_output_before_any_work(tmp_path, monkeypatch):
    """--quick has its own default folder; an existing folder or file needs --overwrite_output_dir."""
    demo, sample = load_script("demo"), load_script("sample")
    assert demo.parse_args(["--quick"]).output_dir is None  # resolved to runs/demo-quick, not runs/demo
    finished = tmp_path / "demo"
    finished.mkdir()
    (finished / "demo_report.json").write_text("{}")
    with pytest.raises(ValueError, match="--output_dir=.*already holds files.*--overwrite_output_dir"):
        demo.main(["--quick", "--output_dir", str(finished)])
    assert sorted(os.listdir(finished)) == ["demo_report.json"]
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"committed")
    missing = str(tmp_path / "no_pipeline")  # never loaded: the check comes first
    with pytest.raises(ValueError, match="grid.png' exists; pass --overwrite_output_dir"):
        sample.main(["--pipeline_dir", missing, "--grid", str(grid)])
    assert grid.read_bytes() == b"committed"


def test_report_to_defaults_to_what_is_installed(monkeypatch):
    from hvae_diffusion.training import cli

    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a)
    )
    assert cli.default_report_to() == "none"
    monkeypatch.setattr(cli.importlib.util, "find_spec", real_find_spec)
    expected = "tensorboard" if real_find_spec("tensorboard") is not None else "none"
    assert cli.default_report_to() == expected


def test_fine_tune_from_a_saved_pipeline(demo_dir, tmp_path):
    train = load_script("train")
    result = train_result(
        train,
        tiny_train_args(
            tmp_path / "tuned",
            "--pretrained_model_name_or_path",
            demo_dir / "denoiser",
            "--conditioning",
            "class",
            "--cond_drop_prob",
            "0.1",
        ),
    )
    assert result.global_step == 2
    assert json.loads((tmp_path / "tuned" / "unet" / "config.json").read_text())["num_class_embeds"] == 11
    # a bare UNet folder has no scheduler to contradict: the flags define a new one
    train.main(
        tiny_train_args(
            tmp_path / "bare",
            "--pretrained_model_name_or_path",
            demo_dir / "denoiser" / "unet",
            "--conditioning",
            "class",
            "--prediction_type",
            "v_prediction",
        )
    )
    scheduler_config = json.loads((tmp_path / "bare" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["prediction_type"] == "v_prediction"


def test_single_thread_launch_warns(monkeypatch):
    from hvae_diffusion.training.cli import warn_if_single_threaded

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(UserWarning, match="OMP_NUM_THREADS=1"):
        warn_if_single_threaded()
    monkeypatch.setenv("WORLD_SIZE", "2")  # two processes on two cores: nothing idle
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_single_threaded()


TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from hvae_diffusion import HVAEScheduler
    from hvae_diffusion.models import MLPDenoiser
    from hvae_diffusion.training.loop import TrainingConfig, train
    from hvae_diffusion.training.losses import DiffusionLoss

    def run(output_dir, batch_size):
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 3, (64,), generator=generator)
        data = torch.utils.data.TensorDataset(torch.randn(64, 2, generator=generator) + labels[:, None], labels)
        torch.manual_seed(0)
        model = MLPDenoiser(in_channels=2, hidden_dim=16, num_blocks=1, num_class_embeds=4)
        config = TrainingConfig(output_dir=output_dir, train_batch_size=batch_size, max_train_steps=3,
                                gradient_accumulation_steps=2, learning_rate=1e-2, checkpointing_steps=None,
                                report_to=None, use_ema=True, seed=7)
        loss_fn = DiffusionLoss(HVAEScheduler(num_train_timesteps=100), cond_drop_prob=0.3, null_label=3)
        train(config, model, loss_fn, data, save_fn=lambda m, d: torch.save(m.state_dict(), d + "/weights.pt"))

    if __name__ == "__main__":
        run(sys.argv[1], int(sys.argv[2]))
""")


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    script = tmp_path / "two_process_train.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(tmp_path / "two"),
        "4",
    ]
    os.makedirs(tmp_path / "two")
    result = subprocess.run(
        command, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("two_process_train", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.makedirs(tmp_path / "one")
    module.run(str(tmp_path / "one"), 8)
    two = torch.load(tmp_path / "two" / "weights.pt")
    one = torch.load(tmp_path / "one" / "weights.pt")
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-6), key
    # and it is not trivially equal: the run moved the weights
    torch.manual_seed(0)
    from hvae_diffusion.models import MLPDenoiser

    initial = MLPDenoiser(in_channels=2, hidden_dim=16, num_blocks=1, num_class_embeds=4).state_dict()
    assert any(not torch.allclose(initial[key], one[key]) for key in one)


def make_text_setup(root):
    """A tiny CLIP text encoder + tokenizer, a cross-attention UNet config and a captioned image folder."""
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    (root / "encoder" / "tokenizer").mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in ["a</w>", "digit</w>", "zero</w>", "one</w>"] + list("adegiotrnz"):
        vocab.setdefault(token, len(vocab))
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=8).save_pretrained(
        root / "encoder" / "tokenizer"
    )
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(config).save_pretrained(root / "encoder" / "text_encoder")
    (root / "images").mkdir()
    rows = []
    for index in range(16):
        Image.new("L", (8, 8), color=index * 15).save(root / "images" / f"{index}.png")
        rows.append(json.dumps({"file_name": f"{index}.png", "text": ["a digit zero", "a digit one"][index % 2]}))
    (root / "images" / "metadata.jsonl").write_text("\n".join(rows))
    (root / "unet.json").write_text(
        json.dumps(
            {
                "_class_name": "UNet2DConditionModel",
                "sample_size": 8,
                "in_channels": 1,
                "out_channels": 1,
                "block_out_channels": [16, 32],
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "layers_per_block": 1,
                "norm_num_groups": 8,
                "cross_attention_dim": 16,
                "attention_head_dim": 4,
            }
        )
    )


def test_text_conditioning_with_prompt_dropout(tmp_path):
    make_text_setup(tmp_path)
    train = load_script("train")
    output = tmp_path / "text_run"
    train.main(
        tiny_train_args(
            output,
            "--train_data_dir",
            tmp_path / "images",
            "--conditioning",
            "text",
            "--cond_drop_prob",
            "0.3",
            "--unet_config",
            tmp_path / "unet.json",
            "--text_encoder_name_or_path",
            tmp_path / "encoder",
            "--train_batch_size",
            "4",
        )
    )
    for component in ["unet", "scheduler", "text_encoder", "tokenizer"]:
        assert (output / component).is_dir(), component
    sample = load_script("sample")
    pipe = sample.load_sampling_pipeline(str(output), "cfg")
    assert pipe.text_encoder is not None and pipe.unet.config.cross_attention_dim == 16
    images, labels = sample.sample(pipe, "cfg", 2.0, None, ["a digit one"], 2, 3, seed=0)
    assert images.shape == (2, 1, 8, 8) and labels.tolist() == [-1, -1]


def test_evaluate_clipping_sweep_plots_both_guidances_with_clipping_on_and_off(demo_dir, tmp_path):
    """The guidance-sweep figure's data: every (guidance, clip_sample, scale) once, scale 0 included; with
    balanced labels an accuracy is a multiple of 1 / number of samples."""
    evaluate = load_script("evaluate")
    output_dir = tmp_path / "sweep"
    report = evaluate.main(
        [
            "--pipeline_dir",
            str(demo_dir / "denoiser"),
            "--classifier_dir",
            str(demo_dir / "classifier_guided"),
            "--output_dir",
            str(output_dir),
            "--num_inference_steps",
            "3",
            "--guidance_scales",
            "2",
            "--num_samples_per_class",
            "1",
            "--num_unconditional_samples",
            "4",
            "--bpd_nfe",
            "3",
            "--bpd_num_samples",
            "4",
            "--clipping_sweep",
        ]
    )
    settings = {
        (entry["guidance"], entry["clip_sample"], entry["guidance_scale"]) for entry in report["guidance_sweep"]
    }
    assert settings == {
        (guidance, clip, scale)
        for guidance in ("classifier-free", "classifier")
        for clip in (True, False)
        for scale in (0.0, 2.0)
    }
    assert len(report["guidance_sweep"]) == len(settings)
    for entry in report["guidance_sweep"]:
        assert entry["num_samples"] == 10
        assert round(entry["accuracy"] * 10) == pytest.approx(entry["accuracy"] * 10)
    assert (output_dir / "guidance_sweep.png").is_file()
