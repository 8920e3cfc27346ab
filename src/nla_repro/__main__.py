"""Command line: `python -m nla_repro <stage>` runs one stage with params.yaml.

dvc.yaml calls only this. `python -m nla_repro profile NAME` writes params.yaml from a profile.
"""

from __future__ import annotations

import argparse
import contextlib
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

VERIFY_REPORT = C.WORK_DIR / "verify.json"
STAGES = ("base", "corpus", "label", "extract", "sft_av", "sft_ar", "rl", "sae", "eval", "card")


def record_stage_time(
    stage: str, profile: str, started: float, timing: dict | None, device: str = "cpu"
) -> None:
    """Append the wall time of a finished stage, and the training throughput it reports as
    `timing`, to STAGE_TIMES (kept out of every DVC output: a timing in a tracked file would
    change its hash on every rebuild)."""
    import json
    import platform

    from nla_repro.build_record import machine_row
    from nla_repro.platform import peak_rss_mb

    row = {
        "stage": stage,
        "profile": profile,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 2),
        "host": platform.node(),
        **machine_row(),
        "device": device,
        "peak_rss_mb": peak_rss_mb(),
        **(timing or {}),
    }
    C.STAGE_TIMES.parent.mkdir(parents=True, exist_ok=True)
    with C.STAGE_TIMES.open("a") as f:
        f.write(json.dumps(row) + "\n")


def run_stage(args: argparse.Namespace) -> None:
    """One stage, guarded: it says which reproducibility tier it runs in, refuses to start
    while another live process runs it, stops cleanly on SIGTERM or when the `dvc repro` that
    started it dies, and keeps a copy of its uncached outputs once it succeeds."""
    from nla_repro import pipeline, platform
    from nla_repro.build_record import run_device, tier_line

    params = C.load_params(args.params)
    stage = importlib.import_module(f"nla_repro.stages.{args.command}")
    pipeline_run = args.command != "eval" or args.out is None  # `eval --out` is a side run
    log = logging.getLogger("nla_repro")
    if pipeline_run:
        log.info("%s: %s", args.command, tier_line(args.command, params))
    platform.raise_on_sigterm()
    platform.exit_with_parent()
    # A side run (`eval --out DIR`) writes only under DIR: it needs no lock of the stage.
    lock = platform.stage_lock(args.command) if pipeline_run else contextlib.nullcontext()
    with lock:
        started = time.time()
        if args.command == "eval":
            result = stage.run(params, av_path=args.av, ar_path=args.ar, out_dir=args.out)
        else:
            result = stage.run(params)
        timing = result.get("timing") if isinstance(result, dict) else None
        record_stage_time(args.command, params.profile, started, timing, run_device(params))
        if pipeline_run:
            pipeline.keep_last_good(args.command)


def verify(args: argparse.Namespace) -> int:
    from nla_repro import reproducibility as R

    params = C.load_params(args.params)
    if args.pin:
        from nla_repro import build_record

        record = build_record.pin(params)
        n = len(record["stages"])
        print(f"wrote {build_record.BUILD_RECORD}: {n} stages of profile {params.profile}")
        return 0
    report = R.compare(params, R.resolve_ref(args.against, args.release))
    print(R.render(report, everything=args.all))
    from nla_repro.io import write_json

    write_json(
        {
            **report.summary(),
            "leaves": [
                {
                    "file": leaf.file,
                    "path": leaf.path,
                    "published": leaf.published,
                    "rebuilt": leaf.rebuilt,
                    "tier": leaf.tier,
                    "tolerance": leaf.tolerance,
                    "headline": leaf.headline,
                    "reproduced": leaf.reproduced,
                }
                for leaf in report.leaves
                if R.is_number(leaf.published) or R.is_number(leaf.rebuilt)
            ],
        },
        VERIFY_REPORT,
    )
    print(f"every number: {VERIFY_REPORT}")
    return 0 if report.ok else 1


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
    p = sub.add_parser(
        "verify", help="did the rebuild reproduce the published numbers? (table, exit code)"
    )
    p.add_argument("--against", help="git ref holding the published numbers (default HEAD)")
    p.add_argument("--release", help="compare with a release tag, e.g. v0.1.00")
    p.add_argument("--all", action="store_true", help="list every number, not only headlines")
    p.add_argument(
        "--pin",
        action="store_true",
        help="record this build as the published one in metrics/build.json (BUILD_RECORD)",
    )
    p.add_argument("--params", type=Path, default=C.PARAMS_FILE)
    p = sub.add_parser(
        "restore", help="put back uncached outputs (metrics, sidecars) a failed stage deleted"
    )
    p.add_argument("stages", nargs="*", help="stages (default: all)")
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
        elif args.command == "verify":
            return verify(args)
        elif args.command == "restore":
            from nla_repro.pipeline import restore_outputs

            restored = restore_outputs(args.stages or None)
            for out, source, matches in restored:
                state = {True: "matches dvc.lock", False: "differs from dvc.lock", None: ""}
                print(f"restored {out} from {source} {state[matches]}".rstrip())
            if not restored:
                print("nothing to restore: every uncached output is in place")
            if any(source.startswith("nowhere") for _, source, _ in restored):
                return 1
        elif args.command == "validate":
            df = read_parquet(args.path, schema_for(args.path, args.d_model))
            print(f"{args.path}: {len(df)} rows match the schema")
        else:
            run_stage(args)
    except NlaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
