"""The hostile-input corpus: every bad input a user can hand the CLI gives a non-zero exit, one
message naming the file, column and rows (or the param key), no traceback, no partial output,
and leaves the previous outputs intact (or restorable with `python -m nla_repro restore`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tree_sha256, write_corpus
from test_sft import build_inputs, sft_params

from nla_repro import config as C
from nla_repro.__main__ import main
from nla_repro.errors import NlaError
from nla_repro.io import vectors_to_arrow, write_json

ROOT = Path(__file__).resolve().parents[1]


def cli(args: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in-process; an uncaught exception (a traceback) fails the test."""
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


# --- Params: each a params.yaml edit, checked by `check-params` ------------------------------

DEFAULT = C.dump_params(C.materialize_profile("default"))


def edit(old: str, new: str) -> str:
    assert old in DEFAULT, old
    return DEFAULT.replace(old, new, 1)


def set_param(section: str, key: str, value: str) -> str:
    """The default params with `section.key` set to the YAML text `value`."""
    at = DEFAULT.index(f"\n{section}:\n")
    line = next(
        ln for ln in DEFAULT[at:].splitlines() if ln.startswith(f"  {key}:")
    )  # the first `key` of that section
    start = DEFAULT.index(line, at)
    return DEFAULT[:start] + f"  {key}: {value}" + DEFAULT[start + len(line) :]


PARAM_CASES = {
    "ar.lr .inf": (lambda: set_param("ar", "lr", ".inf"), ["ar.lr", "finite"]),
    "ar.lr .nan": (lambda: set_param("ar", "lr", ".nan"), ["ar.lr", "finite"]),
    "ar.max_grad_norm .nan": (
        lambda: set_param("ar", "max_grad_norm", ".nan"),
        ["ar.max_grad_norm", "finite"],
    ),
    "sae.lr -.inf": (lambda: set_param("sae", "lr", "-.inf"), ["sae.lr", "finite"]),
    "duplicated ar section": (
        lambda: DEFAULT + "ar:\n  lr: 0.1\n",
        ["key 'ar' appears twice", "lines 1"],
    ),
    "empty params file": (lambda: "", ["params.yaml", "empty"]),
    "card.org path traversal": (
        lambda: edit("  org: nla-repro", "  org: ../../etc"),
        ["card.org", "'../../etc'"],
    ),
    "card.org shell metacharacters": (
        lambda: edit("  org: nla-repro", "  org: a b/c;$(id)"),
        ["card.org", "not a valid"],
    ),
}


@pytest.mark.parametrize("case", sorted(PARAM_CASES))
def test_bad_params_are_refused_with_the_key(case, in_tmp, capsys):
    text, expected = PARAM_CASES[case]
    (in_tmp / "params.yaml").write_text(text())
    before = (in_tmp / "params.yaml").read_bytes()
    rc, out = cli(["check-params", "--params", "params.yaml"], capsys)
    assert rc == 2, out
    for part in expected:
        assert part in out, (case, out)
    assert (in_tmp / "params.yaml").read_bytes() == before  # never rewritten


def test_a_params_path_that_is_a_folder_is_refused(in_tmp, capsys):
    (in_tmp / "params.yaml").mkdir()
    rc, out = cli(["check-params", "--params", "params.yaml"], capsys)
    assert rc == 2 and "params.yaml: not a file" in out


# --- Data: each a broken stage file, checked by `validate` -----------------------------------


def activations_table(n: int = 4, d: int = 8, **columns) -> pa.Table:
    vectors = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    data = {
        "doc_id": [f"d{i}" for i in range(n)],
        "split": ["train"] * n,
        "position": pa.array([3] * n, pa.int32()),
        "token_id": pa.array([5] * n, pa.int64()),
        "token": ["x"] * n,
        "n_tokens": pa.array([4] * n, pa.int32()),
        "layer": pa.array([2] * n, pa.int32()),
        "norm": pa.array(np.linalg.norm(vectors, axis=1), pa.float32()),
        "vector": vectors_to_arrow(vectors),
    }
    return pa.table(data | columns)


def with_vectors(vectors: np.ndarray, norms: np.ndarray | None = None) -> pa.Table:
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1) if norms is None else norms
    return activations_table(
        len(vectors),
        vectors.shape[1],
        vector=vectors_to_arrow(vectors),
        norm=pa.array(norms, pa.float32()),
    )


def int64_positions_claiming_int32() -> pa.Table:
    """A table whose pandas metadata disagrees with its Arrow types: reading it through the
    metadata would cast the column back silently."""
    table = activations_table(position=pa.array([3] * 4, pa.int64()))
    meta = {
        "index_columns": [],
        "columns": [
            {
                "name": "position",
                "field_name": "position",
                "pandas_type": "int32",
                "numpy_type": "int32",
                "metadata": None,
            }
        ],
    }
    return table.replace_schema_metadata({b"pandas": json.dumps(meta).encode()})


def corpus_table(texts: list, **columns) -> pa.Table:
    n = len(texts)
    data = {
        "doc_id": [f"t-{i:04d}" for i in range(n)],
        "source_family": ["test"] * n,
        "text": texts,
        "split": ["train"] * n,
    }
    return pa.table(data | columns)


def bad_utf8_corpus(path: Path) -> None:
    pq.write_table(corpus_table(["a fine text", "another text"]), path)
    raw = path.read_bytes()
    at = raw.index(b"another text")
    path.write_bytes(raw[:at] + b"\xff\xfe" + raw[at + 2 :])  # same length: still a parquet


DATA_CASES = {
    "activations: norm column disagrees with the vector": (
        "data/activations.parquet",
        lambda p: pq.write_table(with_vectors(np.ones((4, 8), np.float32), norms=np.ones(4)), p),
        ["norm differs from the vector's L2 norm", "row(s) 0, 1, 2, 3"],
    ),
    "activations: vectors of magnitude 1e30": (
        "data/activations.parquet",
        lambda p: pq.write_table(with_vectors(np.full((3, 8), 1e30, np.float32)), p),
        ["column 'norm'", "row(s) 0, 1, 2"],
    ),
    "activations: NaN in a vector": (
        "data/activations.parquet",
        lambda p: pq.write_table(
            with_vectors(np.where(np.eye(3, 8) > 0, np.nan, 1.0).astype(np.float32), np.ones(3)), p
        ),
        ["column 'vector'", "NaN or inf at row(s) 0, 1, 2"],
    ),
    "activations: n_tokens differs within a document": (
        "data/activations.parquet",
        lambda p: pq.write_table(
            activations_table(
                doc_id=["d0", "d0", "d1", "d2"],
                position=pa.array([1, 3, 3, 3], pa.int32()),
                n_tokens=pa.array([4, 5, 4, 4], pa.int32()),
            ),
            p,
        ),
        ["n_tokens", "row(s) 0, 1"],
    ),
    "activations: float64 vectors": (
        "data/activations.parquet",
        lambda p: pq.write_table(
            activations_table(
                vector=pa.FixedSizeListArray.from_arrays(pa.array(np.ones(32, "f8")), 8)
            ),
            p,
        ),
        ["column 'vector'", "not a float32 array"],
    ),
    "activations: layer stored as a string": (
        "data/activations.parquet",
        lambda p: pq.write_table(activations_table(layer=pa.array(["2"] * 4)), p),
        ["column 'layer'", "string"],
    ),
    "corpus: invalid UTF-8 in text": (
        "data/corpus.parquet",
        bad_utf8_corpus,
        ["column 'text'", "not valid UTF-8 at row(s) 1"],
    ),
    "corpus: no rows": (
        "data/corpus.parquet",
        lambda p: pq.write_table(corpus_table([]).cast(corpus_table(["x"]).schema), p),
        ["corpus.parquet", "has no rows"],
    ),
    "corpus: not a parquet file": (
        "data/corpus.parquet",
        lambda p: p.write_bytes(b"doc_id,text\nd1,hello\n"),
        ["corpus.parquet", "not a readable parquet"],
    ),
    "corpus: split as integers": (
        "data/corpus.parquet",
        lambda p: pq.write_table(corpus_table(["a", "b"], split=pa.array([1, 2])), p),
        ["column 'split'", "row(s) 0, 1"],
    ),
    "activations: pandas metadata says int32, Arrow holds int64": (
        "data/activations.parquet",
        lambda p: pq.write_table(int64_positions_claiming_int32(), p),
        ["column 'position': stored as int64, expected int32"],
    ),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_stage_files_name_file_column_and_rows(case, in_tmp, capsys):
    name, write, expected = DATA_CASES[case]
    path = in_tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    before = path.read_bytes()
    rc, out = cli(["validate", str(path), "--d-model", "8"], capsys)
    assert rc == 2, out
    assert str(path) in out, out
    for part in expected:
        assert part in out, (case, out)
    assert path.read_bytes() == before


def test_a_frame_level_check_is_reported_once(in_tmp, capsys):
    path = in_tmp / "data/activations.parquet"
    path.parent.mkdir()
    pq.write_table(with_vectors(np.ones((4, 8), np.float32), norms=np.ones(4)), path)
    rc, out = cli(["validate", str(path), "--d-model", "8"], capsys)
    assert rc == 2 and out.count("norm differs from the vector's L2 norm") == 1, out


# --- Stages on bad inputs: the tiny pipeline of test_sft -------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The tiny pipeline's inputs (test_sft's), built once for this module."""
    root = tmp_path_factory.mktemp("bad_inputs")
    build_inputs(root)
    return root


@pytest.fixture
def repo(inputs, tmp_path, monkeypatch) -> Path:
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(inputs, root)
    monkeypatch.chdir(root)
    return root


def run_stage(stage: str, params: C.Params, capsys) -> tuple[int, str]:
    Path("params.yaml").write_text(C.dump_params(params))
    return cli([stage], capsys)


def rewrite_activations(edit) -> None:
    table = pq.read_table(C.ACTIVATIONS_PATH)
    pq.write_table(edit(table), C.ACTIVATIONS_PATH)


def test_activations_of_another_layer_are_refused_before_training(repo, capsys):
    rewrite_activations(
        lambda t: t.set_column(
            t.schema.get_field_index("layer"), "layer", pa.array([5] * len(t), pa.int32())
        )
    )
    rc, out = run_stage("sft_av", sft_params(), capsys)
    assert rc == 2
    assert "activations.parquet: column 'layer' is [5]" in out and "row(s) 0, 1" in out
    assert "params extract.layer is 2" in out
    assert not C.AV_DIR.exists()  # nothing started, nothing partial


def test_two_rows_at_a_documents_last_token_are_refused(repo, capsys):
    def duplicate_first(t: pa.Table) -> pa.Table:
        return pa.concat_tables([t, t.slice(0, 1)])

    rewrite_activations(duplicate_first)
    rc, out = run_stage("sft_ar", sft_params(), capsys)
    assert rc == 2 and "MergeError" not in out
    assert "activations.parquet" in out and "multiple_fields_uniqueness at row(s) 0, 24" in out, out
    assert not C.AR_DIR.exists()


@pytest.mark.parametrize("stage", ["extract", "label"])
def test_an_empty_corpus_stops_extract_and_label(repo, stage, capsys):
    before = tree_sha256(repo / "data")
    pq.write_table(corpus_table([]).cast(corpus_table(["x"]).schema), C.CORPUS_PATH)
    rc, out = run_stage(stage, sft_params(), capsys)
    assert rc == 2 and "corpus.parquet" in out and "has no rows" in out, out
    after = tree_sha256(repo / "data")
    del (
        before[str(C.CORPUS_PATH.relative_to("data"))],
        after[str(C.CORPUS_PATH.relative_to("data"))],
    )
    assert after == before  # activations and labels of the last good run untouched


def test_a_diverging_learning_rate_stops_training_before_a_nan_is_published(repo, capsys):
    # 1e30 is a finite lr, so params validation passes: the trainer itself must stop.
    params = sft_params(ar={"lr": 1e30, "max_steps": 4, "save_interval": 1})
    rc, out = run_stage("sft_ar", params, capsys)
    assert rc == 2, out
    assert "ar: optimizer step 1: loss is nan" in out, out
    assert "Training stopped; nothing was published" in out
    assert not (C.AR_DIR / "head.safetensors").exists()
    assert not C.SFT_METRICS["ar"].exists()
    from safetensors.torch import load_file

    for ckpt in (C.AR_DIR / "checkpoints").glob("step_*/*.safetensors"):
        for name, tensor in load_file(ckpt).items():
            assert tensor.isfinite().all(), (ckpt, name)


def test_write_json_refuses_nan_and_keeps_the_previous_file(in_tmp):
    path = in_tmp / "metrics.json"
    write_json({"loss": 1.0}, path)
    with pytest.raises(NlaError, match=r"val\.loss is not a finite number"):
        write_json({"val": {"loss": float("nan")}}, path)
    assert json.loads(path.read_text()) == {"loss": 1.0}
    assert [p.name for p in in_tmp.iterdir()] == ["metrics.json"]  # no temp file left


# --- Release -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--org", "../../etc"], "--org: '../../etc' is not a valid Hub user/org name"),
        (["--org", "a b/c;$(id)"], "--org: 'a b/c;$(id)' is not a valid"),
        (["--version", "v0.1.00\n"], "version 'v0.1.00\\n' is not of the form"),
    ],
)
def test_release_refuses_bad_org_and_version(args, expected, in_tmp, capsys):
    from conftest import write_finished_pipeline

    write_finished_pipeline(in_tmp)
    (in_tmp / "params.yaml").write_text(DEFAULT)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=in_tmp, check=True)
    subprocess.run([*git, "add", "-A"], cwd=in_tmp, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=in_tmp, check=True)
    argv = ["release", "--version", "v0.1.00", *args]
    rc, out = cli(argv, capsys)
    assert rc == 2 and expected in out, out
    assert not (in_tmp / C.DIST_DIR).exists()


# --- Processes ---------------------------------------------------------------------------------


def test_a_stage_refuses_to_run_beside_a_live_owner(in_tmp, capsys):
    from nla_repro.platform import _process_start

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = in_tmp / ".nla_work/locks/card.lock"
        lock.parent.mkdir(parents=True)
        owner = {
            "pid": sleeper.pid,
            "started": _process_start(sleeper.pid),
            "host": __import__("platform").node(),
            "argv": ["python", "-m", "nla_repro", "card"],
            "since_utc": "2026-12-04T00:00:00Z",
        }
        lock.write_text(json.dumps(owner))
        (in_tmp / "params.yaml").write_text(DEFAULT)
        rc, out = cli(["card"], capsys)
        assert rc == 2
        assert f"stage card is already running: process {sleeper.pid}" in out
        assert f"python -m nla_repro kill {sleeper.pid}" in out
        assert json.loads(lock.read_text())["pid"] == sleeper.pid  # the owner's lock stays
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_or_torn_lock_is_taken_over(in_tmp, caplog):
    from nla_repro.platform import stage_lock

    lock = in_tmp / "locks/sae.lock"
    lock.parent.mkdir()
    lock.write_text('{"pid": 999999, "started": 1.0, "host": "' + os.uname().nodename + '"}')
    with stage_lock("sae", lock.parent) as held:
        assert json.loads(held.read_text())["pid"] == os.getpid()
    assert "taking over its stale lock" in caplog.text and not lock.exists()
    lock.write_text('{"pid": 12')  # torn by a kill mid-write
    with stage_lock("sae", lock.parent):
        pass
    assert not lock.exists()


def test_a_stage_ends_when_the_process_that_started_it_dies(tmp_path):
    """`dvc repro` killed with SIGKILL: its stage must not run on, re-parented to init."""
    child = (
        "import os, sys, time\n"
        "from nla_repro import platform\n"
        "platform.raise_on_sigterm()\n"
        "assert platform.exit_with_parent(0.1)\n"
        f"open({str(tmp_path / 'started')!r}, 'w').write(str(os.getpid()))\n"
        "try:\n"
        "    time.sleep(60)\n"
        "except platform.StageInterrupted as err:\n"
        f"    open({str(tmp_path / 'stopped')!r}, 'w').write(str(err))\n"
    )
    parent = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}])\n"
        "time.sleep(60)\n"
    )
    env = os.environ | {"NLA_EXIT_WITH_PARENT": "1"}
    proc = subprocess.Popen([sys.executable, "-c", parent], env=env)
    try:
        for _ in range(300):
            if (tmp_path / "started").exists():
                break
            import time

            time.sleep(0.05)
        assert (tmp_path / "started").exists()
    finally:
        proc.kill()
        proc.wait()
    import time

    for _ in range(200):
        if (tmp_path / "stopped").exists():
            break
        time.sleep(0.05)
    assert "stopped by SIGTERM" in (tmp_path / "stopped").read_text()


def test_restore_puts_back_uncached_outputs_a_failed_rerun_deleted(tmp_path, monkeypatch, capsys):
    import shutil

    from nla_repro import pipeline

    root = tmp_path / "checkout"
    root.mkdir()
    shutil.copy2(ROOT / "dvc.yaml", root / "dvc.yaml")
    monkeypatch.chdir(root)
    write_corpus(root)
    Path("data/corpus_stats.json").write_text('{"n_docs": 8}\n')
    assert pipeline.keep_last_good("corpus") == ["data/corpus_stats.json"]
    Path("data/corpus_stats.json").unlink()  # what DVC does before a rerun that then fails
    rc, out = cli(["restore", "corpus"], capsys)
    assert rc == 0 and "restored data/corpus_stats.json from .nla_work/last_good" in out
    assert Path("data/corpus_stats.json").read_text() == '{"n_docs": 8}\n'
    rc, out = cli(["restore", "corpus"], capsys)
    assert rc == 0 and "nothing to restore" in out
    Path("metrics").mkdir()
    rc, out = cli(["restore", "label"], capsys)  # never run here, not in git: say so, exit 1
    assert rc == 1 and "metrics/label.json from nowhere" in out


def test_cli_errors_print_one_line_and_no_traceback(in_tmp):
    (in_tmp / "params.yaml").write_text(set_param("ar", "lr", ".inf"))
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "nla_repro", "check-params"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: ")
    assert "ar.lr" in done.stderr
