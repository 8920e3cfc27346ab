"""pandera schemas of every parquet the stages exchange, the one way stages read them, and the
Arrow layout of the eval rows (vectors as fixed-size float32 lists, metric inputs in metadata).

Validation is lazy (all failures at once); `validate` turns pandera's failure table into a
DataValidationError that names the file, each failing column and check, and the rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.parquet as pq
import yaml

from nla_repro.errors import DataValidationError
from nla_repro.io import vectors_to_arrow

SPLITS = ("train", "val", "test")
MAX_ROWS_SHOWN = 8


def _nonblank(s: pd.Series) -> pd.Series:
    return s.str.strip().str.len() > 0


CORPUS = pa.DataFrameSchema(
    {
        "doc_id": pa.Column(str, pa.Check(_nonblank, error="doc_id is empty"), unique=True),
        "source_family": pa.Column(str, pa.Check(_nonblank, error="source_family is empty")),
        "text": pa.Column(str, pa.Check(_nonblank, error="text is empty")),
        "split": pa.Column(str, pa.Check.isin(SPLITS)),
    },
    name="corpus",
    strict=True,
    coerce=False,
)


LABEL_STATUSES = ("accepted", "corrected", "rejected")

LABELS = pa.DataFrameSchema(
    {
        "doc_id": pa.Column(str, pa.Check(_nonblank, error="doc_id is empty"), unique=True),
        "split": pa.Column(str, pa.Check.isin(SPLITS)),
        "source_family": pa.Column(str),
        "text": pa.Column(str, pa.Check(_nonblank, error="text is empty")),
        "final_token": pa.Column(str),
        "explanation": pa.Column(str),
        "status": pa.Column(str, pa.Check.isin(LABEL_STATUSES)),
        "verdict": pa.Column(str, pa.Check.isin(("accept", "corrected", "reject", "none"))),
        "reason": pa.Column(str),
        "labeler_response": pa.Column(str),
        "attempts": pa.Column("int64", pa.Check.ge(0)),
        "input_tokens": pa.Column("int64", pa.Check.ge(0)),
        "output_tokens": pa.Column("int64", pa.Check.ge(0)),
        "mode": pa.Column(str, pa.Check.isin(("two-pass", "single-pass", "source_text"))),
        "backend": pa.Column(str),
        "labeler_model": pa.Column(str),
        "auditor_model": pa.Column(str),
        "labeler_prompt_sha256": pa.Column(str, pa.Check.str_matches(r"^[0-9a-f]{64}$")),
        "auditor_prompt_sha256": pa.Column(str, pa.Check.str_matches(r"^[0-9a-f]{64}$")),
    },
    checks=[
        pa.Check(
            lambda df: (df["status"] == "rejected") | (df["explanation"].str.strip().str.len() > 0),
            error="accepted or corrected row without an explanation",
        ),
    ],
    name="labels",
    strict=True,
)


def _vector_checks(d_model: int) -> list[pa.Check]:
    return [
        pa.Check(
            lambda v: isinstance(v, np.ndarray) and v.dtype == np.float32,
            element_wise=True,
            error="vector is not a float32 array",
        ),
        pa.Check(
            lambda v: getattr(v, "shape", None) == (d_model,),
            element_wise=True,
            error=f"vector width is not d_model={d_model}",
        ),
        pa.Check(
            lambda v: bool(np.isfinite(np.asarray(v, dtype=np.float64)).all()),
            element_wise=True,
            error="vector has NaN or inf",
        ),
    ]


MAX_VECTOR_NORM = 1e6
"""Largest accepted activation norm. Residual-stream norms of the models we know stay below
1e5 (massive activations included); beyond 1e6 a vector is corrupt or wrongly scaled, and its
squared norm already loses most float32 precision."""
NORM_RTOL = 1e-3
"""Relative agreement required between an activation's `norm` column and its vector."""


def _vector_norms(df: pd.DataFrame) -> np.ndarray:
    return np.array(
        [np.linalg.norm(np.asarray(v, dtype=np.float64)) for v in df["vector"]], dtype=np.float64
    )


def _norm_matches(df: pd.DataFrame) -> pd.Series:
    norms = _vector_norms(df)
    stored = df["norm"].to_numpy(dtype=np.float64)
    return pd.Series(np.abs(stored - norms) <= NORM_RTOL * np.maximum(norms, 1.0), index=df.index)


def _one_length_per_doc(df: pd.DataFrame) -> pd.Series:
    return df.groupby("doc_id")["n_tokens"].transform("nunique") == 1


def activations_schema(d_model: int) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "doc_id": pa.Column(str, pa.Check(_nonblank, error="doc_id is empty")),
            "split": pa.Column(str, pa.Check.isin(SPLITS)),
            "position": pa.Column("int32", pa.Check.ge(0)),
            "token_id": pa.Column("int64", pa.Check.ge(0)),
            "token": pa.Column(str),
            "n_tokens": pa.Column("int32", pa.Check.ge(1)),
            "layer": pa.Column("int32", pa.Check.ge(0)),
            "norm": pa.Column(
                "float32",
                [
                    pa.Check.ge(0),
                    pa.Check(lambda s: np.isfinite(s), error="norm not finite"),
                    pa.Check.le(MAX_VECTOR_NORM, error=f"norm above {MAX_VECTOR_NORM:g}"),
                ],
            ),
            "vector": pa.Column(object, _vector_checks(d_model)),
        },
        checks=[
            pa.Check(lambda df: df["position"] < df["n_tokens"], error="position >= n_tokens"),
            pa.Check(
                _norm_matches, error=f"norm differs from the vector's L2 norm (rtol {NORM_RTOL})"
            ),
            pa.Check(_one_length_per_doc, error="rows of one doc_id disagree on n_tokens"),
        ],
        unique=["doc_id", "position"],
        name="activations",
        strict=True,
    )


def pairs_schema(d_model: int) -> pa.DataFrameSchema:
    """NLA training pairs: an explanation (the AV's target, the AR's input) and the vector
    (the AV's input, the AR's target), one row per labeled document."""
    return pa.DataFrameSchema(
        {
            "doc_id": pa.Column(str, pa.Check(_nonblank, error="doc_id is empty"), unique=True),
            "split": pa.Column(str, pa.Check.isin(SPLITS)),
            "position": pa.Column("int32", pa.Check.ge(0)),
            "explanation": pa.Column(str, pa.Check(_nonblank, error="explanation is empty")),
            "vector": pa.Column(object, _vector_checks(d_model)),
        },
        name="nla_pairs",
        strict=True,
    )


# What the eval stage feeds the AR besides the AV's greedy output (docs/concepts/metrics.md):
# replay = the source label, empty = "", unrelated = another row's document text, gibberish =
# random vocabulary tokens. Each has a reconstructed vector and its scores per eval row.
EVAL_CONDITIONS = ("greedy", "replay", "empty", "unrelated", "gibberish")
# Predictors that read no text (`evaluation.baselines`): their vectors are `rec_<name>`
# columns too, scored with the same metrics as the AR's.
BASELINE_PREDICTORS = ("mean_direction", "centroid", "nearest_train")
# Per-row list columns that come in groups of equal length (K samples, N paraphrases, claims).
EVAL_LIST_GROUPS = (
    ("samples", "sample_logprob", "sample_cos", "sample_fve_cen"),
    ("paraphrases", "para_cos", "para_fve_cen"),
    ("claims", "claim_delta_mse"),
)


def _list_of(kind: type) -> pa.Check:
    return pa.Check(
        lambda v: isinstance(v, list | np.ndarray) and all(isinstance(x, kind) for x in v),
        element_wise=True,
        error=f"not a list of {kind.__name__}",
    )


def _equal_lengths(df: pd.DataFrame) -> pd.Series:
    ok = pd.Series(True, index=df.index)
    for group in EVAL_LIST_GROUPS:
        lengths = [df[c].map(len) for c in group]
        for other in lengths[1:]:
            ok &= lengths[0] == other
    return ok


def eval_rows_schema(d_model: int) -> pa.DataFrameSchema:
    """data/eval/rows.parquet: one row per evaluated held-out vector, with everything
    metrics/eval.json is computed from. `cos_*` are raw cosines with the target, `fve_cen_*`
    are 0.5 * (1 + cos(h - mu, v - mu)) with mu the held-out pool mean (parquet metadata);
    `rec_<baseline>` are the text-free predictors' vectors, `floor_*` each row's random floor
    (the mean score of the held-out pool's vectors)."""
    score = [pa.Check(lambda s: np.isfinite(s), error="not finite")]
    judge = pa.Check(lambda s: s.isna() | s.between(1, 5), error="judge score outside 1-5")
    columns = {
        "doc_id": pa.Column(str, pa.Check(_nonblank, error="doc_id is empty"), unique=True),
        "source_family": pa.Column(str),
        "text": pa.Column(str),
        "label": pa.Column(str, pa.Check(_nonblank, error="label is empty")),
        "target": pa.Column(object, _vector_checks(d_model)),
        "explanation": pa.Column(str),
        "explanation_logprob": pa.Column(float, score),
        "samples": pa.Column(object, _list_of(str)),
        "sample_logprob": pa.Column(object, _list_of(float)),
        "sample_cos": pa.Column(object, _list_of(float)),
        "sample_fve_cen": pa.Column(object, _list_of(float)),
        "paraphrases": pa.Column(object, _list_of(str)),
        "para_cos": pa.Column(object, _list_of(float)),
        "para_fve_cen": pa.Column(object, _list_of(float)),
        "claims": pa.Column(object, _list_of(str)),
        "claim_delta_mse": pa.Column(object, _list_of(float)),
        "unrelated_text": pa.Column(str),
        "gibberish_text": pa.Column(str),
        "centroid_family": pa.Column(str),
        "floor_cos": pa.Column(float, [*score, pa.Check.in_range(-1.0001, 1.0001)]),
        "floor_fve_cen": pa.Column(float, [*score, pa.Check.in_range(-0.0001, 1.0001)]),
        "nll_true": pa.Column(float, score),
        "nll_shuffled": pa.Column(float, score),
        "n_label_tokens": pa.Column("int64", pa.Check.ge(1)),
        "judge_validity": pa.Column(float, judge, nullable=True),
        "judge_specificity": pa.Column(float, judge, nullable=True),
        "label_validity": pa.Column(float, judge, nullable=True),
        "label_specificity": pa.Column(float, judge, nullable=True),
        "judge_preferred": pa.Column(str, pa.Check.isin(("av", "label", ""))),
    }
    for cond in EVAL_CONDITIONS:
        columns[f"rec_{cond}"] = pa.Column(object, _vector_checks(d_model))
        columns[f"cos_{cond}"] = pa.Column(float, [*score, pa.Check.in_range(-1.0001, 1.0001)])
        columns[f"fve_cen_{cond}"] = pa.Column(float, [*score, pa.Check.in_range(-0.0001, 1.0001)])
    for name in BASELINE_PREDICTORS:
        columns[f"rec_{name}"] = pa.Column(object, _vector_checks(d_model))
    return pa.DataFrameSchema(
        columns,
        checks=[pa.Check(_equal_lengths, error="list columns of one group differ in length")],
        name="eval_rows",
        strict=True,
    )


def schema_for(path: Path | str, d_model: int | None = None) -> pa.DataFrameSchema:
    """The schema of a stage parquet, chosen by its file name."""
    name = Path(path).name
    if name.startswith("corpus"):
        return CORPUS
    if name.startswith("labels"):
        return LABELS
    vectors = name.startswith("activations") or Path(path).parent.name == "eval"
    if vectors and d_model is None:
        from nla_repro.config import BASE_META

        if not BASE_META.exists():
            raise DataValidationError(f"{path}: pass --d-model (no {BASE_META} to read)")
        d_model = int(yaml.safe_load(BASE_META.read_text())["d_model"])
    if name.startswith("activations"):
        return activations_schema(d_model)
    if Path(path).parent.name == "eval":
        return eval_rows_schema(d_model)
    raise DataValidationError(
        f"{path}: no schema for this file (corpus*, labels*, activations*, eval/rows*)"
    )


def validate(df: pd.DataFrame, schema: pa.DataFrameSchema, where: Path | str) -> pd.DataFrame:
    try:
        return schema.validate(df, lazy=True)
    except pa.errors.SchemaErrors as err:
        raise DataValidationError(_describe(err.failure_cases, schema.name, where)) from None


def _describe(cases: pd.DataFrame, schema_name: str, where: Path | str) -> str:
    lines = [f"{where}: does not match the {schema_name} schema"]
    cases = cases.astype({"column": "object", "index": "object"})
    # pandera reports a failing frame-level check once per column; report it once.
    if "schema_context" in cases:
        frame = (cases["schema_context"] == "DataFrameSchema") & cases["check"].notna()
        framed = cases[frame].assign(column=np.nan).drop_duplicates(["check", "index"])
        cases = pd.concat([cases[~frame], framed])
    for (column, check), group in cases.groupby(["column", "check"], dropna=False, sort=False):
        if check == "column_in_dataframe":
            missing = ", ".join(repr(c) for c in group["failure_case"])
            lines.append(f"  missing column(s): {missing}")
            continue
        if check == "column_in_schema":
            extra = ", ".join(repr(c) for c in group["failure_case"])
            lines.append(f"  unexpected column(s): {extra}")
            continue
        rows = [int(i) for i in group["index"].dropna().tolist()]
        shown = ", ".join(str(r) for r in rows[:MAX_ROWS_SHOWN])
        more = f" and {len(rows) - MAX_ROWS_SHOWN} more" if len(rows) > MAX_ROWS_SHOWN else ""
        col = "(dataframe)" if pd.isna(column) else repr(column)
        where_rows = f" at row(s) {shown}{more}" if rows else f": {group['failure_case'].iloc[0]}"
        lines.append(f"  column {col}: {check}{where_rows}")
    return "\n".join(lines)


ARROW_TYPES = {
    "str": (pa_arrow.string(), pa_arrow.large_string()),
    "int32": (pa_arrow.int32(),),
    "int64": (pa_arrow.int64(),),
    "float32": (pa_arrow.float32(),),
    "float64": (pa_arrow.float64(),),
}
"""Arrow types a stored column may have for each pandera dtype of the schemas."""


def check_arrow(table: pa_arrow.Table, schema: pa.DataFrameSchema, where: Path | str) -> None:
    """What pandas conversion would hide: a column stored with another Arrow type than the
    schema's (pandas metadata can make `to_pandas` cast it silently) and text that is not
    valid UTF-8. Errors name the file, the column and the first bad row."""
    problems = []
    for name, column in schema.columns.items():
        if name not in table.column_names:
            continue  # pandera reports missing columns, all of them at once
        arrow_type = table.schema.field(name).type
        allowed = ARROW_TYPES.get(str(column.dtype))
        if allowed is not None and arrow_type not in allowed:
            problems.append(
                f"  column {name!r}: stored as {arrow_type}, expected {allowed[0]} "
                f"(the schema's {column.dtype}); write it with that type"
            )
            continue
        if pa_arrow.types.is_string(arrow_type) or pa_arrow.types.is_large_string(arrow_type):
            chunked = table.column(name)
            try:
                chunked.validate(full=True)
            except pa_arrow.ArrowInvalid:
                problems.append(f"  column {name!r}: {_bad_utf8(chunked)}")
    if problems:
        raise DataValidationError(
            f"{where}: does not match the {schema.name} schema\n" + "\n".join(problems)
        )


def _bad_utf8(chunked: pa_arrow.ChunkedArray) -> str:
    rows, offset = [], 0
    for chunk in chunked.chunks:
        for i, value in enumerate(chunk.cast(pa_arrow.binary()).to_pylist()):
            try:
                value is None or value.decode("utf-8")
            except UnicodeDecodeError:
                rows.append(offset + i)
        offset += len(chunk)
    shown = ", ".join(map(str, rows[:MAX_ROWS_SHOWN]))
    more = f" and {len(rows) - MAX_ROWS_SHOWN} more" if len(rows) > MAX_ROWS_SHOWN else ""
    return f"not valid UTF-8 at row(s) {shown}{more}"


def read_parquet(path: Path | str, schema: pa.DataFrameSchema) -> pd.DataFrame:
    """Read a stage input and validate it; errors name the file (and column and rows)."""
    path = Path(path)
    if not path.exists():
        raise DataValidationError(f"{path}: not found (has the stage that writes it run?)")
    if not path.is_file():
        raise DataValidationError(f"{path}: not a file")
    try:
        table = pq.read_table(path)
    except (OSError, pa_arrow.ArrowException) as err:
        raise DataValidationError(f"{path}: not a readable parquet file: {err}") from None
    check_arrow(table, schema, path)
    if table.num_rows == 0:
        raise DataValidationError(f"{path}: has no rows (the {schema.name} schema needs one)")
    # The Arrow types were checked above; pandas metadata must not re-type anything.
    return validate(table.to_pandas(ignore_metadata=True), schema, path)


# --- data/eval/rows.parquet: vectors as fixed-size float32 lists, the metric inputs in the
# parquet metadata


META_KEY = b"nla_eval"


VECTOR_COLUMNS = ("target", *(f"rec_{c}" for c in EVAL_CONDITIONS + BASELINE_PREDICTORS))


LIST_TYPES = {
    "samples": pa_arrow.list_(pa_arrow.string()),
    "paraphrases": pa_arrow.list_(pa_arrow.string()),
    "claims": pa_arrow.list_(pa_arrow.string()),
    "sample_logprob": pa_arrow.list_(pa_arrow.float64()),
    "sample_cos": pa_arrow.list_(pa_arrow.float64()),
    "sample_fve_cen": pa_arrow.list_(pa_arrow.float64()),
    "para_cos": pa_arrow.list_(pa_arrow.float64()),
    "para_fve_cen": pa_arrow.list_(pa_arrow.float64()),
    "claim_delta_mse": pa_arrow.list_(pa_arrow.float64()),
}


def eval_rows_to_arrow(df: pd.DataFrame, meta: dict | None = None) -> pa_arrow.Table:
    arrays, names = [], []
    for col in df.columns:
        if col in VECTOR_COLUMNS:
            arr = vectors_to_arrow(np.stack(df[col].to_list()).astype(np.float32))
        elif col in LIST_TYPES:
            arr = pa_arrow.array([list(v) for v in df[col]], type=LIST_TYPES[col])
        else:
            arr = pa_arrow.array(df[col].to_numpy())
        arrays.append(arr)
        names.append(col)
    table = pa_arrow.Table.from_arrays(arrays, names=names)
    if meta is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    return table


def read_eval_rows(path: Path | str, d_model: int) -> tuple[pd.DataFrame, dict]:
    """rows.parquet, validated, and its metadata (mu, train_mean_nrm, seeds, models, judge)."""
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    return validate(eval_rows_from_arrow(table), eval_rows_schema(d_model), path), meta


def eval_rows_from_arrow(table: pa_arrow.Table) -> pd.DataFrame:
    df = table.to_pandas()
    for col in LIST_TYPES:
        if col in df:
            df[col] = [list(v) for v in df[col]]
    return df
