"""Great Expectations 1.x validation of a pandas frame, turned into a Dagster AssetCheckResult.

Checks compute what they need in DuckDB, hand GX a frame and a list of `Expect`s, and get
back an AssetCheckResult whose metadata names every expectation, its unexpected count and
a few offending values. GX is imported on first use only (its import costs seconds), and one
ephemeral context is reused per process; GX over DuckDB/SQLAlchemy gave wrong results here,
so frames it is (see shared/ENVIRONMENT.md).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from omnithought_dagster.assets.metadata import markdown_cell

EXAMPLES = 5

_lock = threading.Lock()
_batch_definition = None
_suite_counter = 0


@dataclass(frozen=True, init=False)
class Expect:
    """One expectation by its GX name, e.g. Expect("expect_column_values_to_be_unique", column="sample_id")."""

    type: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __init__(self, type: str, **kwargs: Any):
        object.__setattr__(self, "type", type)
        object.__setattr__(self, "kwargs", kwargs)

    @property
    def label(self) -> str:
        column = self.kwargs.get("column")
        return f"{self.type}({column})" if column else self.type


@dataclass(frozen=True)
class Outcome:
    expectation: Expect
    success: bool
    element_count: int | None
    unexpected_count: int | None
    examples: list[Any]
    observed: Any = None


@dataclass(frozen=True)
class FrameValidation:
    success: bool
    rows: int
    outcomes: list[Outcome]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.success]


def validate_frame(frame, expectations: list[Expect]) -> FrameValidation:
    """Run the expectations over the frame with GX; one Outcome per expectation, in order."""
    global _suite_counter
    import great_expectations as gx

    batch_definition = _get_batch_definition()
    with _lock:
        _suite_counter += 1
        suite = gx.ExpectationSuite(name=f"omnithought_{_suite_counter}")
    for expect in expectations:
        cls = getattr(gx.expectations, _camel(expect.type), None)
        if cls is None:
            raise ValueError(f"Great Expectations has no expectation {expect.type!r}")
        suite.add_expectation(cls(**expect.kwargs))
    result = batch_definition.get_batch(batch_parameters={"dataframe": frame}).validate(suite)
    # Expectations of an unsaved suite have no ids and results are not in suite order:
    # pair each expectation with the result whose type and arguments are its own.
    unclaimed = list(result.results)
    outcomes = []
    for expect in expectations:
        r = next(r for r in unclaimed if _same(expect, r.expectation_config))
        unclaimed.remove(r)
        detail = r.result or {}
        outcomes.append(
            Outcome(
                expectation=expect,
                success=bool(r.success),
                element_count=detail.get("element_count"),
                unexpected_count=detail.get("unexpected_count"),
                examples=list(detail.get("partial_unexpected_list") or [])[:EXAMPLES],
                observed=detail.get("observed_value"),
            )
        )
    return FrameValidation(success=bool(result.success), rows=len(frame), outcomes=outcomes)


def gx_check_result(
    frame,
    expectations: list[Expect],
    *,
    asset_key: dg.AssetKey | str | None = None,
    check_name: str | None = None,
    description: str | None = None,
    extra_metadata: dict[str, Any] | None = None,
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
) -> dg.AssetCheckResult:
    """Validate and report: passed iff every expectation held; metadata says which did not and why."""
    validation = validate_frame(frame, expectations)
    lines = ["| expectation | ok | unexpected | examples |", "| --- | --- | --- | --- |"]
    for o in validation.outcomes:
        unexpected = "" if o.unexpected_count is None else str(o.unexpected_count)
        examples = (
            ", ".join(markdown_cell(v, 60) for v in o.examples)
            if o.examples
            else ""
            if o.observed is None
            else f"observed {markdown_cell(o.observed, 60)}"
        )
        lines.append(f"| {o.expectation.label} | {'yes' if o.success else '**no**'} | {unexpected} | {examples} |")
    metadata: dict[str, Any] = {
        "rows_validated": validation.rows,
        "failed_expectations": len(validation.failed),
        "expectations": dg.MetadataValue.md("\n".join(lines)),
        "validator": "great_expectations",
    }
    metadata.update(extra_metadata or {})
    if validation.failed and description is None:
        description = "; ".join(
            f"{o.expectation.label}: {o.unexpected_count if o.unexpected_count is not None else 'failed'}"
            + (f" unexpected, e.g. {_plain(o.examples[0])}" if o.examples else "")
            for o in validation.failed
        )
    return dg.AssetCheckResult(
        passed=validation.success,
        asset_key=asset_key,
        check_name=check_name,
        metadata=metadata,
        severity=severity,
        description=description,
    )


def _get_batch_definition():
    global _batch_definition
    with _lock:
        if _batch_definition is None:
            os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
            import great_expectations as gx
            from great_expectations.data_context.types.base import ProgressBarsConfig

            context = gx.get_context(mode="ephemeral")
            context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
            asset = context.data_sources.add_pandas("omnithought").add_dataframe_asset("frame")
            _batch_definition = asset.add_batch_definition_whole_dataframe("whole_frame")
        return _batch_definition


def _same(expect: Expect, configuration) -> bool:
    kwargs = configuration.kwargs
    return configuration.type == expect.type and all(kwargs.get(k) == v for k, v in expect.kwargs.items())


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _plain(value: Any, limit: int = 60) -> str:
    """A value in a check's description (plain text): one line, shortened."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
