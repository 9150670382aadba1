"""What every benchmark script shares: the command-line flags, the device settings, interleaved timing, the rows.

Every number is a ratio against a baseline run in the same process, on the same tensors, with the same model: each
case is warmed up, then candidate and baseline repetitions are interleaved (their order rotating each round) and
the medians are compared. CUDA is synchronized around every repetition.

A script defines ``run(settings, report)`` and ends with ``main_for(run, __doc__)``; ``benchmarks/run.py`` calls
the same ``run`` functions in one process.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
# Untracked (benchmarks/.gitignore): a run never overwrites the committed results unless asked to.
DEFAULT_OUTPUT_DIR = os.path.join(BENCHMARKS_DIR, "output")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST = ("none", "bfloat16", "float16")


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    autocast: str
    compile: bool
    channels_last: bool
    repeats: int
    warmup: int
    quick: bool
    output_dir: str

    def prepare(self, model, cast=True):
        """The model as every benchmark runs it: on the device, in the dtype and memory format, compiled if asked.

        A float32 model is not re-cast (Diffusers warns on every cast); nor is a model being trained (``cast=False``:
        training runs in low precision through autocast, never with low-precision weights). ``torch.compile`` wraps the module the way
        Diffusers' docs do (``pipe.unet = torch.compile(pipe.unet)``), so a pipeline holds the compiled module.
        """
        model = model.to(self.device)
        if cast and self.dtype != torch.float32:
            model = model.to(self.dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return torch.compile(model) if self.compile else model

    def autocast_context(self):
        if self.autocast == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.autocast])

    def generator(self, seed=0):
        return torch.Generator(self.device).manual_seed(seed)

    def randn(self, *shape, seed=0):
        """Standard normal tensor drawn on the CPU (the same numbers on every device), moved to the device."""
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(self.device, self.dtype)

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        parts = [str(self.device), str(self.dtype).replace("torch.", "")]
        parts += [f"autocast {self.autocast}"] if self.autocast != "none" else []
        parts += ["compile"] if self.compile else []
        parts += ["channels_last"] if self.channels_last else []
        return ", ".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repetition: a smoke test (seconds)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="weights and inputs")
    parser.add_argument("--autocast", default="none", choices=AUTOCAST, help="run the models under torch.autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (compiles for minutes)")
    parser.add_argument("--channels_last", action="store_true", help="models in channels_last memory format")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per case (default 3, quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default 1, quick 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--output_dir",
        default=DEFAULT_OUTPUT_DIR,
        help="where the JSON (and any figure) goes; default benchmarks/output/, which git ignores",
    )
    return parser


def settings_from_args(args, parser: argparse.ArgumentParser) -> Settings:
    """Validate the device flags before any work (a clear message instead of a failure deep inside torch)."""
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available in this torch build or on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) present")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: cpu or cuda[:N] are supported, got {args.device!r}")
    if args.autocast == "float16" and device.type == "cpu":
        parser.error("--autocast float16 needs --device cuda (CPU autocast runs bfloat16)")
    for name in ("repeats", "warmup", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be at least {0 if name == 'warmup' else 1}, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return Settings(
        device=device,
        dtype=DTYPES[args.dtype],
        autocast=args.autocast,
        compile=args.compile,
        channels_last=args.channels_last,
        repeats=args.repeats or (1 if args.quick else 3),
        warmup=args.warmup if args.warmup is not None else (0 if args.quick else 1),
        quick=args.quick,
        output_dir=args.output_dir,
    )


def time_interleaved(cases: dict, settings: Settings, repeats: int | None = None, warmup: int | None = None) -> dict:
    """Median seconds of each zero-argument callable in ``cases``, repetitions interleaved with rotating order."""
    repeats = settings.repeats if repeats is None else repeats
    warmup = settings.warmup if warmup is None else warmup
    names = list(cases)
    with settings.autocast_context():
        for _ in range(warmup):
            for name in names:
                cases[name]()
        times = {name: [] for name in names}
        for repetition in range(repeats):
            shift = repetition % len(names)
            for name in names[shift:] + names[:shift]:
                settings.synchronize()
                start = time.perf_counter()
                cases[name]()
                settings.synchronize()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


class Report:
    """The rows of one run; each is printed as it is added."""

    def __init__(self):
        self.rows = []

    def compare(self, benchmark, case, candidate, candidate_s, baseline, baseline_s, target=None, unit="s", **extra):
        """One comparison; ``ratio`` = candidate / baseline, ``met`` = ratio ≤ target (None without a target)."""
        ratio = candidate_s / baseline_s
        row = dict(
            benchmark=benchmark,
            case=case,
            candidate=candidate,
            candidate_s=candidate_s,
            baseline=baseline,
            baseline_s=baseline_s,
            ratio=ratio,
            target=target,
            met=None if target is None else bool(ratio <= target),
            unit=unit,
            **extra,
        )
        self.rows.append(row)
        met = {True: "yes", False: "NO", None: ""}[row["met"]]
        target_text = f"≤{target:g}" if target is not None else "-"
        print(
            f"{benchmark:<11} {case:<40} {candidate:<26} {format_seconds(candidate_s):>10}  "
            f"{baseline:<26} {format_seconds(baseline_s):>10} {ratio:>6.3f} {target_text:>6} {met}",
            flush=True,
        )
        return row

    def note(self, benchmark, case, **values):
        """A measurement that is not a ratio (a fraction, a count, a skip with its reason)."""
        self.rows.append(dict(benchmark=benchmark, case=case, candidate=None, baseline=None, **values))
        print(f"{benchmark:<11} {case:<40} " + ", ".join(f"{k}={format_value(v)}" for k, v in values.items()))


def format_seconds(seconds):
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.3f} s"


def format_value(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(rows) -> str:
    """The comparisons as the Markdown table docs/benchmarks.md quotes, the notes in a second table."""
    lines = ["| benchmark | case | candidate | time | baseline | time | ratio | target | met |", "|---" * 9 + "|"]
    notes = ["", "| benchmark | case | values |", "|---|---|---|"]
    for row in rows:
        if row["baseline"] is None:
            values = {k: v for k, v in row.items() if k not in ("benchmark", "case", "candidate", "baseline")}
            notes.append(
                f"| {row['benchmark']} | {row['case']} | "
                + ", ".join(f"{k}={format_value(v)}" for k, v in values.items())
                + " |"
            )
            continue
        target = f"≤ {row['target']:g}" if row["target"] is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[row["met"]]
        lines.append(
            f"| {row['benchmark']} | {row['case']} | {row['candidate']} | {format_seconds(row['candidate_s'])} | "
            f"{row['baseline']} | {format_seconds(row['baseline_s'])} | {row['ratio']:.3f} | {target} | {met} |"
        )
    return "\n".join(lines + (notes if len(notes) > 3 else [])) + "\n"


def machine_info(settings: Settings) -> dict:
    import diffusers

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "settings": settings.describe(),
        "load_average": os.getloadavg(),
    }
    if settings.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(settings.device)
    return info


def write_results(name: str, report: Report, settings: Settings, path: str | None = None) -> str:
    """Write ``{"machine": ..., "rows": [...]}`` to ``path`` (default ``<output_dir>/<name>.json``)."""
    path = path or os.path.join(settings.output_dir, f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"machine": machine_info(settings), "rows": report.rows}, handle, indent=1, default=str)
    print(f"wrote {path}", flush=True)
    return path


def main_for(run, description: str, argv=None):
    """The command line of one benchmark script: parse the shared flags, run, write ``<output_dir>/<script>.json``."""
    parser = add_arguments(
        argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    args = parser.parse_args(argv)
    settings = settings_from_args(args, parser)
    quiet_diffusers()
    report = Report()
    with torch.inference_mode(False):
        run(settings, report)
    name = os.path.splitext(os.path.basename(sys.modules[run.__module__].__file__))[0]
    write_results(name, report, settings)
    return report


def quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    diffusers_logging.set_verbosity_error()  # casts to bfloat16 warn on every model; the table is the output


# ---------------------------------------------------------------------------------------------- shared models


def make_unet(settings: Settings, num_class_embeds=None, prepare=True):
    """The small UNet2DModel of the sampling benchmarks: 16x16 RGB, widths (16, 32), one attention block (177k
    parameters); 8x8 grey and widths (8, 16) with --quick. Small on purpose: per-step overhead shows against it."""
    from diffusers import UNet2DModel

    sample_size, channels, _ = unet_shape(settings)
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16) if settings.quick else (16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    ).eval()
    return settings.prepare(unet) if prepare else unet


def unet_shape(settings: Settings):
    """(sample_size, channels, batch) of the sampling benchmarks."""
    return (8, 1, 2) if settings.quick else (16, 3, 16)


def make_classifier(settings: Settings, num_classes=10):
    from hvae_diffusion.models.noisy_classifier import NoisyClassifier

    sample_size, channels, _ = unet_shape(settings)
    torch.manual_seed(1)
    classifier = NoisyClassifier(
        sample_size=sample_size,
        in_channels=channels,
        num_classes=num_classes,
        block_out_channels=(8, 16) if settings.quick else (16, 32),
        norm_num_groups=8,
    ).eval()
    return settings.prepare(classifier)


def quiet(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
