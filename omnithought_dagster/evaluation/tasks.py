"""A configured benchmark written as a local lmms-eval task: Parquet with an Image feature, YAML, utils.py.

lmms-eval loads it with `--include_path <folder>` and no hub: `dataset_path: parquet` with
`data_files` pointing at the file. The items are read and validated like a seed source (the
same readers and normalisation), so an item's id is the sample_id the decontamination filter
compares against, and its tag is the source's ground-truth tag when it has one.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from omnithought_dagster.ids import content_id

TASK_PREFIX = "omnithought_"
TASK_VERSION = 1


@dataclass(frozen=True)
class LocalTask:
    benchmark: str
    name: str  # the lmms-eval task name
    folder: Path
    n_items: int
    items_version: str  # hash of the item ids: the benchmark's identity in eval_config_hash


def task_name(benchmark: str) -> str:
    return TASK_PREFIX + re.sub(r"[^0-9a-zA-Z_]", "_", benchmark)


def write_local_task(spec, seed_settings, folder: str | Path, *, max_new_tokens: int) -> LocalTask:
    """Read a benchmark source and write it as an lmms-eval task into `folder` (replaced)."""
    import datasets

    datasets.disable_progress_bars()  # its bar would land in the step's output
    rows, images = read_items(spec, seed_settings)
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    features = datasets.Features(
        {
            "doc_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.Value("string"),
            "answer_type": datasets.Value("string"),
            "tag": datasets.Value("string"),
            "difficulty": datasets.Value("int32"),
            "images": datasets.Sequence(datasets.Image()),
        }
    )
    data = {
        "doc_id": [r["sample_id"] for r in rows],
        "question": [r["question"] for r in rows],
        "choices": [list(r["choices"]) for r in rows],
        "answer": [r["answer"] for r in rows],
        "answer_type": [r["answer_type"] for r in rows],
        "tag": [(r["source_tags"] or ["untagged"])[0] for r in rows],
        "difficulty": [r["source_difficulty"] for r in rows],
        "images": [[{"bytes": images[i], "path": None} for i in r["image_ids"]] for r in rows],
    }
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(folder / "data.parquet"))
    name = task_name(spec.name)
    document = {
        "task": name,
        "dataset_path": "parquet",
        "dataset_kwargs": {"data_files": {"test": str((folder / "data.parquet").resolve())}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_visual": "!function utils.doc_to_visual",
        "doc_to_text": "!function utils.doc_to_text",
        "doc_to_target": "!function utils.doc_to_target",
        "process_results": "!function utils.process_results",
        "generation_kwargs": {"max_new_tokens": max_new_tokens, "temperature": 0, "do_sample": False},
        "metric_list": [{"metric": "accuracy", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": TASK_VERSION, "omnithought_benchmark": spec.name},
    }
    text = yaml.safe_dump(document, sort_keys=False)
    text = re.sub(r"'(!function [^']+)'", r"\1", text)  # the tag lmms-eval resolves, not a string
    (folder / f"{name}.yaml").write_text(text)
    shutil.copy(Path(__file__).with_name("task_utils.py"), folder / "utils.py")
    return LocalTask(spec.name, name, folder, len(rows), items_version(rows))


def read_items(spec, seed_settings) -> tuple[list[dict], dict[str, bytes]]:
    """A benchmark's usable items (normalised like seed rows) and their image bytes by image id."""
    from omnithought_dagster.seed.ingest import ingest_source
    from omnithought_dagster.seed.sources import make_reader

    images: dict[str, bytes] = {}

    def keep_image(image_id: str, data: bytes) -> bool:
        images[image_id] = data
        return True

    reader = make_reader(spec)
    result = ingest_source(
        spec.name,
        reader.records(),
        seed_settings.model_copy(update={"near_duplicate_max_distance": -1}),
        image_root=reader.image_root,
        put_image=keep_image,
    )
    rows = result.kept.to_pylist()
    if not rows:
        raise ValueError(f"benchmark {spec.name!r} has no usable items ({result.quarantine.num_rows} quarantined)")
    return rows, images


def items_version(rows: list[dict]) -> str:
    """The benchmark's identity in eval_config_hash: its item ids and answers, and the task format."""
    return content_id(
        "benchmark-items", {"ids": [r["sample_id"] for r in rows], "answers": [r["answer"] for r in rows], "task_version": TASK_VERSION}
    )
