"""Seed-stage throughput on this machine; prints one JSON object.

    .venv/bin/python bench/seed_ingest.py [--samples 4000] [--hashes 1000000] [--rows 200000] [--rounds 3]

- parallel (the target): N synthetic 320 px PNGs on disk ingested end to end - JSON reader, checks, images
  into a real store, the three partitions streamed to Parquet - with 1 worker and with one per core, against
  the floor measured in the same run: one process doing nothing but read the file, PIL-decode it, pHash it
  (imagehash) and BLAKE2b it. Rounds are interleaved (floor, 1 worker, all cores) and medians reported;
  `ratio_to_floor_x_cores` = all-cores records/s / (floor records/s x cores), target >= 0.8, end to end and
  `steady_` between the first and last progress marks (every 1000 records: what a corpus-size source sees,
  without the second or so a step spends starting its workers and writing its last rows); the same with the
  image bytes written to the store, against a floor that writes them too;
- memory: peak RSS of one process ingesting N and 4N text-heavy records (2 KB questions) streamed to
  partition files, against the same records collected in memory (what the asset did before): the growth
  per record shows what stays in memory;
- synthetic: generate + validate + pHash + store images, records/s (one process);
- near_dup_index: the banded pHash index over N hashes (10% planted neighbours), seconds;
- store_write: one seed_pool partition of N rows to zstd Parquet, seconds and MB;
- peak_rss_mb: the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
from discard import discard_image  # noqa: E402 - bench/ is on sys.path as the script's folder

from omnithought_dagster.config import SeedSettings, parse_config  # noqa: E402
from omnithought_dagster.processes import available_cores  # noqa: E402
from omnithought_dagster.seed.ingest import ingest_source, ingest_source_into  # noqa: E402
from omnithought_dagster.seed.near_dup import earliest_near_duplicates  # noqa: E402
from omnithought_dagster.seed.sinks import SeedSinks  # noqa: E402
from omnithought_dagster.seed.sources import make_reader  # noqa: E402
from omnithought_dagster.seed.sources.synthetic import SyntheticReader  # noqa: E402
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


def write_json_source(root: Path, n: int) -> tuple[Path, Path, list[str]]:
    """N synthetic records as JSONL with their 320 px PNGs as files (not timed); the image file names."""
    images = root / "imgs"
    images.mkdir(parents=True)
    names, lines = [], []
    for record in SyntheticReader(n, seed=321).records():
        name = f"{record.native_id}.png"
        (images / name).write_bytes(record.images[0].data)
        names.append(name)
        lines.append(
            json.dumps(
                {"id": record.native_id, "question": record.question, "answer": record.answer, "choices": record.choices, "image": name}
            )
        )
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root / "data.jsonl", images, names


def floor_records_per_s(images: Path, names: list[str], store_root: Path | None = None) -> float:
    """The one-process floor: read, decode, pHash, BLAKE2b - nothing else; with a store, also the store's write of the bytes."""
    import imagehash
    from PIL import Image

    put = CorpusStore(str(store_root)).images.put if store_root else None
    start = time.perf_counter()
    for name in names:
        data = (images / name).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            imagehash.phash(image)
        image_id = hashlib.blake2b(data, digest_size=16).hexdigest()
        if put:
            put(image_id, data)
    rate = len(names) / (time.perf_counter() - start)
    if store_root:
        shutil.rmtree(store_root)
    return rate


def ingest_records_per_s(data: Path, images: Path, store_root: Path, workers: int, store_images: bool) -> tuple[float, int]:
    """The seed stage end to end into a fresh store, as the asset runs it (image bytes stored, or not)."""
    source = parse_config(
        {"sources": [{"name": "disk", "kind": "json", "path": str(data), "image_root": str(images)}]}, base_dir=data.parent
    ).sources[0]
    store = CorpusStore(str(store_root))
    reader = make_reader(source)
    marks: list[tuple[int, float]] = []
    start, cpu = time.perf_counter(), time.process_time()
    with (
        store.partition_writer("seed_pool", "disk") as kept,
        store.partition_writer("quarantine", "disk") as quarantine,
        store.partition_writer("images", "disk") as stored,
    ):
        result = ingest_source_into(
            "disk",
            reader.records(),
            SeedSettings(),
            image_root=reader.image_root,
            put_image=store.images.put if store_images else discard_image,
            sinks=SeedSinks(kept, quarantine, stored),
            workers=workers,
            progress=lambda done: marks.append((done, time.perf_counter())),
        )
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    shutil.rmtree(store_root)
    MAIN_CPU.setdefault(workers, []).append(cpu / result.rows_read)
    # Between the first and the last progress mark (every 1000 records): the rate once the workers run, without the
    # fixed costs of a step (starting the processes, the last flush, near-duplicate marks) that a large source amortises.
    (first, t_first), (last, t_last) = marks[0], marks[-1]
    STEADY.setdefault((workers, store_images), []).append((last - first) / (t_last - t_first))
    return result.rows_read / elapsed, result.rows_kept


MAIN_CPU: dict[int, list[float]] = {}  # the step's own CPU seconds per record, by worker count
STEADY: dict[tuple[int, bool], list[float]] = {}  # records/s between the first and the last progress mark


def bench_parallel(root: Path, n: int, rounds: int) -> dict:
    data, images, names = write_json_source(root, n)
    cores = available_cores()
    ingest_records_per_s(data, images, root / "warm", 1, True)  # imports and page cache, as in a running step
    runs: dict[str, list[float]] = {}
    for _ in range(rounds):  # interleaved, so a noisy neighbour hits every variant alike
        for name, run in [
            ("floor", lambda: floor_records_per_s(images, names)),
            ("one_worker", lambda: ingest_records_per_s(data, images, root / "s", 1, False)[0]),
            ("all_cores", lambda: ingest_records_per_s(data, images, root / "s", cores, False)[0]),
            ("floor_with_store", lambda: floor_records_per_s(images, names, root / "s")),
            ("one_worker_with_store", lambda: ingest_records_per_s(data, images, root / "s", 1, True)[0]),
            ("all_cores_with_store", lambda: ingest_records_per_s(data, images, root / "s", cores, True)[0]),
        ]:
            runs.setdefault(name, []).append(run())
    rate = {name: statistics.median(values) for name, values in runs.items()}
    return {
        "records": n,
        "cores": cores,
        "rounds": rounds,
        "records_per_s": {name: round(value, 1) for name, value in rate.items()},
        "ratio_to_floor_x_cores": round(rate["all_cores"] / (rate["floor"] * cores), 3),
        "steady_records_per_s": {
            "one_worker": round(statistics.median(STEADY[1, False])),
            "all_cores": round(statistics.median(STEADY[cores, False])),
            "all_cores_with_store": round(statistics.median(STEADY[cores, True])),
        },
        "steady_ratio_to_floor_x_cores": round(statistics.median(STEADY[cores, False]) / (rate["floor"] * cores), 3),
        "steady_with_store_ratio_to_floor_with_store_x_cores": round(
            statistics.median(STEADY[cores, True]) / (rate["floor_with_store"] * cores), 3
        ),
        "target_ratio_to_floor_x_cores": 0.8,
        "one_worker_ratio_to_floor": round(rate["one_worker"] / rate["floor"], 3),
        "speedup_all_cores_vs_one": round(rate["all_cores"] / rate["one_worker"], 2),
        "with_store_ratio_to_floor_with_store_x_cores": round(rate["all_cores_with_store"] / (rate["floor_with_store"] * cores), 3),
        "with_store_speedup_all_cores_vs_one": round(rate["all_cores_with_store"] / rate["one_worker_with_store"], 2),
        # The step's process reads, merges and writes for every worker (and checks the first batches itself while they
        # start): its CPU per record bounds how many cores one source can keep busy.
        "step_process_ms_per_record_all_cores": round(1000 * statistics.median(MAIN_CPU[cores]), 3),
        "cores_one_step_process_can_feed": round(statistics.median(MAIN_CPU[1]) / statistics.median(MAIN_CPU[cores])),
        "samples": {name: [round(v) for v in values] for name, values in runs.items()},
    }


def bench_memory(root: Path, n: int) -> dict:
    """Peak RSS of a fresh process ingesting N and 4N text-heavy records (written here, not in the probe), streamed to
    partition files vs collected in memory; the growth per record is what the ingestion keeps."""
    out: dict = {"records": [n, 4 * n], "question_chars": MEMORY_QUESTION_CHARS}
    sources = {count: write_text_heavy_source(root / f"src{count}", count) for count in (n, 4 * n)}
    for mode in ("streamed", "collected"):
        peaks, growth = [], []
        for data in sources.values():
            run = subprocess.run(
                [sys.executable, __file__, "--memory-probe", str(data), "--probe-mode", mode], check=True, capture_output=True, text=True
            )
            probe = json.loads(run.stdout)
            peaks.append(probe["peak_rss_mb"])
            growth.append(probe["growth_mb"])
        out[f"{mode}_peak_rss_mb"] = peaks
        out[f"{mode}_resident_growth_mb"] = growth
        out[f"{mode}_bytes_per_record"] = round((growth[1] - growth[0]) * 2**20 / (3 * n))
        out[f"{mode}_projected_growth_mb_at_1_8m_records"] = round(out[f"{mode}_bytes_per_record"] * 1.8e6 / 2**20)
    out["streamed_growth_over_collected"] = round(out["streamed_bytes_per_record"] / out["collected_bytes_per_record"], 3)
    return out


MEMORY_QUESTION_CHARS = 2000


def write_text_heavy_source(root: Path, n: int) -> Path:
    """N records of ~2 KB questions sharing one small image (decoding is not what this measures)."""
    root.mkdir(parents=True)
    (root / "x.png").write_bytes(next(iter(SyntheticReader(1, seed=5, image_size=128).records())).images[0].data)
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor ".split()
    rng = random.Random(n)
    with open(root / "data.jsonl", "w") as out:
        for i in range(n):
            text = " ".join(rng.choice(words) for _ in range(MEMORY_QUESTION_CHARS // 6))
            out.write(json.dumps({"id": f"m{i}", "question": f"Question {i}: {text}?", "answer": str(i % 7), "image": "x.png"}) + "\n")
    return root / "data.jsonl"


def memory_probe(data: Path, mode: str) -> None:
    source = parse_config({"sources": [{"name": "disk", "kind": "json", "path": str(data)}]}, base_dir=data.parent).sources[0]
    with tempfile.TemporaryDirectory() as tmp:
        store = CorpusStore(str(Path(tmp) / "store"))
        reader = make_reader(source)
        settings = SeedSettings(near_duplicate_max_distance=-1)  # one image for all: every row would be a near duplicate
        ingest_source("warm", iter([]), settings, image_root=None, put_image=store.images.put)  # imports, before the baseline
        before = _resident_mb()
        if mode == "streamed":
            with (
                store.partition_writer("seed_pool", "disk") as kept,
                store.partition_writer("quarantine", "disk") as quarantine,
                store.partition_writer("images", "disk") as stored,
            ):
                ingest_source_into(
                    "disk",
                    reader.records(),
                    settings,
                    image_root=reader.image_root,
                    put_image=store.images.put,
                    sinks=SeedSinks(kept, quarantine, stored),
                )
        else:
            result = ingest_source("disk", reader.records(), settings, image_root=reader.image_root, put_image=store.images.put)
            store.write_partition("seed_pool", "disk", result.kept)
    print(
        json.dumps(
            {
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "growth_mb": round(_resident_mb() - before, 1),
            }
        )
    )


def _resident_mb() -> float:
    """Resident memory now (Python seldom hands memory back, so after a run this is what the run kept at its peak)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def bench_near_dup(n: int) -> dict:
    rng = random.Random(0)
    hashes = []
    for _ in range(n):
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
    table = (
        pa.table(
            {
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
                "turn": [None] * rows,
            }
        )
        .select(SEED_POOL.column_names)
        .cast(SEED_POOL.schema)
    )
    start = time.perf_counter()
    written = store.write_partition("seed_pool", "bench", table)
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    count = store.catalog(["seed_pool"]).execute("SELECT count(DISTINCT sample_id) FROM seed_pool").fetchone()[0]
    return {
        "rows": rows,
        "write_s": round(write_s, 3),
        "mb": round(written.bytes / 1e6, 2),
        "duckdb_distinct_ids_s": round(time.perf_counter() - start, 3),
        "distinct": count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-records", type=int, default=10_000)
    parser.add_argument("--memory-probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe, args.probe_mode)
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = CorpusStore(str(Path(tmp) / "store"))
        report = {
            "benchmark": "seed_ingest",
            "parallel": bench_parallel(Path(tmp) / "parallel", args.samples, args.rounds),
            "memory": bench_memory(Path(tmp) / "memory", args.memory_records),
            "synthetic": bench_synthetic(store, args.samples),
            "near_dup_index": bench_near_dup(args.hashes),
            "store_write": bench_store_write(store, args.rows),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
