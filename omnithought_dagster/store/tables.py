"""Every table of the corpus store: its columns (with what they mean) and how it is partitioned.

This registry is the single source of truth for the Parquet schemas the store writes, the
DuckDB views of the catalog, the `dagster/column_schema` metadata and the table reference in
docs/tables.md (regenerate it with `omnithought tables > docs/tables.md`; a test fails when
the two disagree).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pyarrow as pa

STRING_LIST = pa.list_(pa.string())


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    description: str
    nullable: bool = True


@dataclass(frozen=True)
class TableSpec:
    name: str
    description: str
    partition_by: tuple[str, ...]
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...] = field(default=())

    @functools.cached_property  # read per row by the seed stage's type check: build it once
    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.type, nullable=c.nullable) for c in self.columns])

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


SEED_POOL = TableSpec(
    name="seed_pool",
    description="One normalised multimodal question (images + question + reference answer) per row.",
    partition_by=("source",),
    primary_key=("sample_id",),
    columns=(
        Column("sample_id", pa.string(), "content hash of normalised question + choices + image ids + answer", False),
        Column("source", pa.string(), "configured source name (the partition key)", False),
        Column("native_id", pa.string(), "the record's id in its source (or its position when it has none)", False),
        Column("record_index", pa.int64(), "0-based position of the record in the source as read", False),
        Column("turn", pa.int32(), "the conversation turn (1-based) the sample came from; null for formats without turns"),
        Column("image_ids", STRING_LIST, "content hashes of the image bytes, in question order; keys of the image store", False),
        Column("image_phashes", STRING_LIST, "64-bit perceptual hash (hex) of each image, aligned with image_ids", False),
        Column("question", pa.string(), "question text, NFC, image placeholders removed", False),
        Column("answer", pa.string(), "reference answer; for multiple choice the option letter", False),
        Column("answer_type", pa.string(), "multiple_choice | numeric | math | free_form", False),
        Column("choices", STRING_LIST, "option texts for multiple choice (A, B, ... in order); empty otherwise", False),
        Column("source_tags", STRING_LIST, "task tags the source provides (ground truth for the synthetic source)", False),
        Column("source_difficulty", pa.int32(), "difficulty level the source provides, if any"),
        Column("metadata", pa.string(), "JSON object: the source's fields not mapped to a column", False),
        Column("near_duplicate_of", pa.string(), "sample_id of an earlier sample with a perceptually near image (marked, not dropped)"),
        Column("near_duplicate_distance", pa.int32(), "Hamming distance between the two perceptual hashes"),
    ),
)

QUARANTINE = TableSpec(
    name="quarantine",
    description="One seed record that could not be used, with the reason; nothing read is ever lost.",
    partition_by=("source",),
    columns=(
        Column("source", pa.string(), "configured source name (the partition key)", False),
        Column("native_id", pa.string(), "the record's id in its source, when it could be read"),
        Column("record_index", pa.int64(), "0-based position of the record in the source as read", False),
        Column("turn", pa.int32(), "the conversation turn (1-based) set aside, when one turn of a record was; null otherwise"),
        Column("reason", pa.string(), "reason code (see omnithought_dagster.seed.sources.base.QuarantineReason)", False),
        Column("detail", pa.string(), "what exactly was wrong, with the offending value", False),
        Column("sample_id", pa.string(), "the sample's id when it got that far (duplicates always have one)"),
        Column("duplicate_of", pa.string(), "for duplicates: 'source/native_id' of the kept copy"),
        Column("raw_excerpt", pa.string(), "the first 500 characters of the raw record, for forensics, credentials redacted (redact.py)"),
    ),
)

IMAGES = TableSpec(
    name="images",
    description="One image of the content-addressed image store, per source that uses it.",
    partition_by=("source",),
    primary_key=("image_id",),
    columns=(
        Column("image_id", pa.string(), "content hash of the bytes; the object is images/<id[:2]>/<id>", False),
        Column("source", pa.string(), "source that referenced the image (the partition key)", False),
        Column("width", pa.int32(), "pixels", False),
        Column("height", pa.int32(), "pixels", False),
        Column("format", pa.string(), "PNG, JPEG, ... as PIL decoded it", False),
        Column("mode", pa.string(), "PIL mode (RGB, L, RGBA, ...)", False),
        Column("n_bytes", pa.int64(), "size of the stored bytes", False),
        Column("phash", pa.string(), "64-bit perceptual hash, hex", False),
    ),
)

COT_TRACES = TableSpec(
    name="cot_traces",
    description="One teacher rollout for one seed sample: the structured chain of thought and its final answer.",
    partition_by=("source", "shard"),
    primary_key=("trace_id",),
    columns=(
        Column("trace_id", pa.string(), "hash of sample_id, teacher, prompt version and text, sampling parameters, rollout", False),
        Column("sample_id", pa.string(), "the seed sample (seed_pool.sample_id)", False),
        Column("source", pa.string(), "the sample's source (partition key)", False),
        Column("shard", pa.string(), "hash shard of the sample_id within the source (partition key)", False),
        Column("teacher", pa.string(), "teacher identity (config name, or the model; tiny models carry their fingerprint)", False),
        Column("prompt_version", pa.string(), "version of the prompt template", False),
        Column("rollout", pa.int32(), "0-based rollout index for this sample", False),
        Column("text", pa.string(), "the raw reply (null when the request failed)"),
        Column("reasoning", pa.string(), "the chain of thought parsed from the reply"),
        Column("final_answer", pa.string(), "the final answer parsed from the reply (null when none could be parsed)"),
        Column("finish_reason", pa.string(), "stop | length (truncated at max_tokens) | error (request failed after retries)", False),
        Column("n_prompt_tokens", pa.int32(), "prompt tokens as the server counted them (images included)"),
        Column("n_tokens", pa.int32(), "generated tokens"),
        Column("latency_s", pa.float64(), "seconds from first attempt to reply, retries included"),
        Column("attempts", pa.int32(), "requests it took to generate this trace (1 unless retried)", False),
        Column("error", pa.string(), "why the request failed (null when fine)"),
    ),
)

ANNOTATIONS = TableSpec(
    name="annotations",
    description="The joint annotation of one trace: verified correctness and pass rate (computed), judge scores and tags.",
    partition_by=("source", "shard"),
    primary_key=("trace_id",),
    columns=(
        Column(
            "annotation_id", pa.string(), "hash of trace_id, annotator, judge prompt version and text, taxonomy version, sampling", False
        ),
        Column("trace_id", pa.string(), "the annotated trace (cot_traces.trace_id)", False),
        Column("sample_id", pa.string(), "its seed sample", False),
        Column("source", pa.string(), "partition key", False),
        Column("shard", pa.string(), "partition key", False),
        Column("annotator", pa.string(), "judge identity", False),
        Column("prompt_version", pa.string(), "judge prompt version", False),
        Column("taxonomy_version", pa.string(), "version of the tag taxonomy", False),
        Column("correct", pa.bool_(), "the final answer matches the reference (verifier; the judge only for undecided free-form)", False),
        Column(
            "verify_method",
            pa.string(),
            "how correctness was decided: choice, numeric, math_verify, exact_normalised, judge, no_answer, ...",
            False,
        ),
        Column("extracted_answer", pa.string(), "what the verifier read from the final answer (letter, number, ...)"),
        Column("pass_rate", pa.float64(), "share of the sample's rollouts (in this partition) that are correct", False),
        Column("n_rollouts", pa.int32(), "rollouts of the sample the pass rate is over", False),
        Column("difficulty", pa.int32(), "judge: cognitive difficulty of the problem, 0-9"),
        Column("verbosity", pa.int32(), "judge: length and detail of the reasoning, 0-9"),
        Column("quality", pa.int32(), "judge: logical soundness of the reasoning, 0-9"),
        Column("tags", STRING_LIST, "judge: task labels from the taxonomy (empty when the judge failed)", False),
        Column("raw_tags", STRING_LIST, "judge: tags as written, before mapping onto the taxonomy", False),
        Column("judge_answer_correct", pa.bool_(), "judge: does the final answer match the reference"),
        Column("sample_difficulty", pa.float64(), "mean judge difficulty over the sample's rollouts"),
        Column(
            "difficulty_score", pa.float64(), "(1-w) * sample_difficulty + w * 9 * (1 - pass_rate), w = annotation.pass_rate_weight", False
        ),
        Column("difficulty_bin", pa.int32(), "bin of difficulty_score by annotation.difficulty_bins", False),
        Column("difficulty_label", pa.string(), "name of the bin (annotation.difficulty_labels)", False),
        Column("finish_reason", pa.string(), "carried over from the trace", False),
        Column("n_tokens", pa.int32(), "carried over from the trace"),
        Column("judge_reply", pa.string(), "the judge's raw reply (null when no request was made)"),
        Column("judge_error", pa.string(), "why there is no judgement: request failed, reply unparsable or invalid, trace without reply"),
    ),
)

REASON = pa.struct(
    [pa.field("code", pa.string()), pa.field("value", pa.float64()), pa.field("threshold", pa.float64()), pa.field("detail", pa.string())]
)

FILTER_DECISIONS = TableSpec(
    name="filter_decisions",
    description="The verdict on one trace: kept, or every rule and selection reason that dropped it, with the value that tripped it.",
    partition_by=("source",),
    primary_key=("trace_id",),
    columns=(
        Column("trace_id", pa.string(), "the trace (cot_traces.trace_id)", False),
        Column("sample_id", pa.string(), "its seed sample", False),
        Column("source", pa.string(), "partition key", False),
        Column("shard", pa.string(), "the trace's cot_traces shard", False),
        Column("rollout", pa.int32(), "rollout index", False),
        Column(
            "teacher",
            pa.string(),
            "the teacher that wrote it (cot_traces.teacher; null in partitions written before it was recorded)",
        ),
        Column("kept", pa.bool_(), "no reason applies: the trace is in the filtered set", False),
        Column(
            "reasons",
            pa.list_(REASON),
            "every reason that applies: {code, value measured, threshold, detail (what tripped it, e.g. the markup string)}; "
            "empty when kept",
            False,
        ),
        Column(
            "duplicate_of", pa.string(), "duplicate_trace: the kept copy's trace_id; near_duplicate_sample: the representative sample_id"
        ),
        Column("tags", STRING_LIST, "judge tags (for tag-diverse sampling)", False),
        Column("difficulty_label", pa.string(), "difficulty bin label of the sample", False),
        Column("difficulty_score", pa.float64(), "the sample's difficulty score", False),
        Column("pass_rate", pa.float64(), "the sample's pass rate", False),
        Column("quality", pa.int32(), "judge quality"),
        Column("verbosity", pa.int32(), "judge verbosity"),
        Column("n_tokens", pa.int32(), "generated tokens"),
        Column("preference", pa.float64(), "how strongly selection prefers this trace among its sample's (higher first)", False),
    ),
)

SUBSET_MEMBERS = TableSpec(
    name="subset_members",
    description="One trace chosen for one recipe's subset.",
    partition_by=("subset",),
    primary_key=("subset", "trace_id"),
    columns=(
        Column("subset", pa.string(), "recipe name (the partition key)", False),
        Column("subset_version", pa.string(), "hash of the subset's members: the same inputs and recipe give the same version", False),
        Column("trace_id", pa.string(), "the member trace", False),
        Column("sample_id", pa.string(), "its seed sample", False),
        Column("source", pa.string(), "its source", False),
        Column("stratum", pa.string(), "difficulty label / primary tag it was drawn for", False),
        Column("pick", pa.int32(), "0-based order of selection (stratum by stratum)", False),
    ),
)

STUDENT_CHECKPOINTS = TableSpec(
    name="student_checkpoints",
    description="One student model per (student, recipe): a fine-tuned checkpoint, or (recipe `base`) the untrained baseline.",
    partition_by=("student", "recipe"),
    primary_key=("checkpoint_id",),
    columns=(
        Column(
            "checkpoint_id",
            pa.string(),
            "hash of the base model, subset_version and train_config_hash (baseline: of the base model)",
            False,
        ),
        Column("student", pa.string(), "student name from the project file (a partition key)", False),
        Column("recipe", pa.string(), "the recipe whose subset trained it; `base` for the untrained baseline (a partition key)", False),
        Column("baseline", pa.bool_(), "true for the untrained base model", False),
        Column("base_model", pa.string(), "the student's base model (path, hub id or tiny:<name>)", False),
        Column("base_fingerprint", pa.string(), "fingerprint of the base model's files or name", False),
        Column("subset_version", pa.string(), "the subset trained on (null for the baseline)"),
        Column("train_config_hash", pa.string(), "hash of the training settings (null for the baseline)"),
        Column(
            "uri",
            pa.string(),
            "the HF-format model folder (checkpoints/<checkpoint_id>/ in the store; the base model's own for a baseline)",
            False,
        ),
        Column("examples", pa.int64(), "training examples in the subset export"),
        Column("steps", pa.int64(), "optimizer steps"),
        Column("samples_seen", pa.int64(), "examples consumed, all ranks (repeats across epochs count)"),
        Column("tokens_seen", pa.int64(), "input tokens consumed, all ranks"),
        Column("initial_loss", pa.float64(), "mean loss of the first steps"),
        Column("final_loss", pa.float64(), "mean loss of the last steps"),
        Column("tokens_per_s", pa.float64(), "training throughput, all ranks"),
        Column("train_seconds", pa.float64(), "wall time of the training loop"),
        Column("launcher", pa.string(), "deepspeed | torchrun, with its world size"),
        Column("created_at", pa.string(), "UTC ISO time the checkpoint was written", False),
    ),
)

BENCHMARK_SCORES = TableSpec(
    name="benchmark_scores",
    description="One (checkpoint, benchmark, metric, slice) score from lmms-eval, with its delta against the student's baseline.",
    partition_by=("student", "recipe"),
    primary_key=("checkpoint_id", "benchmark", "metric", "slice"),
    columns=(
        Column("checkpoint_id", pa.string(), "the scored model (student_checkpoints)", False),
        Column("student", pa.string(), "student name (a partition key)", False),
        Column("recipe", pa.string(), "the recipe it was trained on, or `base` (a partition key)", False),
        Column("benchmark", pa.string(), "configured benchmark name, or the lmms-eval task name", False),
        Column("task", pa.string(), "the lmms-eval task", False),
        Column("metric", pa.string(), "the task's metric (accuracy for the local tasks)", False),
        Column("slice", pa.string(), "`all`, or `tag:<tag>` for the items carrying that tag", False),
        Column("score", pa.float64(), "the metric's value, in [0, 1]", False),
        Column("n", pa.int64(), "items scored in this slice", False),
        Column("n_benchmark", pa.int64(), "items in the whole benchmark (n is smaller only under evaluation.limit)"),
        Column("baseline_score", pa.float64(), "the same slice's score of the student's untrained baseline (null: not scored yet)"),
        Column("delta", pa.float64(), "score - baseline_score"),
        Column("eval_config_hash", pa.string(), "hash of the evaluation settings and the benchmark items", False),
        Column("evaluated_at", pa.string(), "UTC ISO time of the run", False),
    ),
)

BENCHMARK_SAMPLES = TableSpec(
    name="benchmark_samples",
    description="One benchmark item's model output and verdict, for one checkpoint (lmms-eval's per-sample log).",
    partition_by=("student", "recipe"),
    primary_key=("checkpoint_id", "benchmark", "item_id"),
    columns=(
        Column("checkpoint_id", pa.string(), "the scored model", False),
        Column("student", pa.string(), "student name (a partition key)", False),
        Column("recipe", pa.string(), "recipe or `base` (a partition key)", False),
        Column("benchmark", pa.string(), "configured benchmark name", False),
        Column("doc_index", pa.int64(), "the item's row in the task's Parquet (lmms-eval's doc_id)", False),
        Column("item_id", pa.string(), "the item's sample_id (as decontamination computes it)", False),
        Column("tag", pa.string(), "the item's task tag", False),
        Column("target", pa.string(), "the reference answer"),
        Column("response", pa.string(), "the model's reply, as generated"),
        Column("extracted_answer", pa.string(), "the answer read from the reply (Answer: line, \\boxed{}, else the last line)"),
        Column("correct", pa.bool_(), "lmms-eval's verdict for the item (false when its record was unreadable or missing)", False),
        Column("problem", pa.string(), "why the item has no verdict of lmms-eval's and is scored wrong (null when it has one)"),
        Column("eval_config_hash", pa.string(), "as in benchmark_scores", False),
    ),
)

EXPERIMENT_ITEMS = TableSpec(
    name="experiment_items",
    description=(
        "One benchmark item's verdict for one arm of an experiment (a recipe or a control, a student, a seed): the rows its "
        "intervals are computed from."
    ),
    partition_by=("experiment",),
    primary_key=("experiment", "student", "benchmark", "arm", "seed", "item"),
    columns=(
        Column("experiment", pa.string(), "experiment name (the partition key)", False),
        Column("student", pa.string(), "the student as the experiment names it", False),
        Column("benchmark", pa.string(), "configured benchmark name", False),
        Column("curated", pa.string(), "the curated recipe the arm belongs to", False),
        Column("arm", pa.string(), "the curated recipe's name, or its control's", False),
        Column("kind", pa.string(), "curated | random | filtered", False),
        Column("seed", pa.int64(), "the arm's seed (training seed; a control's draw seed)", False),
        Column("item", pa.string(), "the benchmark item (benchmark_samples.item_id)", False),
        Column("tag", pa.string(), "the item's task tag", False),
        Column("score", pa.float64(), "1.0 when the verdict is correct, else 0.0", False),
        Column(
            "student_partition",
            pa.string(),
            "the student partition that holds the arm (the student, or its replicate for this seed)",
            False,
        ),
        Column("recipe_partition", pa.string(), "the recipe partition (the recipe, or the control's replicate for this seed)", False),
        Column("checkpoint_id", pa.string(), "the scored checkpoint", False),
    ),
)

EXPERIMENT_ARMS = TableSpec(
    name="experiment_arms",
    description="One arm of an experiment for one seed: its subset, its checkpoint and what it cost.",
    partition_by=("experiment",),
    primary_key=("experiment", "student", "arm", "seed"),
    columns=(
        Column("experiment", pa.string(), "experiment name (the partition key)", False),
        Column("student", pa.string(), "the student as the experiment names it", False),
        Column("curated", pa.string(), "the curated recipe the arm belongs to", False),
        Column("arm", pa.string(), "the curated recipe's name, or its control's", False),
        Column("kind", pa.string(), "curated | random | filtered", False),
        Column("seed", pa.int64(), "the arm's seed", False),
        Column("student_partition", pa.string(), "as in experiment_items", False),
        Column("recipe_partition", pa.string(), "as in experiment_items", False),
        Column("subset_version", pa.string(), "the subset trained on"),
        Column("subset_size", pa.int64(), "traces in the subset", False),
        Column("correct_share", pa.float64(), "share of the subset's traces whose answer the verifier found correct (annotations.correct)"),
        Column("teacher_tokens", pa.int64(), "tokens the teacher generated for the subset's traces (cot_traces.n_tokens)", False),
        Column("checkpoint_id", pa.string(), "the trained checkpoint", False),
        Column("training_tokens", pa.int64(), "input tokens the training consumed, all ranks (student_checkpoints.tokens_seen)"),
        Column("train_seconds", pa.float64(), "wall time of the training loop"),
    ),
)

EXPERIMENT_RESULTS = TableSpec(
    name="experiment_results",
    description=(
        "An experiment's numbers: each arm's measure (benchmark score, per tag slice, and costs), and each curated arm's paired "
        "difference to each of its controls with a bootstrap interval over items and seeds (`sql` recomputes it)."
    ),
    partition_by=("experiment",),
    primary_key=("experiment", "row", "measure", "student", "benchmark", "slice", "arm", "control"),
    columns=(
        Column("experiment", pa.string(), "experiment name (the partition key)", False),
        Column("row", pa.string(), "arm (one arm's value) | difference (curated arm minus control)", False),
        Column("measure", pa.string(), "score | training_tokens | teacher_tokens | correct_share | subset_size", False),
        Column("student", pa.string(), "the student as the experiment names it", False),
        Column("benchmark", pa.string(), "the benchmark of a score; `-` for the arm's costs", False),
        Column("slice", pa.string(), "`all`, or `tag:<tag>` for a score over the items carrying that tag", False),
        Column("curated", pa.string(), "the curated recipe", False),
        Column("arm", pa.string(), "the arm (an arm row), or the curated arm (a difference row)", False),
        Column("control", pa.string(), "the control a difference is taken to; `-` on an arm row", False),
        Column("kind", pa.string(), "the arm's kind (an arm row) or the control's (a difference row)", False),
        Column("estimate", pa.float64(), "the arm's mean over seeds of its mean over items, or the difference of two such means"),
        Column("low", pa.float64(), "the interval's lower end (difference rows, and an arm's score)"),
        Column("high", pa.float64(), "the interval's upper end (difference rows, and an arm's score)"),
        Column("level", pa.float64(), "the interval's level"),
        Column("replicates", pa.int64(), "bootstrap replicates that weighed both arms"),
        Column("items", pa.int64(), "items the value is over (1 for a cost: one value per seed)"),
        Column("seeds", pa.int64(), "seeds of the arm (the curated arm's, on a difference row)"),
        Column("control_seeds", pa.int64(), "seeds of the control (difference rows)"),
        Column(
            "verdict",
            pa.string(),
            (
                "difference rows: higher | lower (the interval excludes 0; `(one seed)` when no arm has more than one) | "
                "no difference shown | not comparable"
            ),
        ),
        Column("problem", pa.string(), "why the arms are not comparable (null when they are)"),
        Column(
            "sql", pa.string(), "the DuckDB query over experiment_items / experiment_arms that recomputes the row's estimate and interval"
        ),
    ),
)

COST_LEDGER = TableSpec(
    name="cost_ledger",
    description=(
        "What one step partition's outputs cost, per model: requests, tokens, engine and GPU time, and money at the project "
        "file's prices. A model stage's row sums its partition's replies, each counted once whichever run paid for it; each "
        "run of a step replaces its partition's rows."
    ),
    partition_by=("stage", "partition"),
    primary_key=("stage", "partition", "role", "model"),
    columns=(
        Column(
            "stage", pa.string(), "the asset whose partition it accounts for (cot_traces, annotations, student_checkpoints, ...)", False
        ),
        Column("partition", pa.string(), "its Dagster partition key", False),
        Column("role", pa.string(), "teacher | judge | training | evaluation", False),
        Column("model", pa.string(), "the model's identity (as in cot_traces.teacher / annotations.annotator), or the student", False),
        Column("requests_ok", pa.int64(), "replies held (served from the engine, now or by an earlier run)", False),
        Column("requests_failed", pa.int64(), "requests failed after their retries (the writing run's: failures are not cached)", False),
        Column("retries", pa.int64(), "attempts beyond the first, over every request", False),
        Column("prompt_tokens", pa.int64(), "prompt tokens of the replies (training: tokens trained on)", False),
        Column("completion_tokens", pa.int64(), "generated tokens of the replies", False),
        Column("token_source", pa.string(), "provider (the server's usage) | counted (counted here) | unreported", False),
        Column(
            "engine_seconds",
            pa.float64(),
            "engine time: per reply, its share of the time between two flushes; a process's run time",
            False,
        ),
        Column("gpu_seconds", pa.float64(), "engine_seconds x the GPUs the engine held (0 on CPU or for a remote endpoint)", False),
        Column("unstamped", pa.int64(), "replies cached before the ledger existed: their engine time is unknown (counted as 0)", False),
        Column("paid_by_runs", pa.int32(), "distinct runs that sent the replies (2 after a killed run was resumed)", False),
        Column("written_by_run", pa.string(), "the run that wrote this partition"),
        Column("requests_sent", pa.int64(), "requests that run sent itself", False),
        Column("cache_hits", pa.int64(), "replies that run found in the cache", False),
        Column("batched", pa.bool_(), "some of the replies were paid through a provider's batch API", False),
        Column("batched_prompt_tokens", pa.int64(), "of prompt_tokens, those of replies paid through a batch API (discounted)", False),
        Column("batched_completion_tokens", pa.int64(), "of completion_tokens, those of replies paid through a batch API", False),
        Column("currency", pa.string(), "costs.currency", False),
        Column("price_version", pa.string(), "id of the price table the money was computed with (null: no price for this model)"),
        Column("input_per_million", pa.float64(), "the price per million prompt tokens used"),
        Column("output_per_million", pa.float64(), "the price per million completion tokens used"),
        Column("batch_discount", pa.float64(), "the batch discount used"),
        Column("gpu_hour", pa.float64(), "the price per GPU-hour used"),
        Column("token_cost", pa.float64(), "tokens x token prices (null without a price)"),
        Column("gpu_cost", pa.float64(), "gpu_seconds / 3600 x gpu_hour (null without a price)"),
        Column("cost", pa.float64(), "token_cost + gpu_cost (null without a price: never guessed)"),
    ),
)

TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        SEED_POOL,
        QUARANTINE,
        IMAGES,
        COT_TRACES,
        ANNOTATIONS,
        FILTER_DECISIONS,
        SUBSET_MEMBERS,
        STUDENT_CHECKPOINTS,
        BENCHMARK_SCORES,
        BENCHMARK_SAMPLES,
        EXPERIMENT_ITEMS,
        EXPERIMENT_ARMS,
        EXPERIMENT_RESULTS,
        COST_LEDGER,
    )
}

# Views the catalog derives from the tables (name -> SQL over them).
DERIVED_VIEWS: dict[str, str] = {
    "filtered_set": "SELECT * FROM filter_decisions WHERE kept",
}


def table_spec(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; known: {sorted(TABLES)}") from None


def tables_markdown() -> str:
    """The table reference of docs/tables.md, generated from the specs above."""
    parts = []
    for spec in TABLES.values():
        partitioned = "/".join(f"{column}=..." for column in spec.partition_by)
        parts.append(
            f"### `{spec.name}`\n\n{spec.description}\n\nPath: `tables/{spec.name}/{partitioned}/data.parquet`"
            + (f"; key: `{', '.join(spec.primary_key)}`" if spec.primary_key else "")
            + "\n"
        )
        parts.append("| column | type | required | meaning |\n| --- | --- | --- | --- |")
        parts += [
            f"| `{c.name}` | `{c.type}` | {'yes' if not c.nullable else 'no'} | {c.description.replace('|', '&#124;')} |"
            for c in spec.columns
        ]
        parts.append("")
    return "\n".join(parts)
