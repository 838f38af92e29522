"""Asset checks on student_checkpoints (per student x recipe); each re-reads the store."""

import dagster as dg

from omnithought_dagster.assets.student import STUDENT_BASELINES_KEY, STUDENT_CHECKPOINTS_KEY, baseline_partitions, student_partitions
from omnithought_dagster.checks.teacher import partition_dims
from omnithought_dagster.config import BASELINE_RECIPE, ProjectConfig
from omnithought_dagster.resources import CorpusStoreResource, ProjectResource
from omnithought_dagster.train.methods import METHODS

LOSS_DECREASED = "loss_decreased"
LOADS_AND_GENERATES = "loads_and_generates"
GENERATE_TOKENS = 8


def build_baseline_checks(config: ProjectConfig) -> list[dg.AssetChecksDefinition]:
    baselines = baseline_partitions(config)

    @dg.asset_check(asset=STUDENT_BASELINES_KEY, name=LOADS_AND_GENERATES, partitions_def=baselines, blocking=True)
    def baseline_loads_and_generates(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource) -> dg.AssetCheckResult:
        """The base model loads with from_pretrained and generates from an image + question."""
        table = store.open().read_partition("student_checkpoints", {"student": context.partition_key, "recipe": BASELINE_RECIPE})
        row = table.to_pylist()[0] if table is not None and table.num_rows else None
        return _probe(store, row, context.partition_key, None)

    return [baseline_loads_and_generates]


def build_checkpoint_checks(config: ProjectConfig) -> list[dg.AssetChecksDefinition]:
    if not config.students or not config.recipes:
        return []
    partitions = student_partitions(config)

    @dg.asset_check(asset=STUDENT_CHECKPOINTS_KEY, name=LOSS_DECREASED, partitions_def=partitions, blocking=True)
    def loss_decreased(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource) -> dg.AssetCheckResult:
        """Training moved its objective the right way: the mean loss of the last steps is below that of the first steps
        (sft, kd); for grpo, whose loss is a policy-gradient surrogate near 0, the mean reward rose (a warning when not:
        RL over few steps is noisy, and the scores downstream judge the checkpoint)."""
        row = _row(store, context, partitions)
        if row is None:
            return dg.AssetCheckResult(passed=False, description=f"student_checkpoints[{context.partition_key}] is missing")
        return dg.AssetCheckResult(**objective_verdict(row, store.open().checkpoints.manifest(row["checkpoint_id"])))

    @dg.asset_check(asset=STUDENT_CHECKPOINTS_KEY, name=LOADS_AND_GENERATES, partitions_def=partitions, blocking=True)
    def loads_and_generates(
        context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource
    ) -> dg.AssetCheckResult:
        """The checkpoint loads with from_pretrained and generates from an image + question."""
        return _probe(store, _row(store, context, partitions), context.partition_key, project.config.training.work_dir)

    return [loss_decreased, loads_and_generates]


def objective_verdict(row: dict, manifest: dict | None) -> dict:
    """loss_decreased's verdict for a checkpoint row and its stored manifest (AssetCheckResult's arguments): the loss fell,
    or, for a method whose objective must rise instead (its `rises`: grpo's reward), that rose (a warning when not)."""
    method = ((manifest or {}).get("train_spec") or {}).get("method") or {}
    rises = METHODS[method["name"]].rises if method.get("name") in METHODS else None
    if rises:
        results = (manifest or {}).get("results") or {}
        initial, final = results.get(f"initial_{rises}"), results.get(f"final_{rises}")
        passed = initial is not None and final is not None and final > initial
        return {
            "passed": passed,
            "severity": dg.AssetCheckSeverity.WARN,
            "metadata": {
                f"initial_{rises}": initial,
                f"final_{rises}": final,
                "initial_pass_rate": results.get("initial_pass_rate"),
                "final_pass_rate": results.get("final_pass_rate"),
                "steps": row["steps"],
            },
            "description": None if passed else f"{method['name']}: the {rises} did not rise: first steps {initial}, last steps {final}",
        }
    initial, final = row["initial_loss"], row["final_loss"]
    passed = initial is not None and final is not None and final < initial
    return {
        "passed": passed,
        "metadata": {"initial_loss": initial, "final_loss": final, "steps": row["steps"]},
        "description": None if passed else f"loss did not decrease: first steps {initial}, last steps {final}",
    }


def _probe(store: CorpusStoreResource, row: dict | None, partition: str, cache_dir: str | None) -> dg.AssetCheckResult:
    if row is None:
        return dg.AssetCheckResult(passed=False, description=f"student_checkpoints[{partition}] is missing")
    try:
        folder = row["uri"] if row["baseline"] else str(store.open().checkpoints.local_dir(row["checkpoint_id"], cache_dir))
        tokens = generate_probe(folder)
    except Exception as exc:  # the check's verdict is the failure itself
        return dg.AssetCheckResult(
            passed=False, metadata={"checkpoint_id": row["checkpoint_id"]}, description=f"{type(exc).__name__}: {str(exc)[:500]}"
        )
    return dg.AssetCheckResult(
        passed=tokens > 0,
        metadata={"checkpoint_id": row["checkpoint_id"], "generated_tokens": tokens},
        description=None if tokens else "generated no tokens",
    )


def generate_probe(folder: str) -> int:
    """Load a model folder and greedily generate a few tokens for an image and a question."""
    import torch
    from PIL import Image

    from omnithought_dagster.models.vl_chat import load_vl_model

    vl, model = load_vl_model(folder)
    image = Image.new("RGB", (112, 112), (200, 40, 40))
    inputs = vl.encode_prompt(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}], [image]
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=GENERATE_TOKENS, do_sample=False)
    return int(output.shape[1] - inputs["input_ids"].shape[1])


def _row(store: CorpusStoreResource, context, partitions: dg.MultiPartitionsDefinition) -> dict | None:
    table = store.open().read_partition("student_checkpoints", partition_dims(context, partitions))
    return table.to_pylist()[0] if table is not None and table.num_rows else None
