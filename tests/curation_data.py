"""A small store with seed_pool, cot_traces and annotations written directly, for curation tests.

Every trace starts clean (correct, sound, long enough, no loops) and a test changes exactly the
fields it wants to trip a rule with.
"""

from __future__ import annotations

import pyarrow as pa

from omnithought_dagster.config import SeedSettings
from omnithought_dagster.ids import content_id
from omnithought_dagster.seed.ingest import ingest_source
from omnithought_dagster.seed.sources.synthetic import SyntheticReader
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.store.tables import ANNOTATIONS, COT_TRACES

WORDS = "we read the chart carefully then compare each value with the others and add the two largest numbers".split()


def reasoning_text(seed: int, lines: int = 8) -> str:
    """Varied lines of plain English words (no repeats, no loop, ASCII)."""
    return "\n".join(
        " ".join(WORDS[(seed * 7 + line * 3 + k) % len(WORDS)] for k in range(12)) + f" step {seed}-{line}." for line in range(lines)
    )


def build_store(
    root,
    n_samples: int = 12,
    source: str = "synthetic",
    seed: int = 0,
    labels=("easy", "medium", "hard"),
    tags=("counting", "chart/bar", "table", "math/geometry"),
    reasoning=None,
) -> tuple[CorpusStore, list[dict], list[dict], list[dict]]:
    """Seed (real synthetic images), 4 clean rollouts per sample, annotations; returns (store, seed, traces, annotations).
    `reasoning(i)` writes the i-th trace's reasoning (default: reasoning_text)."""
    store = root if isinstance(root, CorpusStore) else CorpusStore(str(root))
    result = ingest_source(
        source,
        SyntheticReader(n_samples, seed=seed).records(),
        SeedSettings(near_duplicate_max_distance=-1),
        image_root=None,
        put_image=store.images.put,
    )
    store.write_partition("seed_pool", source, result.kept)
    store.write_partition("images", source, result.images)
    seeds = result.kept.to_pylist()
    traces, annotations = [], []
    for s_index, sample in enumerate(seeds):
        for rollout in range(4):
            trace_id = content_id("test-trace", [sample["sample_id"], rollout])
            traces.append(
                {
                    "trace_id": trace_id,
                    "sample_id": sample["sample_id"],
                    "source": source,
                    "shard": "000",
                    "teacher": "t",
                    "prompt_version": "cot-v1",
                    "rollout": rollout,
                    "text": None,
                    "reasoning": (reasoning or reasoning_text)(s_index * 4 + rollout),
                    "final_answer": sample["answer"],
                    "finish_reason": "stop",
                    "n_prompt_tokens": 200,
                    "n_tokens": 120,
                    "latency_s": 0.1,
                    "attempts": 1,
                    "error": None,
                }
            )
            label = labels[s_index % len(labels)]
            annotations.append(
                {
                    "annotation_id": content_id("test-annotation", trace_id),
                    "trace_id": trace_id,
                    "sample_id": sample["sample_id"],
                    "source": source,
                    "shard": "000",
                    "annotator": "j",
                    "prompt_version": "judge-v1",
                    "taxonomy_version": "tags-v1",
                    "correct": True,
                    "verify_method": "numeric",
                    "extracted_answer": sample["answer"],
                    "pass_rate": 0.75,
                    "n_rollouts": 4,
                    "difficulty": 5,
                    "verbosity": 3 + rollout,
                    "quality": 6 + rollout % 3,
                    "tags": [tags[s_index % len(tags)]],
                    "raw_tags": [],
                    "judge_answer_correct": True,
                    "sample_difficulty": 5.0,
                    "difficulty_score": 5.0,
                    "difficulty_bin": list(labels).index(label),
                    "difficulty_label": label,
                    "finish_reason": "stop",
                    "n_tokens": 120,
                    "judge_reply": "{}",
                    "judge_error": None,
                }
            )
    write_traces(store, source, traces, annotations)
    return store, seeds, traces, annotations


def write_traces(store: CorpusStore, source: str, traces: list[dict], annotations: list[dict]) -> None:
    partition = {"source": source, "shard": "000"}
    store.write_partition("cot_traces", partition, pa.Table.from_pylist(traces, schema=COT_TRACES.schema))
    store.write_partition("annotations", partition, pa.Table.from_pylist(annotations, schema=ANNOTATIONS.schema))
