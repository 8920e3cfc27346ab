from pathlib import Path

import pytest
import yaml

from nla_repro import config as C
from nla_repro.__main__ import main
from nla_repro.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def default_dict() -> dict:
    return C.params_to_dict(C.Params())


def test_committed_params_yaml_is_the_default_profile():
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == default_dict()


def test_every_profile_materializes_and_round_trips():
    for name in C.profile_names():
        params = C.materialize_profile(name)
        assert params.profile == name
        again = C.params_from_dict(yaml.safe_load(C.dump_params(params)))
        assert again == params


def test_smoke_profile_is_smaller_than_default():
    smoke, default = C.materialize_profile("smoke"), C.Params()
    assert smoke.corpus.docs_per_family < default.corpus.docs_per_family
    assert smoke.corpus.pydoc_docs < default.corpus.pydoc_docs
    assert smoke.av.max_steps < default.av.max_steps and smoke.ar.max_steps < default.ar.max_steps
    assert smoke.sae.tokens < default.sae.tokens
    assert smoke.extract.layer == default.extract.layer == 20


def test_gemma_profile_is_the_published_recipe():
    p = C.materialize_profile("gemma-4-e2b-v0.1.dd")
    assert (p.base.source, p.base.repo_id) == ("hf", "google/gemma-4-E2B")
    assert (p.base.quantization, p.base.compute_dtype) == ("nf4", "bfloat16")
    assert p.extract.layer == 23


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["extract"].update(layre=3), "extract: unknown key(s) ['layre']"),
        (lambda d: d.update(extra={}), "unknown key(s) ['extra']"),
        (lambda d: d["extract"].update(layer="20"), "extract.layer: expected int, got '20'"),
        (lambda d: d["extract"].update(layer=True), "extract.layer: expected int"),
        (lambda d: d["extract"].update(layer=-1), "extract.layer: must be >= 0"),
        (lambda d: d["extract"].update(positions="first"), "extract.positions: expected one of"),
        (lambda d: d["extract"].update(batch_size=0), "extract.batch_size: must be > 0"),
        (lambda d: d["corpus"].update(families=["news", "poetry"]), "unknown ['poetry']"),
        (lambda d: d["corpus"].update(hf_dataset="x/y"), "hf_dataset needs hf_revision"),
        (lambda d: d["base"].update(source="hf"), "needs repo_id and a pinned revision"),
        (lambda d: d["base"].update(device="tpu"), "base.device"),
        (lambda d: d["base"].update(quantization="int8"), "base.quantization: expected one of"),
        (lambda d: d.update(corpus=[1, 2]), "corpus: expected a mapping"),
    ],
)
def test_bad_params_name_the_key(mutate, message):
    data = default_dict()
    mutate(data)
    with pytest.raises(ConfigError) as err:
        C.params_from_dict(data, "params.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("params.yaml: ")


def test_float_fields_accept_ints_and_become_floats():
    data = default_dict()
    data["corpus"]["temperature"] = 1
    params = C.params_from_dict(data)
    assert params.corpus.temperature == 1.0 and isinstance(params.corpus.temperature, float)


def test_layer_range_is_checked_against_the_model():
    cfg = C.ExtractConfig(layer=30)
    with pytest.raises(ConfigError, match=r"extract.layer=30 is out of range for M: .*0\.\.29"):
        cfg.check_layer(30, "M")
    C.ExtractConfig(layer=29).check_layer(30, "M")


def test_profile_command_writes_params_and_rejects_unknown(tmp_path, capsys):
    out = tmp_path / "params.yaml"
    assert main(["profile", "smoke", "--output", str(out)]) == 0
    assert C.load_params(out) == C.materialize_profile("smoke")
    assert main(["profile", "nope", "--output", str(out)]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
    assert C.load_params(out).profile == "smoke"  # the failed call left the file alone


def test_check_params_reports_bad_file(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("extract: {layer: x}\n")
    assert main(["check-params", "--params", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "extract.layer: expected int" in err
    bad.write_text("extract: [unclosed\n")
    assert main(["check-params", "--params", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
