"""Command line: `python -m nla_repro <stage>` runs one stage with params.yaml.

dvc.yaml calls only this. `python -m nla_repro profile NAME` writes params.yaml from a profile.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from nla_repro import config as C
from nla_repro.errors import NlaError
from nla_repro.schemas import read_parquet, schema_for

STAGES = ("base", "corpus", "label", "extract", "sft_av", "sft_ar", "rl", "sae", "eval", "card")


def record_stage_time(stage: str, profile: str, started: float, timing: dict | None) -> None:
    """Append the wall time of a finished stage, and the training throughput it reports as
    `timing`, to STAGE_TIMES (kept out of every DVC output: a timing in a tracked file would
    change its hash on every rebuild)."""
    import json
    import platform

    import torch

    from nla_repro.platform import peak_rss_mb

    row = {
        "stage": stage,
        "profile": profile,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 2),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
        **(timing or {}),
    }
    C.STAGE_TIMES.parent.mkdir(parents=True, exist_ok=True)
    with C.STAGE_TIMES.open("a") as f:
        f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nla_repro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage")
        p.add_argument("--params", type=Path, default=C.PARAMS_FILE, help="params file")
        if stage == "eval":
            p.add_argument(
                "--av", help="AV folder to evaluate (default: eval.av_path or models/av)"
            )
            p.add_argument(
                "--ar", help="AR folder to evaluate (default: eval.ar_path or models/ar)"
            )
            p.add_argument(
                "--out", help="write rows.parquet, eval.json and plots here (default: pipeline)"
            )
    p = sub.add_parser(
        "release", help="stage AV/AR/SAE Hub repos under dist/<version>/ (dry run unless --push)"
    )
    p.add_argument("--version", required=True, help="release version, e.g. v0.1.00")
    p.add_argument("--push", action="store_true", help="create the repos, upload and tag")
    p.add_argument("--org", help="Hub user or organization (default: params card.org)")
    p.add_argument("--public", action="store_true", help="create public repos (default private)")
    p.add_argument("--params", type=Path, default=C.PARAMS_FILE, help="params file")
    p = sub.add_parser("profile", help="write params.yaml from a named profile")
    p.add_argument("name", help="profile name: " + ", ".join(C.profile_names()))
    p.add_argument("--output", type=Path, default=C.PARAMS_FILE)
    p = sub.add_parser("check-params", help="validate a params file and print it")
    p.add_argument("--params", type=Path, default=C.PARAMS_FILE)
    sub.add_parser("doctor", help="versions, CUDA, VRAM, bitsandbytes, DVC remotes, disk")
    sub.add_parser("configure", help="apply this platform's settings (Windows: DVC cache copy)")
    p = sub.add_parser("kill", help="kill a process and all its children (a stuck stage)")
    p.add_argument("pid", type=int)
    p = sub.add_parser("validate", help="check a stage parquet against its schema")
    p.add_argument("path", type=Path, help="e.g. data/corpus.parquet, data/activations.parquet")
    p.add_argument("--d-model", type=int, help="vector width (default: from models/base)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Long CPU runs: unbuffered output so progress reaches logs and DVC as it happens.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        if args.command == "profile":
            from nla_repro.io import write_text

            params = C.materialize_profile(args.name)
            write_text(C.dump_params(params), args.output)
            print(f"wrote {args.output} from profile {args.name!r}")
        elif args.command == "check-params":
            print(C.dump_params(C.load_params(args.params)), end="")
        elif args.command == "doctor":
            from nla_repro import platform

            rows = platform.doctor_rows()
            print(platform.format_table([("check", "value", "status"), *rows]))
            return 1 if any(status == "fail" for _, _, status in rows) else 0
        elif args.command == "configure":
            from nla_repro import platform

            for cmd in platform.configure_commands():
                print(" ".join(cmd))
                subprocess.run(cmd, check=True)
        elif args.command == "kill":
            from nla_repro import platform

            killed = platform.kill_tree(args.pid)
            print(f"killed {len(killed)} process(es): {' '.join(map(str, killed))}")
        elif args.command == "release":
            from nla_repro.release.publish import release

            params = C.load_params(args.params)
            release(params, args.version, args.org, args.push, private=not args.public)
        elif args.command == "validate":
            df = read_parquet(args.path, schema_for(args.path, args.d_model))
            print(f"{args.path}: {len(df)} rows match the schema")
        else:
            params = C.load_params(args.params)
            stage = importlib.import_module(f"nla_repro.stages.{args.command}")
            started = time.time()
            if args.command == "eval":
                result = stage.run(params, av_path=args.av, ar_path=args.ar, out_dir=args.out)
            else:
                result = stage.run(params)
            timing = result.get("timing") if isinstance(result, dict) else None
            record_stage_time(args.command, params.profile, started, timing)
    except NlaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
