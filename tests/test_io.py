import numpy as np
import pyarrow as pa
import pytest
from conftest import git as git_in

from nla_repro.io import (
    ChunkStore,
    atomic_path,
    code_commit,
    fingerprint,
    sha256_file,
    vectors_from_table,
    vectors_to_arrow,
    write_json,
)


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_files_and_directories(tmp_path):
    write_json({"a": 1}, tmp_path / "x.json")
    write_json({"a": 2}, tmp_path / "x.json")
    assert (tmp_path / "x.json").read_text().strip().endswith("}")
    assert '"a": 2' in (tmp_path / "x.json").read_text()
    model_dir = tmp_path / "models" / "base"
    for generation in ("old", "new"):
        with atomic_path(model_dir) as tmp:
            tmp.mkdir()
            (tmp / f"{generation}.txt").write_text(generation)
    assert [p.name for p in model_dir.iterdir()] == ["new.txt"]
    assert [p.name for p in model_dir.parent.iterdir()] == ["base"]  # no temp dirs left


def test_vectors_round_trip_through_arrow():
    vectors = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    table = pa.table({"vector": vectors_to_arrow(vectors)})
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 7)
    np.testing.assert_array_equal(vectors_from_table(table), vectors)
    with pytest.raises(TypeError, match="not a fixed-size list"):
        vectors_from_table(pa.table({"vector": [[1.0], [2.0]]}))


def test_chunk_store_resumes_and_drops_stale_fingerprints(tmp_path):
    store = ChunkStore(tmp_path / "extract", fingerprint("inputs-v1"))
    store.write(0, pa.table({"x": [1, 2]}))
    store.write(1, pa.table({"x": [3]}))
    again = ChunkStore(tmp_path / "extract", fingerprint("inputs-v1"))
    assert again.done(0) and again.done(1) and not again.done(2)
    assert again.read(range(2)).column("x").to_pylist() == [1, 2, 3]
    changed = ChunkStore(tmp_path / "extract", fingerprint("inputs-v2"))
    assert not changed.done(0)
    assert [p.name for p in (tmp_path / "extract").iterdir()] == [changed.dir.name]
    changed.clear()
    assert not (tmp_path / "extract").exists()


def test_fingerprint_and_sha256(tmp_path):
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    (tmp_path / "f").write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(tmp_path / "f") == expected


def test_code_commit_follows_the_code_not_results_commits(tmp_path):
    def git(*args: str) -> str:
        return git_in(tmp_path, *args)

    git("init", "-q")
    (tmp_path / "README.md").write_text("results\n")
    git("add", "-A")
    git("commit", "-qm", "no code yet")
    assert code_commit(tmp_path) == git("rev-parse", "HEAD")  # no code commit: HEAD
    (tmp_path / "src").mkdir()
    (tmp_path / "src/stage.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-qm", "code")
    code = git("rev-parse", "HEAD")
    (tmp_path / "dvc.lock").write_text("hashes\n")
    git("add", "-A")
    git("commit", "-qm", "record results")
    assert git("rev-parse", "HEAD") != code and code_commit(tmp_path) == code
    (tmp_path / "dvc.lock").write_text("other hashes\n")  # results edits are not code edits
    assert code_commit(tmp_path) == code
    (tmp_path / "src/nla_repro").mkdir()
    (tmp_path / "src/nla_repro/__main__.py").write_text("print()\n")  # the CLI: not output code
    git("add", "-A")
    git("commit", "-qm", "cli")
    assert code_commit(tmp_path) == code
    (tmp_path / "src/nla_repro/__main__.py").write_text("print(1)\n")
    assert code_commit(tmp_path) == code  # nor dirty
    (tmp_path / "src/stage.py").write_text("x = 2\n")
    assert code_commit(tmp_path) == code + "-dirty"
    assert code_commit(tmp_path / "src").startswith(code)  # from inside the repo too
    outside = tmp_path.parent / f"{tmp_path.name}-not-a-repo"
    outside.mkdir()
    assert code_commit(outside) is None


def test_code_commit_follows_the_code_deps_dvc_yaml_declares(tmp_path):
    def git(*args: str) -> str:
        return git_in(tmp_path, *args)

    git("init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "src/stage.py").write_text("x = 1\n")
    (tmp_path / "src/release.py").write_text("y = 1\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: run\n    deps:\n    - src/stage.py\n"
    )
    git("add", "-A")
    git("commit", "-qm", "code")
    code = git("rev-parse", "HEAD")
    (tmp_path / "src/release.py").write_text("y = 2\n")  # no stage runs it
    git("commit", "-qam", "release code")
    assert code_commit(tmp_path) == code
    (tmp_path / "src/stage.py").write_text("x = 2\n")
    git("commit", "-qam", "stage code")
    assert code_commit(tmp_path) == git("rev-parse", "HEAD")
