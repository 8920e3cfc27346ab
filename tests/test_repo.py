"""The repository's own promises: README commands, CI, DVC setup, stage wiring, tasks."""

import configparser
import json
import re
from pathlib import Path

import pytest
import yaml
from invoke import Exit, MockContext, Result

import tasks
from nla_repro import config as C
from nla_repro.__main__ import STAGES

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_starts_with_the_two_newcomer_commands():
    run_main, run_tests = readme_commands()
    assert run_main == f"{tasks.INSTALL} && dvc repro"
    assert run_tests == f"{tasks.INSTALL} && python3 -m pytest"


def test_ci_runs_exactly_the_readme_test_command_and_handles_exit_5():
    ci = (ROOT / ".ci/run").read_text()
    assert readme_commands()[1] in ci.splitlines()
    assert '"$rc" -eq 5' in ci


def test_gitattributes_forces_lf():
    assert "* text=auto eol=lf" in (ROOT / ".gitattributes").read_text().splitlines()


def test_dvc_has_analytics_off_and_a_relative_default_remote():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc/config")
    assert cfg["core"]["analytics"] == "false"
    url = cfg[f"'remote \"{cfg['core']['remote']}\"'"]["url"]
    assert not Path(url).is_absolute() and "://" not in url
    assert "/.dvc-remote/" in (ROOT / ".gitignore").read_text()


def test_dvc_stages_call_the_cli_and_name_the_configured_paths():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES)
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m nla_repro {name}"
        assert f"src/nla_repro/stages/{name}.py" in stage["deps"]
        for dep in stage["deps"]:
            assert (ROOT / dep).exists() or dep.startswith(("data/", "models/", "plots/")), dep
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s["outs"]}
    expected = {
        C.BASE_DIR,
        C.CORPUS_PATH,
        C.CORPUS_STATS_PATH,
        C.ACTIVATIONS_PATH,
        C.ACTIVATIONS_META,
        C.POOL_STATS_PATH,
        C.LABELS_PATH,
        C.LABEL_CHUNKS_DIR,
        C.AV_DIR,
        C.AR_DIR,
        C.RL_DIR,
        C.EVAL_DIR,
        C.EVAL_PLOTS,
        C.SAE_DIR,
        C.SAE_PLOTS,
        C.CARDS_DIR,
        C.CALIBRATION_PATH,
    }
    assert outs == {str(p) for p in expected}
    assert C.EVAL_ROWS.parent == C.EVAL_DIR
    metrics = {next(iter(m)) for s in stages.values() for m in s.get("metrics", [])}
    sft = (str(p) for p in C.SFT_METRICS.values())
    assert metrics == {
        str(C.LABEL_METRICS_PATH),
        *sft,
        str(C.RL_METRICS),
        str(C.EVAL_METRICS),
        str(C.SAE_METRICS),
    }


def test_dvc_plots_name_the_curves_the_trainer_and_eval_write():
    from nla_repro.plots import CSV_NAMES, PNG_NAMES, SAE_CSV_NAMES, SAE_PNG_NAMES

    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    files = {next(iter(p)) for p in plots}
    assert files == {
        *(
            f"{d}/{c}.csv"
            for d in (C.AV_DIR, C.AR_DIR, C.RL_DIR)
            for c in ("train_curve", "val_curve")
        ),
        f"{C.EVAL_PLOTS}/rl_vs_sft.csv",
        f"{C.EVAL_PLOTS}/rl_vs_sft.png",
        *(f"{C.EVAL_PLOTS}/{name}.csv" for name in CSV_NAMES),
        *(f"{C.EVAL_PLOTS}/{name}.png" for name in PNG_NAMES),
        f"{C.SAE_DIR}/train_curve.csv",
        *(f"{C.SAE_PLOTS}/{name}.csv" for name in SAE_CSV_NAMES),
        *(f"{C.SAE_PLOTS}/{name}.png" for name in SAE_PNG_NAMES),
    }


def test_dvc_params_keys_exist_in_params():
    params = C.params_to_dict(C.Params())
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for key in stage["params"]:
            node = params
            for part in key.split("."):
                assert part in node, f"dvc.yaml names unknown param {key}"
                node = node[part]


def test_repro_task_applies_the_profile_then_runs_dvc():
    ctx = MockContext(
        run={
            "python -m nla_repro profile smoke": Result(),
            "dvc repro --force extract": Result(),
        }
    )
    tasks.repro(ctx, profile="smoke", stage="extract", force=True)
    assert [c.args[0] for c in ctx.run.call_args_list] == [
        "python -m nla_repro profile smoke",
        "dvc repro --force extract",
    ]


def test_test_task_passes_filters():
    ctx = MockContext(run={"python3 -m pytest -k 'config and not x' -m 'not slow'": Result()})
    tasks.test(ctx, k="config and not x", fast=True)  # MockContext raises on any other command
    assert ctx.run.call_count == 1


def test_tasks_quote_what_they_pass_to_the_shell():
    hostile = "smoke; touch /tmp/pwned"
    ctx = MockContext(
        run={
            "python -m nla_repro profile 'smoke; touch /tmp/pwned'": Result(),
            "dvc repro 'eval $(id)'": Result(),
        }
    )
    tasks.repro(ctx, profile=hostile, stage="eval $(id)")
    assert ctx.run.call_count == 2
    ctx = MockContext(run={"python -m nla_repro verify --against 'v1 && id'": Result()})
    tasks.verify(ctx, against="v1 && id")
    assert ctx.run.call_count == 1


def test_deterministic_repro_pins_the_recorded_thread_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ctx = MockContext(run={"dvc repro": Result()})
    with pytest.raises(Exit, match=r"build\.json not found"):
        tasks.repro(ctx, deterministic=True)
    (tmp_path / "metrics").mkdir()
    record = {"stages": {"base": {"torch_threads": 1}, "eval": {"torch_threads": 1}}}
    (tmp_path / "metrics/build.json").write_text(json.dumps(record))
    tasks.repro(ctx, deterministic=True)
    assert ctx.run.call_args.kwargs["env"] == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    record["stages"]["eval"]["torch_threads"] = 2  # no one count to pin: refuse, say which
    (tmp_path / "metrics/build.json").write_text(json.dumps(record))
    with pytest.raises(Exit, match=r"thread counts \{1, 2\}"):
        tasks.repro(ctx, deterministic=True)


def test_each_stage_declares_exactly_its_import_closure_as_code_deps():
    """dvc.yaml is the one place a stage's code deps are declared (the stages hash what it
    names): it must name every package module the stage imports, at any depth, and nothing
    else, so a change to imported code always reruns the stage."""
    from nla_repro.pipeline import NOT_OUTPUT_CODE, import_closure, stage_spec

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in stages:
        declared = {f for f in stage_spec(name).code if f.endswith(".py")}
        imported = import_closure(f"nla_repro.stages.{name}") - NOT_OUTPUT_CODE
        assert declared == imported, (
            f"{name}: missing {sorted(imported - declared)}, extra {sorted(declared - imported)}"
        )


def test_every_declared_data_file_of_the_package_exists():
    from nla_repro.pipeline import PACKAGE, stage_spec

    for name in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]:
        for f in stage_spec(name).code:
            assert (PACKAGE / f).is_file(), f"dvc.yaml {name}: src/nla_repro/{f} does not exist"


def test_long_modules_say_why_at_their_top():
    """A module over ~500 lines states its reason in its docstring."""
    import ast

    for path in sorted((ROOT / "src/nla_repro").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 500:
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert "Why one module of this size" in doc, path.relative_to(ROOT)


def test_eval_stage_knows_no_concrete_backend():
    """The eval stage asks the judge through the backend interface only."""
    import ast

    from nla_repro import labeling

    concrete = {
        name for name in labeling.__all__ if name.endswith("Backend") and name not in ("Backend",)
    }
    tree = ast.parse((ROOT / "src/nla_repro/stages/eval.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not names & concrete
    assert "isinstance" not in names and "object.__new__" not in ast.unparse(tree)
