"""Smoke test of benchmarks/run.py: its quickest mode runs every item on tiny sizes and writes well-formed JSON.

No timing is asserted (timings belong to the benchmark itself, never to CI).
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "run.py")
ITEMS = ("scheduler", "sampling", "cfg", "classifier", "training", "elbo", "scaling", "fastpaths")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    directory = tmp_path_factory.mktemp("benchmarks")
    json_path, plot_path = directory / "results.json", directory / "scaling.png"
    environment = dict(os.environ, HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [
            sys.executable,
            RUN,
            "--quick",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--json",
            str(json_path),
            "--plot",
            str(plot_path),
        ],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    with open(json_path) as handle:
        return json.load(handle), completed.stdout, plot_path


def test_every_item_reports_rows(quick_report):
    report, stdout, _ = quick_report
    assert report["items"] == list(ITEMS)
    assert report["skipped"] == {}
    assert {row["item"] for row in report["rows"]} == set(ITEMS)
    assert "ratio" in stdout and "target" in stdout  # the printed table's header


def test_comparison_rows_are_consistent(quick_report):
    report, _, _ = quick_report
    comparisons = [row for row in report["rows"] if row["baseline"] is not None]
    assert comparisons
    for row in comparisons:
        assert row["candidate_s"] > 0 and row["baseline_s"] > 0, row
        assert math.isclose(row["ratio"], row["candidate_s"] / row["baseline_s"], rel_tol=1e-9), row
        if row["target"] is None:
            assert row["met"] is None, row
        else:
            assert row["met"] == (row["ratio"] <= row["target"]), row


def test_each_issue_target_has_a_row(quick_report):
    report, _, _ = quick_report
    targets = {(row["item"], row["baseline"]) for row in report["rows"] if row["target"] is not None}
    assert ("scheduler", "fused floor") in targets
    assert ("scheduler", "DDPMScheduler.step") in targets
    assert ("sampling", "DDPMPipeline") in targets
    assert any(item == "cfg" for item, _ in targets)
    assert any(item == "classifier" for item, _ in targets)
    assert ("training", "minimal loop") in targets
    scheduler_cases = {row["case"] for row in report["rows"] if row["item"] == "scheduler"}
    # every prediction type and variance type of the scheduler is measured
    for prediction_type in ("epsilon", "sample", "v_prediction", "score"):
        for variance_type in ("fixed_small", "fixed_large", "learned_range"):
            assert any(case.endswith(f"{prediction_type}/{variance_type}") for case in scheduler_cases)


def test_machine_info_and_plot(quick_report):
    report, _, plot_path = quick_report
    machine = report["machine"]
    for key in ("command", "platform", "cpu_count", "torch", "diffusers", "device", "dtype", "date_utc"):
        assert key in machine
    assert machine["device"] == "cpu"
    assert plot_path.stat().st_size > 0
    with open(plot_path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    memory_rows = [row for row in report["rows"] if row["item"] == "scaling" and "peak_memory_mib" in row]
    assert memory_rows and all(row["peak_memory_mib"] >= 0 for row in memory_rows)


def test_bad_arguments_are_rejected():
    completed = subprocess.run(
        [sys.executable, RUN, "--items", "nonsense"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert completed.returncode != 0
    assert "--items" in completed.stderr and "nonsense" in completed.stderr
