"""A wheel built from the repository works outside the checkout: installed into a fresh venv, the model card renders
(its template, the top-level model_card.md, is copied into the package by setup.py's build step: one source) and
the `hvae-train` entry point trains. The card's install line names where the package came from.

Offline and fast: the wheel is built without build isolation, and the fresh venv borrows the test interpreter's
packages (torch, diffusers, ...) through a path line in a .pth file, which adds that site-packages directory but not
its own .pth hooks (so an editable install of the checkout stays out). Everything runs from a temporary directory,
so nothing is imported from the checkout.
"""

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")


def run(command, cwd, timeout=300):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, (
        f"{command} exited with {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh venv's python, a working directory outside the checkout, the wheel)."""
    root = tmp_path_factory.mktemp("packaging")
    shutil.copytree(REPOSITORY, root / "source", ignore=NOT_SOURCES)
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            "wheels",
            "./source",
        ],
        root,
    )
    (wheel,) = (root / "wheels").glob("hvae_diffusion-*.whl")
    run([sys.executable, "-m", "venv", "--without-pip", "venv"], root)
    python = root / "venv" / "bin" / "python"
    venv_site = run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], root).strip()
    Path(venv_site, "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index"]
        + ["--ignore-installed", str(wheel)],
        root,
    )
    work = root / "work"
    work.mkdir()
    return python, work, wheel


def test_wheel_ships_the_top_level_model_card_and_the_entry_points(installed):
    python, work, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert zipfile.ZipFile(wheel).read("hvae_diffusion/model_card.md") == (REPOSITORY / "model_card.md").read_bytes()
    assert not (REPOSITORY / "hvae_diffusion" / "model_card.md").exists()  # one source, not two copies
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "hvae-train = hvae_diffusion.commands:train_cli" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert (python.parent / "hvae-train").is_file()


def test_model_card_renders_from_the_installed_package(installed):
    python, work, _ = installed
    code = (
        "import hvae_diffusion, sys\n"
        "from hvae_diffusion.training.hub import render_model_card\n"
        "render_model_card('.', repo_id='someone/digits', pipeline_class='HVAEPipeline', dataset='digits',"
        " prediction_type='epsilon', loss_weighting='simple', variance_type='fixed_small', conditioning='none',"
        " num_train_steps=20, final_loss='0.5', bits_per_dim=None, sample_grid=None, frechet_distance=None,"
        " guided_accuracy=None, extra=None)\n"
        "print(hvae_diffusion.__file__)\n"
    )
    location = run([str(python), "-c", code], work).strip()
    assert location.startswith(str(python.parents[1])), location  # the wheel's copy, not the checkout
    card = (work / "README.md").read_text()
    assert 'DiffusionPipeline.from_pretrained("someone/digits")' in card
    # installed from a wheel file: no source URL is known, so the card says how to install from source (never a
    # bare `pip install hvae-diffusion`, which no index serves)
    assert 'pip install "hvae-diffusion @ git+<repository URL>"' in card and "pip install hvae-diffusion`" not in card


def test_the_cards_install_line_names_the_git_source_the_package_came_from(monkeypatch):
    """After `pip install git+URL`, PEP 610's direct_url.json records the URL and commit: the card's line
    reinstalls exactly that; with a Source project URL and no record, that URL."""
    from hvae_diffusion.training import hub

    class Distribution:
        def __init__(self, direct_url, project_urls=()):
            self.direct_url = direct_url
            self.metadata = type("Metadata", (), {"get_all": lambda _, key: list(project_urls) or None})()

        def read_text(self, name):
            return self.direct_url if name == "direct_url.json" else None

    git = '{"url": "https://example.org/hvae.git", "vcs_info": {"vcs": "git", "commit_id": "abc123"}}'
    monkeypatch.setattr(hub.metadata, "distribution", lambda name: Distribution(git))
    assert hub.install_command() == 'pip install "hvae-diffusion @ git+https://example.org/hvae.git@abc123"'
    wheel = '{"url": "file:///tmp/hvae_diffusion-0.1-py3-none-any.whl", "archive_info": {}}'
    monkeypatch.setattr(hub.metadata, "distribution", lambda name: Distribution(wheel))
    assert hub.install_command() is None
    source = ["Source, https://example.org/hvae"]
    monkeypatch.setattr(hub.metadata, "distribution", lambda name: Distribution(wheel, source))
    assert hub.install_command() == 'pip install "hvae-diffusion @ git+https://example.org/hvae"'


def test_hvae_train_runs_from_the_installed_package(installed):
    python, work, _ = installed
    command = [str(python.parent / "hvae-train"), "--output_dir", "run", "--max_train_steps", "20"]
    run(command + ["--num_inference_steps", "5", "--skip_elbo"], work, timeout=600)
    assert (work / "run" / "model_index.json").is_file() and (work / "run" / "README.md").is_file()
