#!/usr/bin/env python
"""The same training under Accelerate's engines on GPUs: DDP, FSDP and DeepSpeed ZeRO-2/3 against one process.

For each engine, ``hvae-train`` (class conditioning, classifier-free dropout, EMA, gradient accumulation) runs with N
processes of batch B against one process of batch N·B, and must save the same weights (allclose, ``--atol``). Then
the engine's run is split in two: 2 steps with a checkpoint, resumed to 4 (a constant learning rate, so the schedule
does not depend on where the run stops), which must equal its uninterrupted 4-step run bitwise. The EMA is
gathered under ZeRO-3 (``EMAModel`` does it); ``--use_ema`` is refused under FSDP, whose flat shards ``EMAModel``
cannot follow, so the FSDP case trains without it.

    python benchmarks/compare_engines.py --num_processes 2 [--engines ddp fsdp zero2 zero3] [--output_dir DIR]

Needs N GPUs, and ``pip install deepspeed`` for the ZeRO engines (FSDP and DeepSpeed do not run on the CPU-only test
machine, where tests/test_runs.py runs the DDP comparison). Prints one JSON line per check; exit status 1 when one
fails. The accelerate config of each engine is written to ``DIR/<engine>.yaml``: the files to start from for a real
run.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENGINE_CONFIGS = {
    "ddp": {"distributed_type": "MULTI_GPU"},
    "fsdp": {
        "distributed_type": "FSDP",
        "fsdp_config": {
            "fsdp_sharding_strategy": "FULL_SHARD",
            "fsdp_auto_wrap_policy": "NO_WRAP",
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_use_orig_params": True,
            "fsdp_sync_module_states": True,
            "fsdp_offload_params": False,
        },
    },
    "zero2": {"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2, "gradient_clipping": 1.0}},
    "zero3": {
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"zero_stage": 3, "gradient_clipping": 1.0, "zero3_save_16bit_model": False},
    },
}


def write_config(path, engine, num_processes):
    """An accelerate config file (JSON is valid YAML) for ``engine`` on one machine."""
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "machine_rank": 0,
        "num_machines": 1,
        "num_processes": num_processes,
        "mixed_precision": "no",
        "use_cpu": False,
        **ENGINE_CONFIGS[engine],
    }
    if "deepspeed_config" in config:
        config["deepspeed_config"] = {"gradient_accumulation_steps": 2, **config["deepspeed_config"]}
    with open(path, "w") as handle:
        json.dump(config, handle, indent=2)


def train(config_file, num_processes, output_dir, batch, steps, ema, *extra):
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    command += ["--config_file", config_file] if config_file else ["--num_processes", "1"]
    command += [os.path.join(ROOT, "scripts", "train.py"), "--output_dir", output_dir, "--conditioning", "class"]
    command += ["--cond_drop_prob", "0.2", "--train_batch_size", str(batch), "--gradient_accumulation_steps", "2"]
    command += ["--max_train_steps", str(steps), "--lr_scheduler", "constant", "--learning_rate", "1e-5"]
    command += ["--checkpointing_steps", "2", "--report_to", "none", "--skip_elbo", "--num_inference_steps", "5"]
    command += ["--seed", "3", "--num_threads", "0", *(["--use_ema"] if ema else []), *extra]
    environment = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")


def weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def largest_difference(a, b):
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[key].double() - b[key].double()).abs().max()) for key in a)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=list(ENGINE_CONFIGS), choices=list(ENGINE_CONFIGS))
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "benchmarks", "output", "engines"))
    parser.add_argument("--batch_size", type=int, default=8, help="per process")
    parser.add_argument("--atol", type=float, default=1e-6)
    args = parser.parse_args()
    if os.path.exists(args.output_dir):
        parser.error(f"--output_dir={args.output_dir!r} exists; choose a new folder")
    os.makedirs(args.output_dir)
    failed = False
    references = {}
    for engine in args.engines:
        ema = engine != "fsdp"
        if ema not in references:
            folder = os.path.join(args.output_dir, f"one-process{'-ema' if ema else ''}")
            train(None, 1, folder, args.batch_size * args.num_processes, 4, ema)
            references[ema] = weights(folder)
        config_file = os.path.join(args.output_dir, f"{engine}.yaml")
        write_config(config_file, engine, args.num_processes)
        whole, split = os.path.join(args.output_dir, engine), os.path.join(args.output_dir, f"{engine}-resumed")
        train(config_file, args.num_processes, whole, args.batch_size, 4, ema)
        train(config_file, args.num_processes, split, args.batch_size, 2, ema)
        train(config_file, args.num_processes, split, args.batch_size, 4, ema, "--resume_from_checkpoint", "latest")
        checks = {
            "matches_one_process": largest_difference(references[ema], weights(whole)),
            "resumed_equals_whole": largest_difference(weights(whole), weights(split)),
        }
        for check, difference in checks.items():
            passed = difference <= (args.atol if check == "matches_one_process" else 0.0)
            failed |= not passed
            print(json.dumps({"engine": engine, "check": check, "max_abs_difference": difference, "passed": passed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
