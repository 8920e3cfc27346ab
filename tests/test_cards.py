"""Model cards and RELEASE_CALIBRATION.md: parsed back, numbers equal to metrics, warnings."""

import json
import socket
import subprocess

import pytest
from conftest import write_finished_pipeline
from huggingface_hub import ModelCard

from nla_repro import config as C
from nla_repro.evaluation import registry
from nla_repro.evaluation.compare import bars_under_each_pair
from nla_repro.release import calibration, cards
from nla_repro.stages import card as card_stage

# The model-index numbers each card must publish, by where the stages wrote them.
EXPECTED_PATHS = {
    "av": {
        "round_trip_cos": ("eval", ["round_trip", "cos", "mean"]),
        "round_trip_fve_cen": ("eval", ["round_trip", "fve_cen", "mean"]),
        "vector_use_gap": ("eval", ["vector_use", "gap"]),
        "unique_output_rate": ("eval", ["diversity", "unique_rate"]),
        "empty_output_rate": ("eval", ["diversity", "empty_rate"]),
        "identity_argmax_accuracy": ("eval", ["identity", "centred", "argmax_accuracy"]),
    },
    "ar": {
        "replay_cos": ("eval", ["predictors", "replay", "cos", "mean"]),
        "replay_fve_cen": ("eval", ["predictors", "replay", "fve_cen", "mean"]),
        "explanation_share_cos": (
            "eval",
            ["predictors", "empty", "round_trip_minus", "cos", "mean"],
        ),
        "explanation_share_fve_cen": (
            "eval",
            ["predictors", "empty", "round_trip_minus", "fve_cen", "mean"],
        ),
        "empty_string_cos": ("eval", ["predictors", "empty", "cos", "mean"]),
    },
    "sae": {
        "explained_variance": ("sae", ["explained_variance"]),
        "l0": ("sae", ["l0"]),
        "dead_latents": ("sae", ["latents", "dead_training_window"]),
        "loss_recovered": ("sae", ["loss_recovered", "recovered"]),
        "mse": ("sae", ["mse"]),
    },
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Cards are built and parsed offline: any socket connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access while building or parsing a card")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def project(tmp_path, monkeypatch):
    write_finished_pipeline(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def metric_files(root):
    return {name: json.loads((root / p).read_text()) for name, p in registry.SOURCES.items()}


def dig(data, keys):
    for key in keys:
        data = data[key]
    return data


def test_card_stage_writes_cards_that_parse_with_model_index_equal_to_metrics(project, capsys):
    card_stage.run(C.Params())
    metrics = metric_files(project)
    for kind in cards.KINDS:
        folder = project / C.CARDS_DIR / kind
        card = ModelCard.load(folder / "README.md")
        assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert card.data.license == "apache-2.0"
        assert card.data.library_name == ("saelens" if kind == "sae" else "peft")
        published = {r.metric_type: r.metric_value for r in card.data.eval_results}
        expected = {
            key: dig(metrics[source], path) for key, (source, path) in EXPECTED_PATHS[kind].items()
        }
        assert published == expected, kind
        assert {r.dataset_split for r in card.data.eval_results} == {"test"}
        # Every plot the card shows is in its folder.
        for plot in cards.CARD_PLOTS[kind]:
            assert f"](plots/{plot.name})" in card.text
            assert (folder / "plots" / plot.name).read_bytes() == (project / plot).read_bytes()
    av = (project / "cards/av/README.md").read_text()
    vu = metrics["eval"]["vector_use"]
    lo, hi = vu["ci95"]
    assert (
        f"| AV vector-use gap (nats) | {vu['gap']:.3f} | [{lo:.3f}, {hi:.3f}] | {vu['n']} |" in av
    )
    assert "`.*layers\\.\\d+\\.(self_attn\\.(q\\|k" in av  # the regex does not split the row
    sae = (project / "cards/sae/README.md").read_text()
    ev_sae, n_tok = metrics["sae"]["explained_variance"], metrics["sae"]["n_tokens"]
    assert f"| Explained variance | {ev_sae:.3f} | {n_tok:,} tokens | 0 (predict the mean) |" in sae
    calibration = (project / C.CALIBRATION_PATH).read_text()
    rt = metrics["eval"]["round_trip"]["cos"]
    lo, hi = rt["ci95"]
    assert (
        f"| Round trip cos(v, AR(AV(v))), raw | {rt['mean']:.3f} ± {rt['std']:.3f} "
        f"| [{lo:.3f}, {hi:.3f}] | {rt['n']} | 0.438 ± 0.054" in calibration
    )
    assert "this is the first release" in calibration
    assert "nla-smollm2-135m-instruct-l20-av" in capsys.readouterr().out


def test_a_changed_measurement_changes_the_card(project):
    """Nothing in a card is typed by hand: move a number in metrics and the card follows."""
    path = project / C.EVAL_METRICS
    ev = json.loads(path.read_text())
    ev["round_trip"]["cos"]["mean"] = 0.31415
    ev["vector_use"]["gap"] = 0.4242
    path.write_text(json.dumps(ev))
    card_stage.run(C.Params())
    card = ModelCard.load(project / "cards/av/README.md")
    published = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert published["round_trip_cos"] == 0.31415 and published["vector_use_gap"] == 0.4242
    assert "| Round trip cos(v, AR(AV(v))), raw | 0.314 |" in card.text
    assert "| AV vector-use gap (nats) | 0.424 |" in (project / C.CALIBRATION_PATH).read_text()


def test_content_blind_ar_says_so_at_the_top_of_both_nla_cards(project):
    path = project / C.EVAL_METRICS
    ev = json.loads(path.read_text())
    ev["verdicts"]["content_blind"] = True
    ev["verdict_evidence"]["content_blind"] = "raw 0.0010 [-0.002, 0.004]"
    path.write_text(json.dumps(ev))
    card_stage.run(C.Params())
    for kind in ("av", "ar"):
        text = ModelCard.load(project / f"cards/{kind}/README.md").text
        warning = text.index("This AR is content-blind")
        assert warning < text.index("## How to load") and warning < 400
        assert "raw 0.0010 [-0.002, 0.004]" in text
    assert "content-blind" not in (project / "cards/sae/README.md").read_text()
    assert "## Failure modes detected" in (project / C.CALIBRATION_PATH).read_text()


def test_a_pair_that_beats_its_baselines_carries_no_warning(project):
    path = project / C.EVAL_METRICS
    ev = json.loads(path.read_text())
    ev["verdicts"] |= {"beats_mean_direction": True, "beats_text_free_centroid": True}
    path.write_text(json.dumps(ev))
    card_stage.run(C.Params())
    for kind in cards.KINDS:
        assert "[!WARNING]" not in (project / f"cards/{kind}/README.md").read_text()
    assert "## Failure modes detected" not in (project / C.CALIBRATION_PATH).read_text()


def test_losing_to_a_text_free_predictor_is_said_at_the_top_of_the_av_card(project):
    """The committed default (after RL) beats the train mean vector but not the text-free
    centroid predictor centred: its card must say so first, and nothing about the constant."""
    ev = json.loads((project / C.EVAL_METRICS).read_text())
    assert ev["verdicts"]["beats_mean_direction"] is True
    assert ev["verdicts"]["beats_text_free_centroid"] is False
    card_stage.run(C.Params())
    text = ModelCard.load(project / "cards/av/README.md").text
    warning = text.index("does not beat a text-free predictor")
    assert warning < text.index("## How to load")
    assert "does not beat a constant" not in text
    lead = ev["predictors"]["centroid"]["round_trip_minus"]["fve_cen"]
    assert f"centred {lead['mean']:.4f} [{lead['ci95'][0]:.4f}, {lead['ci95'][1]:.4f}]" in text
    assert "[!WARNING]" not in (project / "cards/ar/README.md").read_text()
    calibration = (project / C.CALIBRATION_PATH).read_text()
    assert "## Failure modes detected" in calibration
    assert "does not beat a text-free predictor" in calibration
    # The baselines table: every predictor's row, the oracle labelled as one.
    for row in registry.predictor_rows(metric_files(project)):
        assert f"| {row['name']} | {row['kind']} | {row['cos']} |" in calibration
    assert "| Nearest train vector (oracle) | oracle |" in text


def test_missing_input_names_the_file_and_writes_nothing(project):
    (project / C.SAE_METRICS).unlink()
    with pytest.raises(cards.CardError, match=r"metrics/sae\.json: not found"):
        card_stage.run(C.Params())
    assert not (project / C.CARDS_DIR).exists()
    (project / C.SAE_METRICS).write_text("{}")
    (project / C.EVAL_PLOTS / "identity.png").unlink()
    with pytest.raises(cards.CardError, match=r"plots/eval/identity\.png: not found"):
        card_stage.run(C.Params())
    assert not (project / C.CARDS_DIR).exists()


def test_repo_names_follow_base_layer_and_prefix():
    params = C.Params()
    assert cards.repo_names(params, "google/gemma-4-E2B")["sae"] == "nla-gemma-4-e2b-l20-sae"
    named = C.params_from_dict({"card": {"repo_prefix": "smol-nla"}})
    assert cards.repo_names(named, "x/y") == {k: f"smol-nla-{k}" for k in cards.KINDS}
    with pytest.raises(C.ConfigError, match=r"card\.org"):
        C.params_from_dict({"card": {"org": "bad org/name"}})


def git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_calibration_compares_with_the_previous_release_tag(project):
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1")
    git(project, "tag", "v0.1.00")
    assert calibration.previous_release(project)[0] is None  # the tag is at HEAD: this release
    path = project / C.SAE_METRICS
    sae = json.loads(path.read_text())
    old = sae["explained_variance"]
    sae["explained_variance"] = old + 0.05
    path.write_text(json.dumps(sae))
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "better sae")
    git(project, "tag", "not-a-version")
    tag, previous = calibration.previous_release(project)
    assert tag == "v0.1.00" and previous["sae"]["explained_variance"] == old
    card_stage.run(C.Params())
    text = (project / C.CALIBRATION_PATH).read_text()
    assert "Against `v0.1.00`" in text
    assert f"| SAE | Explained variance | {old:.3f} | {old + 0.05:.3f} | +0.050 |" in text
    gap = json.loads((project / C.EVAL_METRICS).read_text())["vector_use"]["gap"]
    assert f"| AV | AV vector-use gap (nats) | {gap:.3f} | {gap:.3f} | +0.000 |" in text


def set_path(data: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        data = data[part]
    data[last] = value


def test_quality_bars_are_met_only_at_their_bars(project):
    ev = json.loads((project / C.EVAL_METRICS).read_text())
    lead = "predictors.{}.round_trip_minus.{}"
    at_bars = {
        "n": 50,
        "vector_use.gap": 0.3,
        lead.format("empty", "cos") + ".mean": 0.10,
        lead.format("empty", "cos") + ".ci95": [0.01, 0.2],
        lead.format("empty", "fve_cen") + ".mean": 0.10,
        lead.format("empty", "fve_cen") + ".ci95": [0.01, 0.2],
        "identity.centred.argmax_accuracy": 0.20,
        "diversity.unique_rate": 0.90,
        "diversity.empty_rate": 0.02,
    }
    baselines = ("random_floor", "mean_direction", "centroid")
    for name in baselines:
        for view in ("cos", "fve_cen"):
            at_bars[lead.format(name, view) + ".mean"] = 0.01
            at_bars[lead.format(name, view) + ".ci95"] = [0.001, 0.02]
    for path, value in at_bars.items():
        set_path(ev, path, value)
    bars = registry.QUALITY_BARS
    assert [r["met"] for r in registry.bar_rows({"eval": ev})] == ["yes"] * len(bars)
    just_missed = {
        "n": 49,
        "vector_use.gap": 0.299,
        lead.format("empty", "cos") + ".mean": 0.099,
        # the mean clears the bar but its interval reaches 0: not met
        lead.format("empty", "fve_cen") + ".ci95": [-0.01, 0.2],
        "identity.centred.argmax_accuracy": 0.199,
        "diversity.unique_rate": 0.899,
        "diversity.empty_rate": 0.021,
    }
    # ahead of each baseline on average, but the paired interval reaches 0: not a win
    for name in baselines:
        for view in ("cos", "fve_cen"):
            just_missed[lead.format(name, view) + ".ci95"] = [-0.001, 0.02]
    for path, value in just_missed.items():
        set_path(ev, path, value)
    rows = registry.bar_rows({"eval": ev})
    assert [r["met"] for r in rows] == ["NO"] * len(bars)
    assert rows[4]["value"] == "19.9%" and rows[4]["target"] == ">= 20.0%"
    set_path(ev, "identity.centred.argmax_accuracy", None)  # measured as nothing
    assert registry.bar_rows({"eval": ev})[4]["met"] == "not measured"
    del ev["identity"]  # a declared path missing: an error, never a blank
    with pytest.raises(registry.MetricMissing, match=r"identity\.centred\.argmax_accuracy"):
        registry.bar_rows({"eval": ev})


def test_a_metric_missing_from_the_metrics_stops_the_card_stage(project):
    path = project / C.EVAL_METRICS
    ev = json.loads(path.read_text())
    del ev["predictors"]["gibberish"]
    path.write_text(json.dumps(ev))
    with pytest.raises(registry.MetricMissing, match=r"metrics/eval\.json .*predictors\.gibberish"):
        card_stage.run(C.Params())
    assert not (project / C.CARDS_DIR).exists()


def test_summary_table_lists_every_headline_and_bar(project):
    inputs = cards.read_inputs(C.Params())
    names = cards.repo_names(C.Params(), "HuggingFaceTB/SmolLM2-135M-Instruct")
    text = card_stage.summary(inputs, names)
    results = registry.Results(inputs.metrics)
    for kind in cards.KINDS:
        keys = results.keys(f"index:{kind}")
        assert keys, kind
        for key in keys:
            name, value = results.name(key), results.text(key)
            assert any(name in line and line.rstrip().endswith(value) for line in text.splitlines())
    # The bars, after the SFT -> RL table: met by the published pair, under the held-out AR,
    # and by the SFT pair.
    assert "SFT -> RL, same rows (AR collusion: False)" in text
    bars_part = text.split("NLA quality bars (the published pair)")[1]
    for row in bars_under_each_pair(inputs.metrics):
        line = next(line for line in bars_part.splitlines() if line.startswith(row["name"]))
        assert line.split()[-3:] == [row["met"], row["met_heldout"], row["met_sft"]]


def test_calibration_shows_the_lever_sweep_of_its_own_profile_only(project):
    levers = {
        "profile": "default",
        "label_mode": "source_text",
        "commit": "abc1234",
        "date_utc": "2026-12-02",
        "machine": "x86_64, 2 threads, torch 2.13.0",
        "steps": 60,
        "levers": [
            {
                "name": "av:embed_norm",
                "model": "av",
                "what": "injection at the mean embedding norm",
                "overrides": {"injection_scale": "embed_norm"},
                "train_rows": 300,
                "steps": 60,
                "val": [
                    {"step": 0, "val_loss": 3.0, "vector_use_gap": 0.001},
                    {"step": 60, "val_loss": 2.5, "vector_use_gap": 0.0123},
                ],
                "tokens_per_s_median": 100.0,
                "wall_s": 321.0,
            }
        ],
    }
    (project / C.LEVERS_PATH).parent.mkdir(parents=True, exist_ok=True)
    (project / C.LEVERS_PATH).write_text(json.dumps(levers))
    card_stage.run(C.Params())
    text = (project / C.CALIBRATION_PATH).read_text()
    assert (
        "| `av:embed_norm` | injection at the mean embedding norm | vector_use_gap 0: +0.001, "
        "60: +0.012 | 2.500 | 300 | 321 |" in text
    )
    assert "not this build's" in text  # the sweep recorded no input hashes
    levers["inputs_sha256"] = {"x": "y"}  # the sidecars' (conftest)
    (project / C.LEVERS_PATH).write_text(json.dumps(levers))
    card_stage.run(C.Params())
    assert "not this build's" not in (project / C.CALIBRATION_PATH).read_text()
    levers["profile"] = "smoke"
    (project / C.LEVERS_PATH).write_text(json.dumps(levers))
    card_stage.run(C.Params())
    text = (project / C.CALIBRATION_PATH).read_text()
    assert "`av:embed_norm`" not in text
    assert "was run on profile `smoke`" in text


def test_calibration_shows_the_rl_lever_sweep_per_ar_or_says_it_is_missing(project):
    (project / C.RL_LEVERS_PATH).unlink(missing_ok=True)
    card_stage.run(C.Params())
    assert "No RL lever sweep on record" in (project / C.CALIBRATION_PATH).read_text()

    def scored(share: float, met: int) -> dict:
        numbers = {key: {"mean": 0.5} for key, _ in calibration.RL_LEVER_COLUMNS}
        numbers["explanation_share_cos"] = {"mean": share, "ci95": [share - 0.01, share + 0.01]}
        return {
            "numbers": numbers,
            "bars_met": {f"b{i}": i < met for i in range(12)},
            "bars_met_count": met,
        }

    sweep = {
        "profile": "default",
        "commit": "abc1234",
        "date_utc": "2026-12-03",
        "machine": "x86_64, 2 threads",
        "split": "test",
        "steps": 20,
        "pipeline_rl_steps": 40,
        "bars": [f"b{i}" for i in range(12)],
        "levers": [
            {
                "name": "kl_0.1",
                "what": "KL coefficient 0.1",
                "steps": 20,
                "score": {"n": 137, "live_ar": scored(0.04, 6), "heldout_ar": scored(0.07, 8)},
                "wall_s": 300.0,
            }
        ],
    }
    (project / C.RL_LEVERS_PATH).parent.mkdir(parents=True, exist_ok=True)
    (project / C.RL_LEVERS_PATH).write_text(json.dumps(sweep))
    card_stage.run(C.Params())
    text = (project / C.CALIBRATION_PATH).read_text()
    assert "| `kl_0.1` | KL coefficient 0.1 | 20 | live | 0.500 | 0.040 [0.030, 0.050] |" in text
    assert (
        "| `kl_0.1` | KL coefficient 0.1 | 20 | held-out SFT | 0.500 | 0.070 [0.060, 0.080] |"
        in (text)
    )
    assert "| 6/12 | 300 |" in text and "| 8/12 | 300 |" in text
