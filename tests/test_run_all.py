"""benchmarks/run_all.py without models or real benchmarks: the table, the stage-times reader,
and how a failing benchmark subprocess is recorded."""

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks/run_all.py")
run_all = importlib.util.module_from_spec(_spec)
sys.modules["run_all"] = run_all
_spec.loader.exec_module(run_all)

MACHINE = {
    "cpu_model": "AMD EPYC 9B14",
    "physical_cores": 2,
    "os_cpu_count": 2,
    "usable_cpus": 2,
    "torch_threads": 2,
    "avx2": True,
    "avx512": ["avx512bw", "avx512f"],
    "ram_gb": 23.4,
    "torch": "2.13.0+cpu",
    "transformers": "5.1.0",
    "python": "3.11.7",
    "git_commit": "0a0d4e1b2c3d4e5f",
    "date_utc": "2026-12-02T03:00:00Z",
}

# The keys each benchmark prints (benchmarks/{extract,sae,sft}.py), with earlier numbers.
RESULTS = {
    "machine": MACHINE,
    "benchmarks": {
        "extract": {
            "ok": True,
            "exit_status": 0,
            "wall_s": 95.2,
            "loadavg_before": [0.12, 0.3, 0.4],
            "quick": False,
            "result": {
                "extractor_tokens_per_s": 1101.0,
                "hf_full_forward_tokens_per_s": 578.0,
                "speedup_ratio": 1.9051,
                "flop_limit_ratio": 1.7923,
                "fraction_of_limit": 1.0629,
                "extractor_gflops": 171.0,
                "fraction_of_peak": 0.88,
                "timing": {"median_speedup_ratio": 1.87},
            },
        },
        "sae": {
            "ok": True,
            "exit_status": 0,
            "wall_s": 300.0,
            "loadavg_before": [0.5, 0.3, 0.4],
            "quick": False,
            "result": {
                "ours": {"tokens_per_s": 26900, "explained_variance": 0.749},
                "saelens": {
                    "version": "6.54.12",
                    "tokens_per_s": 7900,
                    "explained_variance": 0.742,
                },
                "speed_ratio": 3.4,
                "pass": {"speed": False, "explained_variance": True},
                "roofline": {
                    "ours_fraction_of_roofline": 0.35,
                    "saelens_fraction_of_roofline": 0.1,
                },
            },
        },
        "sft": {
            "ok": True,
            "exit_status": 0,
            "wall_s": 120.0,
            "loadavg_before": [1.0, 0.3, 0.4],
            "quick": True,
            "result": {
                "av": {"tokens_per_s": 142.0, "s_per_step": 5.2},
                "ar": {"tokens_per_s": 296.0, "s_per_step": 2.4},
                "peak_rss_mb": 4812.4,
            },
        },
    },
    "stage_times": {
        "profile": "smoke",
        "stages": {
            "base": {"wall_s": 25.4, "torch_threads": 1},
            "sae": {"wall_s": 126.0, "peak_rss_mb": 2048.4, "torch_threads": 1},
        },
        "total_wall_s": 151.4,
    },
}


def table_rows(table: str, header: str = "| benchmark |") -> list[list[str]]:
    """The body rows of the Markdown table whose header line starts with `header`."""
    rows, inside = [], False
    for line in table.splitlines():
        if line.startswith(header):
            inside = True
        elif inside and line.startswith("| "):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif inside and not line.startswith("|---"):
            inside = False
    return rows


def test_markdown_table_has_one_row_per_headline_number():
    table = run_all.markdown_table(RESULTS)
    rows = {(b, n): v for b, n, v in table_rows(table)}
    assert rows[("extract", "extractor tokens/s")] == "1,101"
    assert rows[("extract", "HF full forward tokens/s")] == "578"
    assert rows[("extract", "ratio vs HF forward (FLOP limit)")] == "1.91x (1.79x; 1.06 of it)"
    assert rows[("sae", "ours tokens/s")] == "26,900"
    assert rows[("sae", "SAELens 6.54.12 TopK tokens/s")] == "7,900"
    assert rows[("sae", "ratio vs SAELens")] == "3.40x"
    assert rows[("sae", "held-out explained variance, ours vs SAELens")] == "0.749 vs 0.742"
    # A quick run is marked as such, so its numbers are not pasted as the real ones.
    assert rows[("sft (--quick)", "AV training tokens/s (s per step)")] == "142.0 (5.20 s)"
    assert rows[("sft (--quick)", "AR training tokens/s (s per step)")] == "296.0 (2.40 s)"
    assert rows[("sft (--quick)", "peak RSS")] == "4,812 MiB"
    assert ("extract", "peak RSS") not in rows  # not reported: no row rather than "n/a"
    assert rows[("sae", "benchmark wall time (load before)")] == "300 s (0.50)"
    stage_rows = "pipeline (smoke, 1 torch thread)"  # the stages' thread count, not the benches'
    assert rows[(stage_rows, "base stage wall time")] == "25 s"
    assert rows[(stage_rows, "sae stage wall time")] == "126 s (2,048 MiB peak RSS)"
    assert rows[(stage_rows, "all stages")] == "151 s"
    assert "n/a" not in table  # every key the benchmarks print was found
    machine = table.splitlines()[0]
    assert "AMD EPYC 9B14, 2 cores" in machine and "AVX-512" in machine
    assert "torch 2.13.0+cpu" in machine and "2026-12-02" in machine and "0a0d4e1b2c3d" in machine
    # Every row has exactly three cells (a stray "|" in a value would break the Markdown).
    assert all(len(r) == 3 for r in table_rows(table))


def test_markdown_table_shows_a_failed_benchmark_and_missing_numbers():
    results = json.loads(json.dumps(RESULTS))
    results["benchmarks"]["sae"] = {"ok": False, "exit_status": 3, "error": "exit status 3"}
    del results["benchmarks"]["extract"]["result"]["hf_full_forward_tokens_per_s"]
    rows = {(b, n): v for b, n, v in table_rows(run_all.markdown_table(results))}
    assert rows[("sae", "FAILED")] == "exit status 3"
    assert not any(b == "sae" and n != "FAILED" for b, n in rows)
    assert rows[("extract", "HF full forward tokens/s")] == "n/a"


def write_lines(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def row(stage: str, profile: str, wall: float) -> dict:
    return {
        "stage": stage,
        "profile": profile,
        "started_utc": "2026-12-02T00:00:00Z",
        "wall_s": wall,
    }


def test_stage_times_latest_per_stage_of_the_profile_and_bad_lines_named(tmp_path):
    path = write_lines(
        tmp_path / "stage_times.jsonl",
        [
            row("base", "smoke", 10.0),  # 1
            row("corpus", "smoke", 20.0),  # 2
            row("corpus", "default", 99.0),  # 3: another profile
            "{not json",  # 4
            row("corpus", "smoke", 30.0),  # 5: a later run of the same stage
            {"stage": "label", "profile": "smoke"},  # 6: no wall_s
            "",  # 7: blank, ignored
            '{"stage": "extract", "profile": "smoke", "wall_s": 4',  # 8: torn by a kill
        ],
    )
    latest, problems = run_all.read_stage_times(path, "smoke")
    assert {s: r["wall_s"] for s, r in latest.items()} == {"base": 10.0, "corpus": 30.0}
    assert len(problems) == 3
    assert [p.split(":")[1] for p in problems] == ["4", "6", "8"]
    assert all(p.startswith(str(path)) for p in problems)
    assert "KeyError" in problems[1] and "wall_s" in problems[1]

    any_profile, _ = run_all.read_stage_times(path, None)
    assert any_profile["corpus"]["wall_s"] == 30.0
    default, _ = run_all.read_stage_times(path, "default")
    assert {s: r["wall_s"] for s, r in default.items()} == {"corpus": 99.0}


def test_pipeline_stage_times_uses_the_profile_in_params_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text("profile: smoke\nbase:\n  source: x\n")
    write_lines(
        tmp_path / run_all.STAGE_TIMES,
        [row("sae", "smoke", 5.0), row("base", "smoke", 1.5), row("base", "default", 100.0)],
    )
    times = run_all.pipeline_stage_times(tmp_path)
    assert times["profile"] == "smoke"
    assert list(times["stages"]) == ["base", "sae"]  # pipeline order, not file order
    assert times["total_wall_s"] == 6.5
    assert "corpus" in times["missing_stages"] and "sae" not in times["missing_stages"]
    assert times["problems"] == []


def test_missing_stage_times_file_is_reported_not_raised(tmp_path):
    latest, problems = run_all.read_stage_times(tmp_path / "none.jsonl", "smoke")
    assert latest == {} and "missing" in problems[0]


def test_parse_output_finds_the_json_object_after_other_lines():
    assert run_all.parse_output('{"a": 1}\n') == {"a": 1}
    assert run_all.parse_output('warning: x\n{\n  "a": {"b": 2}\n}\n') == {"a": {"b": 2}}
    assert run_all.parse_output("no json here\n") is None
    assert run_all.parse_output("[1, 2]\n") is None


BENCH_OK = """
import json, sys
print("log line", file=sys.stderr)
print(json.dumps({"benchmark": "ok", "args": sys.argv[1:], "tokens_per_s": 12.5}, indent=2))
"""
BENCH_FAIL = """
import sys
print("setting up", file=sys.stderr)
sys.exit("boom: models/base is missing")
"""
BENCH_NO_JSON = """
print("done, but forgot the JSON")
"""
BENCH_JSON_THEN_CRASH = """
import json, sys
print(json.dumps({"tokens_per_s": 1.0}))
sys.exit(2)
"""


@pytest.fixture
def bench_dir(tmp_path, monkeypatch):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    scripts = {
        "aok": BENCH_OK,
        "bfail": BENCH_FAIL,
        "cnojson": BENCH_NO_JSON,
        "dcrash": BENCH_JSON_THEN_CRASH,
    }
    for name, source in scripts.items():
        (bench / f"{name}.py").write_text(textwrap.dedent(source))
    (bench / "run_all.py").write_text("raise SystemExit('run_all must not run itself')\n")
    (bench / "_common.py").write_text("raise SystemExit('a shared module is no benchmark')\n")
    monkeypatch.setattr(run_all, "machine_info", lambda root: dict(MACHINE))
    return bench


def run_main(bench: Path, *extra: str) -> tuple[int, dict]:
    out = bench / "results.json"
    args = ["--bench-dir", str(bench), "--root", str(bench.parent), "--out", str(out), *extra]
    rc = run_all.main(args)
    return rc, json.loads(out.read_text())


def test_a_failing_benchmark_is_recorded_and_the_others_still_run(bench_dir, capsys):
    rc, results = run_main(bench_dir)
    assert rc == 1
    # Not run_all itself, not the shared _common module.
    assert list(results["benchmarks"]) == ["aok", "bfail", "cnojson", "dcrash"]
    ok, fail, nojson = (results["benchmarks"][n] for n in ("aok", "bfail", "cnojson"))
    assert ok["ok"] and ok["exit_status"] == 0
    assert ok["result"] == {"benchmark": "ok", "args": [], "tokens_per_s": 12.5}
    assert ok["wall_s"] >= 0 and len(ok["loadavg_before"]) == 3
    assert not fail["ok"] and fail["exit_status"] == 1 and fail["result"] is None
    assert "boom: models/base is missing" in fail["stderr_tail"]
    assert not nojson["ok"] and nojson["exit_status"] == 0
    assert nojson["error"] == "no JSON object on stdout"
    # A non-zero exit fails the benchmark even when it printed its JSON first.
    crash = results["benchmarks"]["dcrash"]
    assert not crash["ok"] and crash["exit_status"] == 2 and crash["result"] is None
    assert results["machine"]["cpu_model"] == "AMD EPYC 9B14"
    # Written atomically: no temporary file left beside it.
    assert sorted(p.name for p in bench_dir.iterdir() if "results" in p.name) == ["results.json"]
    captured = capsys.readouterr()
    assert "| bfail | FAILED | exit status 1 |" in captured.out
    assert "failed: bfail, cnojson, dcrash" in captured.err


def test_all_passing_exits_zero_quick_passes_no_args_to_unknown_benchmarks(bench_dir):
    rc, results = run_main(bench_dir, "--only", "aok", "--quick")
    assert rc == 0
    assert list(results["benchmarks"]) == ["aok"]
    assert results["benchmarks"]["aok"]["quick"] is True
    assert results["benchmarks"]["aok"]["result"]["args"] == []


def test_quick_passes_small_settings_and_only_merges_into_existing_results(bench_dir):
    (bench_dir / "sae.py").write_text(textwrap.dedent(BENCH_OK))
    run_main(bench_dir, "--only", "bfail")
    rc, results = run_main(bench_dir, "--only", "sae", "--quick")
    assert rc == 0
    assert results["benchmarks"]["sae"]["result"]["args"] == run_all.QUICK_ARGS["sae"]
    # The earlier record of the other benchmark is kept, failure and all.
    assert results["benchmarks"]["bfail"]["exit_status"] == 1


def test_only_rejects_an_unknown_benchmark(bench_dir):
    with pytest.raises(SystemExit):
        run_main(bench_dir, "--only", "nope")


def test_the_lever_sweep_is_skipped_and_recorded_as_such(bench_dir):
    # It would rewrite benchmarks/levers.json, a dep of the card stage.
    (bench_dir / "levers.py").write_text("raise SystemExit('levers must not run')\n")
    rc, results = run_main(bench_dir, "--only", "aok")
    assert rc == 0 and "levers" not in results["benchmarks"]
    assert "levers.json" in results["skipped"]["levers"]
    assert "levers" not in run_all.discover(bench_dir)
    with pytest.raises(SystemExit):
        run_main(bench_dir, "--only", "levers")


def test_table_prints_an_existing_results_file_without_running(bench_dir, monkeypatch, capsys):
    out = bench_dir / "results.json"
    out.write_text(json.dumps(RESULTS))

    def no_run(*args, **kwargs):
        raise AssertionError("--table must not run benchmarks")

    monkeypatch.setattr(run_all, "run_benchmark", no_run)
    assert run_all.main(["--table", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == run_all.markdown_table(RESULTS)


def test_peers_side_by_side_with_their_targets():
    results = json.loads(json.dumps(RESULTS))
    bench = results["benchmarks"]
    bench["extract"]["result"]["transformer_lens"] = {
        "version": "2.16.1",
        "tokens_per_s": 410.0,
        "extractor_speedup_ratio": 2.6854,
        "correctness_max_abs_diff_vs_extractor": 3.1e-05,
    }
    bench["sft"]["result"]["av"] |= {
        "loss_last_steps": 3.267,
        "speed_ratio": 1.044,
        "meets_target_at_equal_loss": False,
        "hf_trainer": {"tokens_per_s": 145.5, "loss_last_steps": 3.2705},
    }
    shape = {
        "rows": 48,
        "ours": {"tokens_per_s": 110.2},
        "plain": {"tokens_per_s": 63.5},
        "speedup_ratio": 1.7354,
        "meets_speedup_target": True,
    }
    bench["generation"] = {"ok": True, "result": {"shapes": {"eval": shape}}}
    table = run_all.markdown_table(results)
    rows = {r[0] + " / " + r[2].split(" ")[0]: r for r in table_rows(table, "| loop |")}
    assert all(len(r) == 6 for r in rows.values())
    assert rows["extraction / HF"][3:] == ["1.91x", "matmul peak >= 0.85", "yes (0.88)"]
    assert rows["extraction / TransformerLens"][2:4] == [
        "TransformerLens 2.16.1 run_with_cache 410 tok/s",
        "2.69x",
    ]
    av = rows["SFT step (AV) / HF"]
    assert av[1] == "142.0 tok/s, loss 3.267" and av[3:] == ["1.04x", ">= 1.3x at equal loss", "NO"]
    assert "SFT step (AR) / HF" not in rows  # no peer measured: no row
    assert rows["generation (eval shape, 48 rows) / HF"][3:] == ["1.74x", ">= 1.5x", "yes"]
    sae = rows["SAE step / SAELens"]
    assert sae[3] == "3.40x" and sae[5] == "NO (roofline: ours 0.35, SAELens 0.10)"
    # The headline table above it still parses on its own.
    assert all(len(r) == 3 for r in table_rows(table))


def test_every_script_run_all_finds_in_benchmarks_is_a_benchmark_it_has_rows_for():
    # A helper script in benchmarks/ (tolerances.py prints Markdown, not JSON) must be listed
    # in SKIPPED, or `run_all` runs it and fails on it.
    found = set(run_all.discover(ROOT / "benchmarks"))
    assert found == {"extract", "generation", "rl", "sae", "sft"}
    assert {"levers", "rl_levers", "tolerances"} <= set(run_all.SKIPPED)
