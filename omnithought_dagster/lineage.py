"""Lineage of one id through the store: where a sample came from, its images, its fate.

Works on the DuckDB catalog only (no Dagster), so the CLI, tests and later stages share it.
Ids are content hashes; a unique prefix (at least MIN_PREFIX hex characters) is accepted like
a short git hash, and so is a source's own record id written `SOURCE/NATIVE_ID`.
"""

from __future__ import annotations

import re
from typing import Any

from omnithought_dagster.store import CorpusStore

MIN_PREFIX = 6
_HEX = re.compile(r"^[0-9a-f]+$")


class LineageError(LookupError):
    """The id is unknown or ambiguous; the message says which."""


def lineage(store: CorpusStore, ident: str) -> dict[str, Any]:
    """The story of a sample or an image, as a JSON-ready dict with a `kind` field."""
    con = store.catalog()
    ident = ident.strip()
    kind, resolved = _resolve(con, ident)
    if kind == "image":
        return _image_story(store, con, resolved)
    if kind == "trace":
        return _trace_story(store, con, resolved)
    if kind == "checkpoint":
        return checkpoint_story(store, con, resolved)
    return _sample_story(store, con, resolved)


def _resolve(con, ident: str) -> tuple[str, str]:
    if "/" in ident:
        source, native_id = ident.split("/", 1)
        rows = con.execute(
            "SELECT DISTINCT sample_id FROM seed_pool WHERE source = $1 AND native_id = $2 "
            "UNION SELECT DISTINCT coalesce(sample_id, 'quarantine:' || source || '/' || record_index) "
            "FROM quarantine WHERE source = $1 AND native_id = $2",
            [source, native_id],
        ).fetchall()
        if not rows:
            raise LineageError(f"no record {native_id!r} in source {source!r}")
        if len(rows) > 1:
            raise LineageError(f"{ident} names {len(rows)} records: {sorted(r[0] for r in rows)}")
        return "sample", rows[0][0]
    if not _HEX.match(ident) or len(ident) < MIN_PREFIX:
        raise LineageError(f"{ident!r} is not an id (32 hex characters, or a unique prefix of at least {MIN_PREFIX}) nor SOURCE/NATIVE_ID")
    pattern = ident + "%"
    matches = con.execute(
        "SELECT 'sample' AS kind, sample_id AS id FROM seed_pool WHERE sample_id LIKE $1 "
        "UNION SELECT 'sample', sample_id FROM quarantine WHERE sample_id LIKE $1 "
        "UNION SELECT 'image', image_id FROM images WHERE image_id LIKE $1 "
        "UNION SELECT 'trace', trace_id FROM cot_traces WHERE trace_id LIKE $1 "
        "UNION SELECT 'checkpoint', checkpoint_id FROM student_checkpoints WHERE checkpoint_id LIKE $1",
        [pattern],
    ).fetchall()
    if not matches:
        raise LineageError(f"no sample, image, trace or checkpoint id starts with {ident!r}")
    if len(matches) > 1:
        raise LineageError(f"{ident!r} is ambiguous: {sorted(f'{k} {i}' for k, i in matches)}")
    return matches[0]


def _sample_story(store: CorpusStore, con, sample: str) -> dict[str, Any]:
    if sample.startswith("quarantine:"):
        source, index = sample[len("quarantine:") :].rsplit("/", 1)
        rows = _dicts(con, "SELECT * FROM quarantine WHERE source = $1 AND record_index = $2", [source, int(index)])
        return {"kind": "sample", "sample_id": None, "status": "quarantined", "kept": None, "quarantine": rows, "images": []}
    kept = _dicts(con, "SELECT * FROM seed_pool WHERE sample_id = $1 ORDER BY source, record_index", [sample])
    quarantined = _dicts(con, "SELECT * FROM quarantine WHERE sample_id = $1 ORDER BY source, record_index", [sample])
    record = kept[0] if kept else None
    story: dict[str, Any] = {
        "kind": "sample",
        "sample_id": sample,
        "status": "kept" if record else "quarantined",
        "kept": record,
        "also_kept_by": [f"{r['source']}/{r['native_id']}" for r in kept[1:]],
        "quarantine": quarantined,
        "images": [],
        "near_duplicate_of": None,
        "traces": _traces_of(con, sample),
        "checkpoints": _dicts(
            con,
            "SELECT DISTINCT c.checkpoint_id, c.student, c.recipe, m.trace_id FROM subset_members m "
            "JOIN student_checkpoints c ON c.recipe = m.subset AND c.subset_version = m.subset_version "
            "WHERE m.sample_id = $1 ORDER BY c.student, c.recipe, m.trace_id",
            [sample],
        ),
    }
    if record is None:
        return story
    for image_id in record["image_ids"]:
        meta = _dicts(con, "SELECT width, height, format, mode, n_bytes, phash FROM images WHERE image_id = $1 LIMIT 1", [image_id])
        story["images"].append(
            {
                "image_id": image_id,
                "uri": store.images.uri(image_id),
                "in_store": store.images.exists(image_id),
                **(meta[0] if meta else {}),
            }
        )
    if record["near_duplicate_of"]:
        other = _dicts(
            con, "SELECT sample_id, source, native_id, question FROM seed_pool WHERE sample_id = $1 LIMIT 1", [record["near_duplicate_of"]]
        )
        story["near_duplicate_of"] = {
            "distance": record["near_duplicate_distance"],
            **(other[0] if other else {"sample_id": record["near_duplicate_of"]}),
        }
    return story


ANNOTATION_FIELDS = [
    "annotator",
    "correct",
    "verify_method",
    "extracted_answer",
    "pass_rate",
    "difficulty",
    "verbosity",
    "quality",
    "tags",
    "difficulty_score",
    "difficulty_label",
    "judge_error",
]


def _traces_of(con, sample: str) -> list[dict[str, Any]]:
    """The sample's traces, each with its annotation (None when not annotated yet)."""
    fields = ", ".join(f"a.{f} AS a_{f}" for f in ANNOTATION_FIELDS)
    rows = _dicts(
        con,
        "SELECT t.trace_id, t.teacher, t.prompt_version, t.rollout, t.finish_reason, t.final_answer, t.n_tokens, t.error, "
        f"a.annotation_id, {fields} FROM cot_traces t LEFT JOIN annotations a USING (trace_id) "
        "WHERE t.sample_id = $1 ORDER BY t.teacher, t.rollout",
        [sample],
    )
    verdicts = {
        r["trace_id"]: {"kept": r["kept"], "reasons": r["reasons"], "duplicate_of": r["duplicate_of"]}
        for r in _dicts(con, "SELECT trace_id, kept, reasons, duplicate_of FROM filter_decisions WHERE sample_id = $1", [sample])
    }
    subsets: dict[str, list[str]] = {}
    for r in _dicts(con, "SELECT trace_id, subset FROM subset_members WHERE sample_id = $1 ORDER BY subset", [sample]):
        subsets.setdefault(r["trace_id"], []).append(r["subset"])
    traces = []
    for row in rows:
        annotation = {f: row.pop(f"a_{f}") for f in ANNOTATION_FIELDS}
        traces.append(
            {
                **row,
                "annotation": annotation if row["annotation_id"] else None,
                "verdict": verdicts.get(row["trace_id"]),
                "subsets": subsets.get(row["trace_id"], []),
            }
        )
    return traces


def subset_summary(store: CorpusStore, subset: str) -> dict[str, Any]:
    """What went into a subset: size, version, and counts by difficulty, primary tag and source."""
    con = store.catalog()
    head = _dicts(
        con,
        "SELECT any_value(subset_version) AS version, count(*) AS members, count(DISTINCT sample_id) AS samples "
        "FROM subset_members WHERE subset = $1",
        [subset],
    )[0]
    if not head["members"]:
        raise LineageError(f"no subset named {subset!r} in the store")

    def by(expression: str) -> dict[str, int]:
        return _member_counts(con, expression, "count(*)", "m.subset = $1", [subset])

    return {
        "kind": "subset",
        "subset": subset,
        "subset_version": head["version"],
        "members": head["members"],
        "samples": head["samples"],
        "by_difficulty": by(BY_DIFFICULTY),
        "by_tag": by(BY_TAG),
        "by_source": by("m.source"),
    }


BY_DIFFICULTY = "coalesce(d.difficulty_label, 'unknown')"
BY_TAG = "coalesce(d.tags[1], 'untagged')"


def _member_counts(con, expression: str, count: str, where: str, params: list) -> dict[str, int]:
    """Subset members (joined with their verdicts) counted by an expression, largest first."""
    rows = con.execute(
        f"SELECT {expression} AS k, {count} FROM subset_members m LEFT JOIN filter_decisions d USING (trace_id) "
        f"WHERE {where} GROUP BY 1 ORDER BY 2 DESC, 1",
        params,
    ).fetchall()
    return {str(k): n for k, n in rows}


def checkpoint_story(store: CorpusStore, con, checkpoint: str) -> dict[str, Any]:
    """What trained a checkpoint (subset version, recipe, settings; samples by source, tag, difficulty) and its scores."""
    from omnithought_dagster.train.launch import method_identity  # the config's models: only when a checkpoint is asked for

    (row,) = _dicts(con, "SELECT * FROM student_checkpoints WHERE checkpoint_id = $1 LIMIT 1", [checkpoint])
    manifest = None if row["baseline"] else store.checkpoints.manifest(checkpoint)
    story: dict[str, Any] = {
        "kind": "checkpoint",
        "checkpoint_id": checkpoint,
        "checkpoint": row,
        "training": (manifest or {}).get("train_spec", {}).get("training"),
        "trained_on": None,
        "method": method_identity(manifest["train_spec"].get("method")) if manifest else None,
        "scores": _dicts(
            con,
            "SELECT benchmark, metric, slice, score, n, baseline_score, delta, eval_config_hash "
            "FROM benchmark_scores WHERE checkpoint_id = $1 ORDER BY benchmark, slice = 'all' DESC, slice",
            [checkpoint],
        ),
    }
    if row["baseline"]:
        return story
    where = "m.subset = $1 AND m.subset_version = $2"
    params = [row["recipe"], row["subset_version"]]

    def by(expression: str) -> dict[str, int]:
        return _member_counts(con, expression, "count(DISTINCT m.sample_id)", where, params)

    traces, samples = con.execute(f"SELECT count(*), count(DISTINCT m.sample_id) FROM subset_members m WHERE {where}", params).fetchall()[0]
    story["trained_on"] = {
        "subset": row["recipe"],
        "subset_version": row["subset_version"],
        "traces": traces,
        "samples": samples,
        "in_store": traces > 0,
        "samples_by_source": by("m.source"),
        "samples_by_tag": by(BY_TAG),
        "samples_by_difficulty": by(BY_DIFFICULTY),
    }
    return story


def _trace_story(store: CorpusStore, con, trace: str) -> dict[str, Any]:
    (row,) = _dicts(con, "SELECT * FROM cot_traces WHERE trace_id = $1", [trace])
    sample = _sample_story(store, con, row["sample_id"])
    annotation = _dicts(con, "SELECT * FROM annotations WHERE trace_id = $1", [trace])
    return {
        "kind": "trace",
        "trace_id": trace,
        "trace": row,
        "annotation": annotation[0] if annotation else None,
        "sample": {k: sample[k] for k in ("sample_id", "status", "kept", "images")},
    }


def _image_story(store: CorpusStore, con, image_id: str) -> dict[str, Any]:
    meta = _dicts(
        con,
        "SELECT width, height, format, mode, n_bytes, phash, list(DISTINCT source) AS sources FROM images WHERE image_id = $1 GROUP BY ALL",
        [image_id],
    )
    used_by = _dicts(
        con,
        "SELECT sample_id, source, native_id FROM seed_pool WHERE list_contains(image_ids, $1) ORDER BY source, record_index",
        [image_id],
    )
    return {
        "kind": "image",
        "image_id": image_id,
        "uri": store.images.uri(image_id),
        "in_store": store.images.exists(image_id),
        **(meta[0] if meta else {}),
        "used_by": used_by,
    }


def _dicts(con, sql: str, params: list) -> list[dict[str, Any]]:
    cursor = con.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
