"""Curation at paper scale: filter + selection of N annotated traces and three recipes; prints JSON.

    .venv/bin/python bench/curation.py [--traces 1800000] [--shards 64] [--keep DIR]

Generates (not timed) a store holding one source of N/4 samples x 4 rollouts: cot_traces with
realistic reasoning text (~2 KB of Zipf-distributed words in lines; 1% degenerate loops, 1%
repeated lines, 1% foreign script, 0.5% exact duplicate traces, 3% truncated, 1% errors),
annotations (judge scores, tags, pass rates), seed_pool (questions, image pHashes, 1% near
duplicates) and a benchmark of 1000 items, 50 of them copied from the seed pool. Then runs the
code the assets run - `curate_source` (rules, decontamination, selection) and `sample_subset`
for three recipes - and reports wall seconds, peak RSS, rows/s, and the floor measured in the
same run: DuckDB reading the same Parquet text column.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb  # noqa: E402

from omnithought_dagster.config import CurationConfig, RecipeConfig, RulesConfig, SelectionConfig  # noqa: E402
from omnithought_dagster.curation.curate import curate_source  # noqa: E402
from omnithought_dagster.curation.decontam import BenchmarkItem  # noqa: E402
from omnithought_dagster.curation.sampling import load_candidates, sample_subset  # noqa: E402
from omnithought_dagster.store import CorpusStore  # noqa: E402

LABELS = ["easy", "medium", "hard"]
TAGS = [
    "math/geometry",
    "math/arithmetic",
    "chart/bar",
    "chart/line",
    "table",
    "document/ocr",
    "counting",
    "spatial-relations",
    "science/physics",
    "natural-image",
    "logic-puzzle",
    "other",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=1_800_000)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--keep", type=Path, help="keep the generated store here (and reuse it if present)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp) / "store"
        generated = None
        if not (root / "tables" / "cot_traces").exists():
            generated = generate(root, args.traces, args.shards)
        store = CorpusStore(str(root))
        items = benchmark_items(store)
        report = run(store, items, args.traces)
        report["generate_s"] = generated
    print(json.dumps(report, indent=2))


def run(store: CorpusStore, items: list[BenchmarkItem], n: int) -> dict:
    curation = CurationConfig(
        rules=RulesConfig(min_quality=3, max_total_tokens=4096),
        selection=SelectionConfig(max_traces_per_sample=2, verbosity_targets={"easy": 3, "medium": 5, "hard": 7}),
    )
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    start = time.perf_counter()
    floor = con.execute(
        f"SELECT sum(length(reasoning)) FROM read_parquet('{store.path('tables', 'cot_traces')}/*/*/data.parquet')"
    ).fetchone()[0]
    floor_s = time.perf_counter() - start
    con.close()

    start = time.perf_counter()
    result = curate_source(store, "bench", curation, items)
    store.write_partition("filter_decisions", "bench", result.decisions)
    curate_s = time.perf_counter() - start
    recipes = [
        RecipeConfig(name="balanced", size=200_000, difficulty_mix={"easy": 1, "medium": 1, "hard": 1}, max_tag_share=0.2),
        RecipeConfig(
            name="hard-heavy",
            size=100_000,
            difficulty_mix={"medium": 0.3, "hard": 0.7},
            max_tag_share=0.25,
            verbosity_targets={"medium": 5, "hard": 8},
        ),
        RecipeConfig(
            name="small-diverse",
            size=20_000,
            difficulty_mix={"easy": 0.2, "medium": 0.4, "hard": 0.4},
            max_tag_share=0.1,
            traces_per_sample=1,
            seed=7,
        ),
    ]
    start = time.perf_counter()
    candidates = load_candidates(store, None)
    subsets = {}
    for recipe in recipes:
        subset = sample_subset(candidates, recipe)
        store.write_partition("subset_members", recipe.name, subset.members)
        subsets[recipe.name] = {"members": subset.members.num_rows, "shortfall": subset.shortfall}
    sample_s = time.perf_counter() - start
    kept = int(sum(result.decisions.column("kept").to_pylist()))
    total = curate_s + sample_s
    return {
        "benchmark": "curation",
        "traces": n,
        "text_bytes": int(floor),
        "floor_read_text_s": round(floor_s, 2),
        "filter_and_select_s": round(curate_s, 2),
        "filter_stages_s": {k: round(v, 2) for k, v in result.timings.items()},
        "recipes_s": round(sample_s, 2),
        "total_s": round(total, 2),
        "rows_per_s": round(n / total),
        "kept": kept,
        "reasons": dict(result.reason_counts.most_common()),
        "contaminated_samples": len(result.contamination),
        "subsets": subsets,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "target": {"total_s": 60, "peak_rss_mb": 4096},
    }


# -- data generation (not timed) ----------------------------------------------------------------------


def vocabulary() -> list[str]:
    """~4000 pronounceable words, repeated in a pool by Zipf frequency (like natural text)."""
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    words = []
    for n in (1, 2, 3):
        for combo in itertools.product(syllables, repeat=n):
            words.append("".join(combo))
            if len(words) >= 4000:
                break
    pool = []
    for rank, word in enumerate(words[:4000], start=1):
        pool += [word] * max(1, 12000 // rank)
    return pool


def generate(root: Path, n: int, shards: int) -> float:
    start = time.perf_counter()
    CorpusStore(str(root))
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    pool = vocabulary()
    con.execute("CREATE TABLE vocab AS SELECT $1::VARCHAR[] AS words", [pool])
    con.execute("CREATE TABLE tags AS SELECT $1::VARCHAR[] AS t", [TAGS])
    p, samples = len(pool), n // 4
    words = f"vocab.words[(hash(s, r, k) % {p})::INT + 1]"
    for shard in range(shards):
        key = f"{shard:03d}"
        base = f"""FROM range({shard}, {samples}, {shards}) a(s), range(4) b(r), vocab, tags"""
        text = (
            f"array_to_string(list_transform(range(500), lambda k: {words} || CASE WHEN k % 15 = 14 THEN '.' || chr(10) ELSE ' ' END), '')"
        )
        reasoning = f"""CASE
            WHEN hash(s, r, 'dup') % 200 = 0 AND r > 0 THEN array_to_string(list_transform(range(500),
                lambda k: vocab.words[(hash(s, 0, k) % {p})::INT + 1] || CASE WHEN k % 15 = 14 THEN '.' || chr(10) ELSE ' ' END), '')
            WHEN hash(s, r, 'loop') % 100 = 0 THEN {text} || repeat('so the answer is the same value again and again. ', 40)
            WHEN hash(s, r, 'lines') % 100 = 0 THEN repeat('We compute the value of the first bar again.' || chr(10), 30)
            WHEN hash(s, r, 'script') % 100 = 0 THEN {text} || repeat('这是一个非常长的中文推理过程。', 60)
            ELSE {text} END"""
        folder = root / "tables" / "cot_traces" / "source=bench" / f"shard={key}"
        folder.mkdir(parents=True, exist_ok=True)
        con.execute(f"""COPY (SELECT lpad(to_hex(hash(s, r, 'trace')), 32, '0') AS trace_id,
              lpad(to_hex(hash(s, 'sample')), 32, '0') AS sample_id,
              'bench' AS source, '{key}' AS shard, 'teacher' AS teacher, 'cot-v1' AS prompt_version, r::INT AS rollout,
              NULL::VARCHAR AS text, {reasoning} AS reasoning,
              CASE WHEN hash(s, r, 'noans') % 100 = 0 THEN NULL ELSE (hash(s, 'answer') % 100)::VARCHAR END AS final_answer,
              CASE WHEN hash(s, r, 'fin') % 100 < 3 THEN 'length'
                   WHEN hash(s, r, 'fin') % 100 = 3 THEN 'error' ELSE 'stop' END AS finish_reason,
              300::INT AS n_prompt_tokens, (200 + hash(s, r, 'tok') % 900)::INT AS n_tokens, 1.0::DOUBLE AS latency_s, 1::INT AS attempts,
              NULL::VARCHAR AS error {base}) TO '{folder}/data.parquet' (FORMAT parquet, COMPRESSION zstd)""")
        folder = root / "tables" / "annotations" / "source=bench" / f"shard={key}"
        folder.mkdir(parents=True, exist_ok=True)
        correct = "(hash(s, r, 'correct') % 100 < 30 + (hash(s, 'easy') % 60))"
        con.execute(f"""COPY (SELECT lpad(to_hex(hash(s, r, 'annotation')), 32, '0') AS annotation_id,
              lpad(to_hex(hash(s, r, 'trace')), 32, '0') AS trace_id,
              lpad(to_hex(hash(s, 'sample')), 32, '0') AS sample_id, 'bench' AS source, '{key}' AS shard, 'judge' AS annotator,
              'judge-v1' AS prompt_version,
              'tags-v1' AS taxonomy_version, {correct} AS correct, 'numeric' AS verify_method, NULL::VARCHAR AS extracted_answer,
              avg({correct}::INT) OVER (PARTITION BY s) AS pass_rate, 4::INT AS n_rollouts,
              (hash(s, 'difficulty') % 10)::INT AS difficulty, (hash(s, r, 'verbosity') % 10)::INT AS verbosity,
              (hash(s, r, 'quality') % 10)::INT AS quality,
              [tags.t[(hash(s, 'tag') % {len(TAGS)})::INT + 1]] AS tags, []::VARCHAR[] AS raw_tags, NULL::BOOLEAN AS judge_answer_correct,
              (hash(s, 'difficulty') % 10)::DOUBLE AS sample_difficulty, (hash(s, 'difficulty') % 10)::DOUBLE AS difficulty_score,
              CASE WHEN hash(s, 'difficulty') % 10 < 3.5 THEN 0 WHEN hash(s, 'difficulty') % 10 < 6.5 THEN 1 ELSE 2 END::INT
                AS difficulty_bin,
              ['easy', 'medium', 'hard'][CASE WHEN hash(s, 'difficulty') % 10 < 3.5 THEN 1
                                          WHEN hash(s, 'difficulty') % 10 < 6.5 THEN 2 ELSE 3 END]
                AS difficulty_label,
              'stop' AS finish_reason, 500::INT AS n_tokens, NULL::VARCHAR AS judge_reply,
              CASE WHEN hash(s, r, 'judgeerr') % 200 = 0 THEN 'unparsable judge reply' END AS judge_error
              {base}) TO '{folder}/data.parquet' (FORMAT parquet, COMPRESSION zstd)""")
    folder = root / "tables" / "seed_pool" / "source=bench"
    folder.mkdir(parents=True, exist_ok=True)
    # 1% of samples are near duplicates of the previous one (marked by the seed stage); half of those ask the same question.
    near = "(s > 10 AND hash(s, 'near') % 100 = 0)"
    qs = f"CASE WHEN {near} AND hash(s, 'same') % 2 = 0 THEN s - 1 ELSE s END"
    question = f"array_to_string(list_transform(range(18), lambda k: vocab.words[(hash({qs}, 'q', k) % {p})::INT + 1]), ' ') || '?'"
    con.execute(f"""COPY (SELECT lpad(to_hex(hash(s, 'sample')), 32, '0') AS sample_id, 'bench' AS source, s::VARCHAR AS native_id,
              s::BIGINT AS record_index,
          [lpad(to_hex(hash(s, 'image')), 32, '0')] AS image_ids, [lpad(to_hex(hash(s, 'phash')), 16, '0')] AS image_phashes,
          {question} AS question, (hash(s, 'answer') % 100)::VARCHAR AS answer, 'numeric' AS answer_type, []::VARCHAR[] AS choices,
          []::VARCHAR[] AS source_tags, NULL::INT AS source_difficulty, '{{}}' AS metadata,
          CASE WHEN {near} THEN lpad(to_hex(hash(s - 1, 'sample')), 32, '0') END AS near_duplicate_of,
          CASE WHEN {near} THEN 2 END::INT AS near_duplicate_distance
          FROM range({samples}) a(s), vocab) TO '{folder}/data.parquet' (FORMAT parquet, COMPRESSION zstd)""")
    con.close()
    return round(time.perf_counter() - start, 1)


def benchmark_items(store: CorpusStore) -> list[BenchmarkItem]:
    """1000 benchmark items: 950 unrelated, 25 with a seed sample's question, 25 with a seed sample's image."""
    rng = random.Random(0)
    seed = store.read_partition("seed_pool", "bench", ["sample_id", "question", "image_phashes"]).slice(0, 5000).to_pylist()
    items = [
        BenchmarkItem(
            "bench-eval", f"b{i}", f"unrelated benchmark question number {i} about {rng.random()}", (f"{rng.getrandbits(64):016x}",)
        )
        for i in range(950)
    ]
    items += [BenchmarkItem("bench-eval", f"q{i}", row["question"], (f"{rng.getrandbits(64):016x}",)) for i, row in enumerate(seed[:25])]
    items += [
        BenchmarkItem("bench-eval", f"i{i}", f"another question {i}", tuple(row["image_phashes"])) for i, row in enumerate(seed[100:125])
    ]
    return items


if __name__ == "__main__":
    main()
