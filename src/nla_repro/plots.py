"""Eval and SAE plots: PNGs (matplotlib, for cards and reports) and the CSVs `dvc plots` draws.

Everything is drawn from rows.parquet and the metrics computed from it, so a plot never shows
a number the metrics file does not hold.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI or in the container
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from nla_repro.evaluation.measures import cosine_matrix
from nla_repro.evaluation.registry import PREDICTORS, Results, lead_key, predictor_key
from nla_repro.io import atomic_path, write_text
from nla_repro.schemas import EVAL_CONDITIONS

PNG_NAMES = ("baselines", "round_trip", "cos_hist", "k_curve", "ablation", "identity")
CSV_NAMES = ("baselines", "round_trip", "k_curve", "ablation")
SAE_PNG_NAMES = ("density", "train_curve")
SAE_CSV_NAMES = ("density",)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def _csv(df: pd.DataFrame, path: Path) -> None:
    write_text(df.to_csv(index=False, lineterminator="\n"), path)


def eval_plots(rows: pd.DataFrame, metrics: dict, mu: np.ndarray, out_dir: Path | str) -> None:
    """baselines, round_trip, cos_hist, k_curve, ablation, identity (.png), and
    baselines.csv, round_trip.csv, k_curve.csv, ablation.csv for `dvc plots show`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = Results({"eval": metrics})
    n = m.value("eval_n")
    floor = {"cos": m.value("random_floor_cos"), "fve_cen": m.value("random_floor_fve_cen")}

    # The round trip's paired lead over every predictor, raw and centred: left of 0 loses.
    shown = [p for p in PREDICTORS if m.applies(predictor_key(p.name, "cos"))]
    records = []
    for p in shown:
        record = {"predictor": p.name, "kind": p.kind}
        for view in ("cos", "fve_cen"):
            lo, hi = m.ci(lead_key(p.name, view)) or (None, None)
            record |= {f"lead_{view}": m.value(lead_key(p.name, view)), f"lo_{view}": lo}
            record[f"hi_{view}"] = hi
        records.append(record)
    lead = pd.DataFrame(records)
    _csv(lead, out / "baselines.csv")
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.35 * len(shown) + 1.6), sharey=True)
    y = np.arange(len(shown))[::-1]
    colours = {"baseline": "C3", "control": "C1", "anchor": "C0", "oracle": "C7"}
    for ax, view in zip(axes, ("cos", "fve_cen"), strict=True):
        mean = lead[f"lead_{view}"].to_numpy(float)
        err = np.abs(lead[[f"lo_{view}", f"hi_{view}"]].to_numpy(float).T - mean)
        ax.errorbar(mean, y, xerr=np.nan_to_num(err), fmt="none", ecolor="k", capsize=2, lw=1)
        ax.scatter(mean, y, c=[colours[k] for k in lead["kind"]], zorder=3)
        ax.axvline(0, c="grey", lw=1)
        ax.set(xlabel=f"round trip minus predictor, {'raw cos' if view == 'cos' else 'fve_cen'}")
    axes[0].set_yticks(y, [m.name(predictor_key(p.name, "cos")).split(":")[0] for p in shown])
    for kind, colour in colours.items():
        axes[1].scatter([], [], c=colour, label=kind)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"Round trip minus each predictor on the same rows (n = {n}, paired 95% CIs): "
        "left of 0, the predictor scores higher"
    )
    _save(fig, out / "baselines.png")

    # Per-row round trip, sorted, against the random floor.
    order = np.argsort(rows["fve_cen_greedy"].to_numpy())
    per_row = pd.DataFrame(
        {
            "rank": np.arange(n),
            "doc_id": rows["doc_id"].to_numpy()[order],
            "cos": rows["cos_greedy"].to_numpy()[order],
            "fve_cen": rows["fve_cen_greedy"].to_numpy()[order],
            "floor_cos": floor["cos"],
            "floor_fve_cen": floor["fve_cen"],
        }
    )
    _csv(per_row, out / "round_trip.csv")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(per_row["rank"], per_row["cos"], ".", label="raw cos")
    ax.plot(per_row["rank"], per_row["fve_cen"], ".", label="centred (fve_cen)")
    ax.axhline(floor["cos"], ls="--", c="C0", lw=1, label="random floor, raw")
    ax.axhline(floor["fve_cen"], ls="--", c="C1", lw=1, label="random floor, centred")
    ax.set(xlabel="row (sorted by centred score)", ylabel="round trip", title=f"n = {n}")
    ax.legend(fontsize=8)
    _save(fig, out / "round_trip.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(rows["cos_greedy"], bins=20, alpha=0.6, label="raw cos")
    ax.hist(rows["fve_cen_greedy"], bins=20, alpha=0.6, label="centred (fve_cen)")
    ax.axvline(floor["fve_cen"], ls="--", c="C1", lw=1, label="centred floor")
    ax.set(xlabel="round-trip score", ylabel="rows", title=f"Round trip, n = {n}")
    ax.legend(fontsize=8)
    _save(fig, out / "cos_hist.png")

    # Best-of-K: oracle vs log-prob rerank, with the ceiling and the floor.
    curve = metrics["best_of_k"]["fve_cen"]
    k_df = pd.DataFrame(curve, columns=["k", "oracle", "logprob_rerank"])
    _csv(k_df, out / "k_curve.csv")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if len(k_df):
        ax.plot(k_df["k"], k_df["oracle"], "o-", label="oracle rerank (AR)")
        ax.plot(k_df["k"], k_df["logprob_rerank"], "s-", label="AV log-prob rerank")
        ax.set_xscale("log", base=2)
        ax.set_xticks(k_df["k"], [str(int(k)) for k in k_df["k"]])
    ceiling = m.value("paraphrase_ceiling_fve_cen")
    if ceiling is not None:
        ax.axhline(ceiling, ls=":", c="k", lw=1, label="paraphrase ceiling")
    ax.axhline(floor["fve_cen"], ls="--", c="grey", lw=1, label="random floor")
    ax.set(xlabel="K samples", ylabel="centred round trip (fve_cen)", title="Best of K")
    ax.legend(fontsize=8)
    _save(fig, out / "k_curve.png")

    # Content-blindness ablation with 95% intervals.
    def key(condition: str, view: str) -> str:
        if condition == "greedy":
            return "round_trip_cos" if view == "cos" else "round_trip_fve_cen"
        return predictor_key(condition, view)

    ab_df = pd.DataFrame(
        {
            "condition": list(EVAL_CONDITIONS),
            "cos": [m.value(key(c, "cos")) for c in EVAL_CONDITIONS],
            "fve_cen": [m.value(key(c, "fve_cen")) for c in EVAL_CONDITIONS],
        }
    )
    _csv(ab_df, out / "ablation.csv")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, view in zip(axes, ("cos", "fve_cen"), strict=True):
        means = np.array([m.value(key(c, view)) for c in EVAL_CONDITIONS])
        cis = np.array([m.ci(key(c, view)) for c in EVAL_CONDITIONS], dtype=float)
        err = np.abs(cis.T - means)
        ax.bar(EVAL_CONDITIONS, means, yerr=err, capsize=3, color="C0")
        base = floor[view]
        ax.axhline(base, ls="--", c="grey", lw=1, label="random floor")
        lo = min(float(np.nanmin(cis)), base)
        ax.set_ylim(max(lo - 0.05, -1), None)
        ax.set(title="raw cos" if view == "cos" else "centred (fve_cen)")
        ax.tick_params(axis="x", rotation=30)
    axes[0].legend(fontsize=8)
    blind = metrics["verdicts"]["content_blind"]
    fig.suptitle(f"What the AR reads (n = {n}); content_blind = {blind}")
    _save(fig, out / "ablation.png")

    # Cross-row identity, centred: a diagonal means each reconstruction points at its own row.
    c = cosine_matrix(
        np.stack(rows["rec_greedy"].to_list()), np.stack(rows["target"].to_list()), mu
    )
    fig, ax = plt.subplots(figsize=(5, 4.4))
    im = ax.imshow(c, cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(im, ax=ax, shrink=0.8)
    hits = m.count("identity_argmax_accuracy")
    n_ident = m.n_value("identity_argmax_accuracy")
    ax.set(
        xlabel="target row j",
        ylabel="reconstruction of row i",
        title=(f"centred cos(AR(AV(v_i)), v_j): argmax {hits}/{n_ident} (chance 1/{n_ident})"),
    )
    ax.title.set_fontsize(9)
    _save(fig, out / "identity.png")


def sae_plots(density_S: np.ndarray, history: list[dict], metrics: dict, out_dir) -> None:
    """density.png / density.csv: histogram of log10 feature density on the held-out tokens
    (latents that never fired counted apart); train_curve.png: batch FVU and dead latents
    against training tokens."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fired = density_S[density_S > 0]
    never = int((density_S == 0).sum())
    edges = np.linspace(-6, 0, 25)
    counts, _ = np.histogram(np.log10(np.clip(fired, 1e-6, 1)), bins=edges)
    _csv(
        pd.DataFrame({"log10_density": np.round(edges[:-1], 3), "latents": counts}),
        out / "density.csv",
    )
    m = Results({"sae": metrics})
    n = m.n_value("explained_variance")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.stairs(counts, edges, fill=True, alpha=0.7)
    ax.axvline(np.log10(1 / max(n, 1)), ls="--", c="grey", lw=1, label="fires once")
    ax.set(
        xlabel="log10 feature density (fraction of held-out tokens)",
        ylabel="latents",
        title=f"{len(density_S)} latents, {n} held-out tokens; never fired: {never}",
    )
    ax.legend(fontsize=8)
    _save(fig, out / "density.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    if history:
        tokens = [h["tokens"] for h in history]
        ax.plot(tokens, [h["fvu"] for h in history], label="batch FVU")
        ax.set_yscale("log")
        ax2 = ax.twinx()
        ax2.plot(tokens, [h["dead"] for h in history], c="C3", lw=1, label="dead latents")
        ax2.set_ylabel("dead latents")
        ax2.legend(loc="upper center", fontsize=8)
    ax.set(
        xlabel="training tokens",
        ylabel="FVU (batch)",
        title=f"held-out explained variance {m.value('explained_variance'):.3f}",
    )
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, out / "train_curve.png")


RL_PLOT_KEYS = (
    "round_trip_fve_cen",
    "explanation_share_fve_cen",
    "round_trip_minus_mean_direction_fve_cen",
    "round_trip_minus_centroid_fve_cen",
    "identity_argmax_accuracy",
    "unique_output_rate",
)


def rl_comparison_plot(metrics: dict, out_dir: Path | str) -> None:
    """rl_vs_sft.png / .csv: RL minus SFT on the same rows under the live and the held-out
    AR, with paired 95% intervals, for the numbers the quality bars read."""
    comparison = metrics.get("comparison")
    if not comparison:
        return
    out = Path(out_dir)
    names, rows = [], []
    for key in RL_PLOT_KEYS:
        for ar, block in (
            ("live AR", "rl_minus_sft"),
            ("held-out SFT AR", "rl_heldout_ar_minus_sft"),
        ):
            d = comparison[block][key]["difference"]
            lo, hi = d["ci95"] if d["ci95"] else (None, None)
            rows.append({"number": key, "ar": ar, "rl_minus_sft": d["mean"], "lo": lo, "hi": hi})
        names.append(key)
    df = pd.DataFrame(rows)
    _csv(df, out / "rl_vs_sft.csv")
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(names) + 1.2))
    y = np.arange(len(names))
    for offset, (ar, color) in zip(
        (-0.18, 0.18), (("live AR", "C0"), ("held-out SFT AR", "C1")), strict=True
    ):
        part = df[df["ar"] == ar].reset_index(drop=True)
        mean = part["rl_minus_sft"].to_numpy(float)
        err = np.stack([mean - part["lo"].to_numpy(float), part["hi"].to_numpy(float) - mean])
        ax.errorbar(
            mean, y + offset, xerr=np.nan_to_num(err), fmt="o", color=color, label=ar, capsize=3
        )
    ax.axvline(0, color="0.4", lw=1)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("RL minus SFT, same rows (paired 95% CI)")
    ax.set_title("What RL changed, read by the live AR and by the held-out SFT AR")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, out / "rl_vs_sft.png")
