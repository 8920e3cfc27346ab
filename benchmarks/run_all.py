"""Run every benchmark in benchmarks/ and record the results with the machine they ran on.

Each benchmark (every benchmarks/*.py but this file) runs as a subprocess from the repo root
with its default arguments (`--quick`: small settings, a fast check that the benchmarks run;
the numbers are then not the ones to publish) and prints one JSON object on stdout. Writes
benchmarks/results.json (atomically): the machine (CPU model, cores, SIMD flags, RAM, torch
and transformers versions, git commit, date, load average before each benchmark), each
benchmark's JSON with its wall time and exit status, and the wall time of each pipeline stage
from .nla_work/stage_times.jsonl (the latest entry per stage of the profile in params.yaml).
A benchmark that fails is recorded with the tail of its stderr and makes the exit code 1; the
others still run. Prints a Markdown table of the headline numbers for the README.

    python benchmarks/run_all.py                 # all, default settings (quiet machine!)
    python benchmarks/run_all.py --quick         # all, small settings
    python benchmarks/run_all.py --only sae      # one; merged into an existing results.json
    python benchmarks/run_all.py --table         # the table of an existing results.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml

from nla_repro.io import write_json  # temporary name, then renamed

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results.json"
STAGE_TIMES = Path(".nla_work/stage_times.jsonl")
PIPELINE_STAGES = (
    "base",
    "corpus",
    "label",
    "extract",
    "sft_av",
    "sft_ar",
    "rl",
    "sae",
    "eval",
    "card",
)

# Small settings per benchmark for --quick: seconds to a few minutes on 2 cores. The SAE's
# timed blocks need more steps than one block, or there is nothing to time.
QUICK_ARGS = {
    "extract": [
        *("--n-texts", "16", "--batch-size", "8", "--max-length", "32"),
        *("--repeats", "1", "--peak-repeats", "2"),
    ],
    "sae": ["--tokens", "8192", "--block", "2"],
    "sft": ["--steps", "1", "--warmup", "1", "--rows", "16"],
    "rl": ["--steps", "1", "--warmup", "0"],
    "generation": [
        *("--rows", "4", "--rl-vectors", "1"),
        *("--repeats", "1", "--peak-repeats", "2"),
    ],
}
STDERR_TAIL = 3000
# Scripts here that are not throughput benchmarks, with why run_all leaves them out.
SKIPPED = {
    "levers": "a lever sweep (seven short training runs) that rewrites benchmarks/levers.json, "
    "a dep of the card stage; run it on its own",
    "rl_levers": "an RL lever sweep (short GRPO runs, each scored on the test rows) that "
    "rewrites benchmarks/rl_levers.json, a dep of the card stage; run it on its own",
    "tolerances": "not a benchmark: a Markdown summary of verify's report "
    "(.nla_work/verify.json) after a rebuild",
}


# --- Machine ------------------------------------------------------------------------------


def _cpuinfo() -> dict:
    """Model name, SIMD flags and physical core count from /proc/cpuinfo (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model, flags, cores = "", set(), set()
    physical = core = ""
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "model name" and not model:
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
            cores.add((physical, core))
    return {"model": model, "flags": flags, "physical_cores": len(cores)}


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit(root: Path = ROOT) -> str | None:
    """HEAD, with '-dirty' when tracked files changed (the numbers then belong to no commit)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def machine_info(root: Path = ROOT) -> dict:
    import torch  # here, not at the top: --table and the unit tests do not need it

    cpu = _cpuinfo()
    flags = cpu.get("flags", set())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu.get("model") or platform.processor() or platform.machine(),
        "physical_cores": cpu.get("physical_cores") or None,
        "os_cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "avx2": "avx2" in flags,
        "avx512": sorted(f for f in flags if f.startswith("avx512")),
        "ram_gb": _ram_gb(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(root),
        "date_utc": now_utc(),
    }


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- Stage times --------------------------------------------------------------------------


def read_stage_times(path: Path, profile: str | None) -> tuple[dict[str, dict], list[str]]:
    """The latest entry per stage of `profile` (None: any) and the lines that could not be
    read, each named "path:line: why". A torn last line (a stage killed while appending) must
    not hide the other stages, so bad lines are reported, not raised."""
    latest: dict[str, dict] = {}
    problems: list[str] = []
    if not path.exists():
        return latest, [f"{path}: missing (no stage has finished here)"]
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            stage, wall = row["stage"], float(row["wall_s"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            problems.append(f"{path}:{n}: {type(err).__name__}: {err}")
            continue
        if profile is not None and row.get("profile") != profile:
            continue
        # Appended when a stage finishes, so a later line is a later run; started_utc breaks
        # no ties (one-second resolution).
        latest[stage] = row | {"wall_s": wall}
    return latest, problems


def pipeline_stage_times(root: Path = ROOT) -> dict:
    params = root / "params.yaml"
    profile = yaml.safe_load(params.read_text()).get("profile") if params.exists() else None
    stages, problems = read_stage_times(root / STAGE_TIMES, profile)
    order = {s: i for i, s in enumerate(PIPELINE_STAGES)}
    stages = dict(sorted(stages.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    missing = [s for s in PIPELINE_STAGES if s not in stages]
    return {
        "profile": profile,
        "source": str(STAGE_TIMES),
        "stages": stages,
        "missing_stages": missing,
        "total_wall_s": round(sum(r["wall_s"] for r in stages.values()), 1),
        "problems": problems,
    }


# --- Running ------------------------------------------------------------------------------


def discover(bench_dir: Path = HERE) -> dict[str, Path]:
    """Every benchmarks/*.py but this file, private modules and SKIPPED."""
    return {
        p.stem: p
        for p in sorted(bench_dir.glob("*.py"))
        if p.name != Path(__file__).name and not p.name.startswith("_") and p.stem not in SKIPPED
    }


def parse_output(stdout: str) -> dict | None:
    """The benchmark's JSON object: the whole stdout, else the last object that starts a
    line (a library may print a line of its own before it)."""
    try:
        value = json.loads(stdout)
        return value if isinstance(value, dict) else None
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    found, offset = None, 0
    for line in stdout.splitlines(keepends=True):
        start, offset = offset, offset + len(line)
        if not line.startswith("{"):
            continue
        try:
            value, _ = decoder.raw_decode(stdout, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            found = value
    return found


def run_benchmark(script: Path, args: list[str], cwd: Path, timeout_s: float | None) -> dict:
    record: dict = {
        "script": str(script.relative_to(cwd) if script.is_relative_to(cwd) else script),
        "args": args,
        "date_utc": now_utc(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, str(script), *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, stdout = None, err.stdout or ""
        stderr = (err.stderr or "") + f"\n(killed after the {timeout_s} s timeout)"
        stdout, stderr = (s.decode() if isinstance(s, bytes) else s for s in (stdout, stderr))
    record["wall_s"] = round(time.monotonic() - t0, 1)
    record["exit_status"] = rc
    result = parse_output(stdout) if rc == 0 else None
    record["ok"] = result is not None
    record["result"] = result
    if not record["ok"]:
        why = "no JSON object on stdout" if rc == 0 else f"exit status {rc}"
        record["error"] = why
        record["stderr_tail"] = stderr[-STDERR_TAIL:]
        record["stdout_tail"] = stdout[-STDERR_TAIL:]
    return record


# --- Table --------------------------------------------------------------------------------


def _num(value: object, digits: int = 0, unit: str = "") -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "n/a"
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".rstrip()


def _headline_rows(name: str, record: dict) -> list[tuple[str, str, str]]:
    """(benchmark, number, value) rows for one benchmark's result."""
    r = record.get("result") or {}
    if name == "extract":
        timing = r.get("timing", {})
        return [
            ("extract", "extractor tokens/s", _num(r.get("extractor_tokens_per_s"))),
            ("extract", "HF full forward tokens/s", _num(r.get("hf_full_forward_tokens_per_s"))),
            (
                "extract",
                "ratio vs HF forward (FLOP limit)",
                f"{_num(r.get('speedup_ratio'), 2)}x ({_num(r.get('flop_limit_ratio'), 2)}x; "
                f"{_num(r.get('fraction_of_limit'), 2)} of it)",
            ),
            (
                "extract",
                "extractor GFLOP/s (fraction of matmul peak)",
                f"{_num(r.get('extractor_gflops'), 1)} ({_num(r.get('fraction_of_peak'), 2)})",
            ),
            (
                "extract",
                "median ratio over repeats",
                f"{_num(timing.get('median_speedup_ratio'), 2)}x",
            ),
        ]
    if name == "sae":
        ours, theirs = r.get("ours", {}), r.get("saelens", {})
        version = theirs.get("version", "?")
        return [
            ("sae", "ours tokens/s", _num(ours.get("tokens_per_s"))),
            ("sae", f"SAELens {version} TopK tokens/s", _num(theirs.get("tokens_per_s"))),
            ("sae", "ratio vs SAELens", f"{_num(r.get('speed_ratio'), 2)}x"),
            (
                "sae",
                "held-out explained variance, ours vs SAELens",
                f"{_num(ours.get('explained_variance'), 3)} vs "
                f"{_num(theirs.get('explained_variance'), 3)}",
            ),
        ]
    if name == "rl":
        return [
            ("rl", "rollout tokens/s (sampled)", _num(r.get("rollout_tokens_per_s"), 1)),
            ("rl", "train tokens/s (policy, reference, AR)", _num(r.get("train_tokens_per_s"), 1)),
            (
                "rl",
                f"seconds per step ({r.get('rollouts_per_step')} rollouts)",
                _num(r.get("seconds_per_step"), 2),
            ),
        ]
    if name == "generation":
        rows = []
        for shape, label in (("eval", "eval shape"), ("rl", "RL rollout shape")):
            s = (r.get("shapes") or {}).get(shape)
            if s is None:
                continue
            ours, plain = s.get("ours", {}), s.get("plain", {})
            rows += [
                ("generation", f"{label}: ours tokens/s", _num(ours.get("tokens_per_s"), 1)),
                (
                    "generation",
                    f"{label}: HF generate tokens/s",
                    _num(plain.get("tokens_per_s"), 1),
                ),
                (
                    "generation",
                    f"{label}: ratio vs HF generate (median)",
                    f"{_num(s.get('speedup_ratio'), 2)}x "
                    f"({_num(s.get('median_speedup_ratio'), 2)}x)",
                ),
                (
                    "generation",
                    f"{label}: fraction of matmul peak, ours vs HF generate",
                    f"{_num(ours.get('fraction_of_peak'), 2)} vs "
                    f"{_num(plain.get('fraction_of_peak'), 2)}",
                ),
            ]
        if "greedy_rows" in r:
            rows.append(
                (
                    "generation",
                    "greedy rows identical to HF generate",
                    f"{_num(r.get('greedy_identical_rows'))} of {_num(r.get('greedy_rows'))}",
                )
            )
        return rows
    if name == "sft":
        rows = []
        for model in ("av", "ar"):
            if m := r.get(model):
                rows.append(
                    (
                        "sft",
                        f"{model.upper()} training tokens/s (s per step)",
                        f"{_num(m.get('tokens_per_s'), 1)} ({_num(m.get('s_per_step'), 2)} s)",
                    )
                )
                if "peak_vram_gb" in m:
                    rows.append(
                        ("sft", f"{model.upper()} peak VRAM", _num(m["peak_vram_gb"], 2, "GB"))
                    )
        return rows
    # A benchmark this table does not know yet: its top-level numbers.
    return [
        (name, key, _num(value, 2))
        for key, value in r.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]


def _yes(flag: object) -> str:
    return "n/a" if flag is None else ("yes" if flag else "NO")


def peer_rows(results: dict) -> list[tuple[str, str, str, str, str, str]]:
    """(loop, ours, peer, ratio, target, met) for each loop measured against the tool a user
    would pick instead, in the same run of its benchmark."""
    bench = {n: rec.get("result") or {} for n, rec in results.get("benchmarks", {}).items()}
    rows = []
    if r := bench.get("extract"):
        frac = r.get("fraction_of_peak")
        rows.append(
            (
                "extraction",
                f"{_num(r.get('extractor_tokens_per_s'))} tok/s",
                f"HF forward {_num(r.get('hf_full_forward_tokens_per_s'))} tok/s",
                f"{_num(r.get('speedup_ratio'), 2)}x",
                "matmul peak >= 0.85",
                f"{_yes(None if frac is None else frac >= 0.85)} ({_num(frac, 2)})",
            )
        )
        tl = r.get("transformer_lens") or {}
        if "tokens_per_s" in tl:
            rows.append(
                (
                    "extraction",
                    f"{_num(r.get('extractor_tokens_per_s'))} tok/s",
                    f"TransformerLens {tl.get('version', '?')} run_with_cache "
                    f"{_num(tl['tokens_per_s'])} tok/s",
                    f"{_num(tl.get('extractor_speedup_ratio'), 2)}x",
                    "same vectors",
                    f"max abs diff {_num(tl.get('correctness_max_abs_diff_vs_extractor'), 6)}",
                )
            )
        elif tl.get("skipped"):
            rows.append(("extraction", "", "TransformerLens", "skipped", "", tl["skipped"][:80]))
    if r := bench.get("sft"):
        for model in ("av", "ar"):
            m = r.get(model) or {}
            peer = m.get("hf_trainer")
            if not peer:
                continue
            rows.append(
                (
                    f"SFT step ({model.upper()})",
                    f"{_num(m.get('tokens_per_s'), 1)} tok/s, "
                    f"loss {_num(m.get('loss_last_steps'), 3)}",
                    f"HF Trainer + PEFT {_num(peer.get('tokens_per_s'), 1)} tok/s, "
                    f"loss {_num(peer.get('loss_last_steps'), 3)}",
                    f"{_num(m.get('speed_ratio'), 2)}x",
                    ">= 1.3x at equal loss",
                    _yes(m.get("meets_target_at_equal_loss")),
                )
            )
    if r := bench.get("generation"):
        for shape, label in (("eval", "eval shape"), ("rl", "RL rollout shape")):
            sh = (r.get("shapes") or {}).get(shape)
            if sh is None:
                continue
            rows.append(
                (
                    f"generation ({label}, {sh.get('rows')} rows)",
                    f"{_num(sh['ours'].get('tokens_per_s'), 1)} tok/s",
                    f"HF generate {_num(sh['plain'].get('tokens_per_s'), 1)} tok/s",
                    f"{_num(sh.get('speedup_ratio'), 2)}x",
                    ">= 1.5x",
                    _yes(sh.get("meets_speedup_target")),
                )
            )
    if r := bench.get("sae"):
        ours, theirs = r.get("ours", {}), r.get("saelens", {})
        roof = r.get("roofline") or {}
        passed = r.get("pass") or {}
        met = None if not passed else passed.get("speed") and passed.get("explained_variance")
        rows.append(
            (
                "SAE step",
                f"{_num(ours.get('tokens_per_s'))} tok/s, "
                f"EV {_num(ours.get('explained_variance'), 3)}",
                f"SAELens {theirs.get('version', '?')} {_num(theirs.get('tokens_per_s'))} tok/s, "
                f"EV {_num(theirs.get('explained_variance'), 3)}",
                f"{_num(r.get('speed_ratio'), 2)}x",
                ">= 5x at equal EV",
                f"{_yes(met)} (roofline: ours {_num(roof.get('ours_fraction_of_roofline'), 2)}, "
                f"SAELens {_num(roof.get('saelens_fraction_of_roofline'), 2)})",
            )
        )
    return rows


def markdown_table(results: dict) -> str:
    """The headline numbers of a results.json as a Markdown table (with a line naming the
    machine), for the README."""
    m = results.get("machine", {})
    simd = "AVX-512" if m.get("avx512") else ("AVX2" if m.get("avx2") else "no AVX2")
    cores = m.get("physical_cores") or m.get("os_cpu_count")
    lines = [
        f"{m.get('cpu_model', '?')}, {cores} cores ({m.get('usable_cpus', '?')} usable, {simd}), "
        f"{m.get('ram_gb', '?')} GB RAM, torch {m.get('torch', '?')} "
        f"({m.get('torch_threads', '?')} threads), transformers {m.get('transformers', '?')}, "
        f"{str(m.get('date_utc', '?'))[:10]}, commit {str(m.get('git_commit') or '?')[:12]}",
        "",
        "| benchmark | number | value |",
        "|---|---|---|",
    ]
    for name, record in results.get("benchmarks", {}).items():
        if not record.get("ok"):
            lines.append(f"| {name} | FAILED | {record.get('error', 'failed')} |")
            continue
        quick = " (--quick)" if record.get("quick") else ""
        for bench, number, value in _headline_rows(name, record):
            lines.append(f"| {bench}{quick} | {number} | {value} |")
        peak = (record.get("result") or {}).get("peak_rss_mb")
        if peak is not None:  # every benchmark here reports it (nla_repro.platform.peak_rss_mb)
            lines.append(f"| {name}{quick} | peak RSS | {_num(peak, 0, 'MiB')} |")
        load = (record.get("loadavg_before") or [None])[0]
        lines.append(
            f"| {name}{quick} | benchmark wall time (load before) | "
            f"{_num(record.get('wall_s'), 0, 's')} ({_num(load, 2)}) |"
        )
    times = results.get("stage_times", {})
    stages = times.get("stages", {})
    # The stages ran in their own runs, maybe with another thread count than the benchmarks.
    threads = {row.get("torch_threads") for row in stages.values()} - {None}
    label = times.get("profile")
    if len(threads) == 1:
        n = threads.pop()
        label = f"{label}, {n} torch thread{'s' if n != 1 else ''}"
    for stage, row in stages.items():
        peak = row.get("peak_rss_mb")
        memory = f" ({_num(peak, 0, 'MiB')} peak RSS)" if peak is not None else ""
        lines.append(
            f"| pipeline ({label}) | {stage} stage wall time | "
            f"{_num(row.get('wall_s'), 0, 's')}{memory} |"
        )
    if stages:
        lines.append(
            f"| pipeline ({label}) | all stages | {_num(times.get('total_wall_s'), 0, 's')} |"
        )
    if peers := peer_rows(results):
        lines += [
            "",
            "Against the tool a user would pick instead (same run, same data and settings):",
            "",
            "| loop | ours | peer | ratio | target | met |",
            "|---|---|---|---|---|---|",
            *("| " + " | ".join(row) + " |" for row in peers),
        ]
    return "\n".join(lines)


# --- Main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small settings: a fast check")
    p.add_argument("--only", action="append", metavar="NAME", help="run only NAME (repeatable)")
    p.add_argument("--table", action="store_true", help="print the table of --out; run nothing")
    p.add_argument("--out", type=Path, default=RESULTS, help="results file (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per benchmark")
    p.add_argument("--bench-dir", type=Path, default=HERE, help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.table:
        if not args.out.exists():
            p.error(f"{args.out} does not exist; run the benchmarks first")
        print(markdown_table(json.loads(args.out.read_text())))
        return 0

    found = discover(args.bench_dir)
    if skipped := sorted(set(args.only or []) & set(SKIPPED)):
        p.error(f"--only: {skipped[0]} is not run from here: {SKIPPED[skipped[0]]}")
    if unknown := sorted(set(args.only or []) - set(found)):
        p.error(f"--only: unknown {unknown}; benchmarks here: {sorted(found)}")
    names = [n for n in found if not args.only or n in args.only]
    # --only adds to what an earlier run recorded instead of dropping the other benchmarks.
    previous = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    results = {
        "machine": machine_info(args.root),
        "benchmarks": dict(previous.get("benchmarks", {})),
        "stage_times": pipeline_stage_times(args.root),
        "skipped": {n: why for n, why in SKIPPED.items() if (args.bench_dir / f"{n}.py").exists()},
    }
    failed = []
    for name in names:
        extra = QUICK_ARGS.get(name, []) if args.quick else []
        print(f"run_all: {name} {' '.join(extra)}".rstrip(), file=sys.stderr, flush=True)
        record = run_benchmark(found[name], extra, args.root, args.timeout)
        record["quick"] = args.quick
        results["benchmarks"][name] = record
        status = "ok" if record["ok"] else f"FAILED ({record['error']})"
        print(f"run_all: {name}: {status} in {record['wall_s']} s", file=sys.stderr, flush=True)
        if not record["ok"]:
            failed.append(name)
            print(record["stderr_tail"][-1500:], file=sys.stderr)
        write_json(results, args.out)  # after each: a later crash keeps what finished
    write_json(results, args.out)
    print(markdown_table(results))
    if failed:
        print(f"run_all: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
