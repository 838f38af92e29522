"""Seed-stage throughput on this machine; prints one JSON object.

    .venv/bin/python bench/seed_ingest.py [--samples 2000] [--hashes 1000000] [--rows 200000]

- synthetic: generate + validate + pHash + store images, records/s (one process);
- json_on_disk: the same images read back from files through the JSON reader, records/s;
- near_dup_index: the banded pHash index over N hashes (10% planted neighbours), seconds;
- store_write: one seed_pool partition of N rows to zstd Parquet, seconds and MB;
- peak_rss_mb: the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402

from omnithought_dagster.config import SeedSettings, parse_config  # noqa: E402
from omnithought_dagster.curation.near_dup import earliest_near_duplicates  # noqa: E402
from omnithought_dagster.curation.seed import ingest_source  # noqa: E402
from omnithought_dagster.sources import make_reader  # noqa: E402
from omnithought_dagster.sources.synthetic import SyntheticReader  # noqa: E402
from omnithought_dagster.store import CorpusStore  # noqa: E402
from omnithought_dagster.store.tables import SEED_POOL  # noqa: E402


def bench_synthetic(store: CorpusStore, n: int) -> dict:
    reader = SyntheticReader(n, seed=123)
    start = time.perf_counter()
    records = list(reader.records())
    generated = time.perf_counter() - start
    start = time.perf_counter()
    result = ingest_source("synthetic", records, SeedSettings(), image_root=None, put_image=store.images.put)
    ingested = time.perf_counter() - start
    return {
        "records": n,
        "generate_s": round(generated, 3),
        "ingest_s": round(ingested, 3),
        "records_per_s": round(n / (generated + ingested), 1),
        "ingest_records_per_s": round(n / ingested, 1),
        "kept": result.rows_kept,
        "near_duplicates": result.near_duplicates,
    }


def bench_json_on_disk(root: Path, n: int) -> dict:
    images = root / "imgs"
    images.mkdir(parents=True)
    records = []
    for record in SyntheticReader(n, seed=321).records():
        name = f"{record.native_id}.png"
        (images / name).write_bytes(record.images[0].data)
        records.append({"id": record.native_id, "question": record.question, "answer": record.answer,
                        "choices": record.choices, "image": name})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    source = parse_config({"sources": [{"name": "disk", "kind": "json", "path": str(root / "data.jsonl"),
                                        "image_root": str(images)}]}, base_dir=root).sources[0]
    reader = make_reader(source)
    start = time.perf_counter()
    result = ingest_source("disk", reader.records(), SeedSettings(), image_root=reader.image_root, put_image=lambda i, d: True)
    elapsed = time.perf_counter() - start
    return {"records": n, "seconds": round(elapsed, 3), "records_per_s": round(n / elapsed, 1), "kept": result.rows_kept}


def bench_near_dup(n: int) -> dict:
    rng = random.Random(0)
    hashes = []
    for i in range(n):
        if hashes and rng.random() < 0.1:
            h = hashes[rng.randrange(len(hashes))]
            for _ in range(rng.randint(0, 6)):
                h ^= 1 << rng.randrange(64)
            hashes.append(h)
        else:
            hashes.append(rng.getrandbits(64))
    start = time.perf_counter()
    matches = earliest_near_duplicates(hashes, list(range(n)), 4)
    return {"hashes": n, "max_distance": 4, "seconds": round(time.perf_counter() - start, 3), "marked": len(matches)}


def bench_store_write(store: CorpusStore, rows: int) -> dict:
    rng = random.Random(1)
    question = "How many red circles are in the image? Answer with a number. " * 3
    table = pa.table({
        "sample_id": [f"{rng.getrandbits(128):032x}" for _ in range(rows)],
        "source": ["bench"] * rows,
        "native_id": [f"n{i}" for i in range(rows)],
        "record_index": list(range(rows)),
        "image_ids": [[f"{rng.getrandbits(128):032x}"] for _ in range(rows)],
        "image_phashes": [[f"{rng.getrandbits(64):016x}"] for _ in range(rows)],
        "question": [question] * rows,
        "answer": [str(i % 97) for i in range(rows)],
        "answer_type": ["numeric"] * rows,
        "choices": [[] for _ in range(rows)],
        "source_tags": [["counting"]] * rows,
        "source_difficulty": [i % 3 + 1 for i in range(rows)],
        "metadata": ["{}"] * rows,
        "near_duplicate_of": [None] * rows,
        "near_duplicate_distance": [None] * rows,
    }).cast(SEED_POOL.schema)
    start = time.perf_counter()
    written = store.write_partition("seed_pool", "bench", table)
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    count = store.catalog(["seed_pool"]).execute("SELECT count(DISTINCT sample_id) FROM seed_pool").fetchone()[0]
    return {"rows": rows, "write_s": round(write_s, 3), "mb": round(written.bytes / 1e6, 2),
            "duckdb_distinct_ids_s": round(time.perf_counter() - start, 3), "distinct": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = CorpusStore(str(Path(tmp) / "store"))
        report = {
            "benchmark": "seed_ingest",
            "synthetic": bench_synthetic(store, args.samples),
            "json_on_disk": bench_json_on_disk(Path(tmp) / "json", args.samples),
            "near_dup_index": bench_near_dup(args.hashes),
            "store_write": bench_store_write(store, args.rows),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
