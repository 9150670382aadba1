"""Smoke tests of benchmarks/: every script runs in its --quick mode and writes well-formed results.

No timing is asserted (timings belong to the benchmarks themselves, never to CI).
"""

import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
ENVIRONMENT = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
NAMES = ("scheduler", "sampling", "cfg", "classifier", "interval", "training", "scaling", "fastpaths", "latent")


def run_script(name, *arguments, timeout=600):
    return subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, name), *arguments],
        capture_output=True,
        text=True,
        env=ENVIRONMENT,
        cwd=ROOT,
        timeout=timeout,
    )


def digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("benchmarks")
    committed = {name: digest(os.path.join(BENCHMARKS, name)) for name in ("results.json", "scaling.png")}
    completed = run_script("run.py", "--quick", "--threads", "1", "--output_dir", str(output_dir))
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    with open(output_dir / "results.json") as handle:
        return json.load(handle), output_dir, committed


def test_every_benchmark_reports(quick_run):
    report, _, _ = quick_run
    assert {row["benchmark"] for row in report["rows"]} == set(NAMES)
    assert report["machine"]["settings"] == "cpu, float32"


def test_comparison_rows_are_consistent(quick_run):
    report, _, _ = quick_run
    comparisons = [row for row in report["rows"] if row["baseline"] is not None]
    assert {row["benchmark"] for row in comparisons} >= {"scheduler", "sampling", "cfg", "classifier", "training"}
    for row in comparisons:
        assert row["candidate_s"] > 0 and row["baseline_s"] > 0, row
        assert math.isclose(row["ratio"], row["candidate_s"] / row["baseline_s"], rel_tol=1e-9), row
        assert row["met"] == (None if row["target"] is None else row["ratio"] <= row["target"]), row


def test_each_speed_target_has_a_row(quick_run):
    report, _, _ = quick_run
    targets = {(row["benchmark"], row["baseline"], row["target"]) for row in report["rows"] if row.get("target")}
    assert ("scheduler", "fused floor", 1.3) in targets
    assert ("sampling", "DDPMPipeline", 1.0) in targets
    assert ("classifier", "UNet fwd + clf fwd/bwd", 1.1) in targets
    assert any(benchmark == "cfg" and baseline.startswith("faster:") for benchmark, baseline, _ in targets)
    cases = {row["case"] for row in report["rows"] if row["benchmark"] == "scheduler"}
    for prediction_type in ("epsilon", "sample", "v_prediction", "score"):
        assert any(case.endswith(f"{prediction_type}/fixed_small") for case in cases)


def test_outputs_land_in_output_dir_and_committed_files_stay(quick_run):
    _, output_dir, committed = quick_run
    assert (output_dir / "results.md").read_text().startswith("| benchmark | case |")
    assert (output_dir / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name, before in committed.items():
        assert digest(os.path.join(BENCHMARKS, name)) == before, f"benchmarks/{name} was overwritten"


def test_one_script_on_its_own(tmp_path):
    completed = run_script("bench_classifier.py", "--quick", "--output_dir", str(tmp_path))
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_classifier.json").read_text())["rows"]
    assert [row["benchmark"] for row in rows] == ["classifier"]
    assert rows[0]["unet_forwards_with_grad"] == 0 and rows[0]["unet_forwards"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is missing")
def test_cuda_without_cuda_is_a_clear_error():
    completed = run_script("run.py", "--device", "cuda", timeout=120)
    assert completed.returncode == 2
    assert "--device cuda: CUDA is not available" in completed.stderr


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--only", "nonsense"], "--only: unknown ['nonsense']"),
        (["--autocast", "float16"], "--autocast float16 needs --device cuda"),
        (["--repeats", "0"], "--repeats must be at least 1"),
    ],
)
def test_bad_arguments_are_rejected(arguments, message):
    completed = run_script("run.py", *arguments, timeout=120)
    assert completed.returncode == 2 and message in completed.stderr, completed.stderr


def tiny_class_conditional_pipeline(directory):
    from diffusers import UNet2DModel

    from hvae_diffusion import ClassifierFreeGuidancePipeline, HVAEScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=11,
    )
    pipeline = ClassifierFreeGuidancePipeline(unet=unet, scheduler=HVAEScheduler(), null_class_label=10)
    pipeline.save_pretrained(directory)


def test_sampler_quality_quick(tmp_path):
    tiny_class_conditional_pipeline(tmp_path / "pipeline")
    output_dir = tmp_path / "quality"
    completed = run_script(
        "sampler_quality.py",
        *("--pipeline_dir", str(tmp_path / "pipeline"), "--output_dir", str(output_dir)),
        *("--samplers", "hvae_fixed_large", "dpmpp_2m", "--steps", "2", "3", "--num_samples", "4"),
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads((output_dir / "sampler_quality.json").read_text())
    assert [(row["sampler"], row["steps"]) for row in result["rows"]] == [
        ("hvae_fixed_large", 2),
        ("hvae_fixed_large", 3),
        ("dpmpp_2m", 2),
        ("dpmpp_2m", 3),
    ]
    for row in result["rows"]:
        assert row["unconditional_frechet_distance"] >= 0 and row["guided_frechet_distance"] >= 0
        assert row["guided_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert len(result["frechet_distance_floor"]["draws"]) == 5
    table = (output_dir / "sampler_quality.md").read_text().splitlines()
    assert table[0] == "| sampler | 2 steps | 3 steps |" and len(table) == 4
    assert (output_dir / "sampler_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    completed = run_script(
        "sampler_quality.py",
        *("--pipeline_dir", str(tmp_path / "pipeline"), "--output_dir", str(output_dir), "--append"),
        *("--samplers", "dpmpp_2m", "ddim", "--steps", "3", "--num_samples", "4"),
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    appended = json.loads((output_dir / "sampler_quality.json").read_text())
    assert appended["rows"][:3] == result["rows"][:3]  # kept; dpmpp_2m at 3 steps measured again
    assert [(row["sampler"], row["steps"]) for row in appended["rows"][3:]] == [("dpmpp_2m", 3), ("ddim", 3)]
    completed = run_script(
        "sampler_quality.py",
        *("--pipeline_dir", str(tmp_path / "pipeline"), "--output_dir", str(output_dir), "--append"),
        *("--steps", "3", "--num_samples", "5"),
        timeout=120,
    )
    assert completed.returncode == 2 and "--append: --num_samples 5 differs" in completed.stderr


def test_sampler_quality_rejects_bad_arguments(tmp_path):
    completed = run_script("sampler_quality.py", "--pipeline_dir", str(tmp_path), "--num_samples", "1", timeout=120)
    assert completed.returncode == 2 and "--num_samples must be at least 2" in completed.stderr
