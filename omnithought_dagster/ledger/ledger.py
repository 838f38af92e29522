"""The cost ledger: one row per (step partition, model) saying what its outputs cost.

A model stage's row is the sum over the replies its partition holds, each counted once whichever run paid for it (the
runner stamps every reply before caching it: llm.runner), so re-running or resuming a partition never counts a reply
twice; `requests_sent` and `cache_hits` say what the run that wrote the partition did itself. Training and evaluation rows
hold their process's seconds. Money comes from the project file's prices (ledger.settings), with the price table's version;
a model without a price has null money, never a guess. Written by each step beside its own partition
(`write_ledger`), read by `omnithought stats`, the report and the teacher report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from omnithought_dagster.ledger.settings import CostsConfig, Price
from omnithought_dagster.llm.backends import Completion
from omnithought_dagster.llm.runner import RunStats
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.store.tables import COST_LEDGER

LEDGER_TABLE = COST_LEDGER.name
# What a model stage's row sums over its replies: equal for a resumed run and an uninterrupted one.
PAID_COLUMNS = ("requests_ok", "requests_failed", "retries", "prompt_tokens", "completion_tokens")


@dataclass(frozen=True)
class Payer:
    """Who a ledger row is about: its step partition, the model's role and identity, and the names its price may be under."""

    stage: str
    partition: str
    role: str  # teacher | judge | training | evaluation
    model: str
    price_names: tuple[str | None, ...] = ()
    token_source: str = "provider"  # provider (the server's usage) | counted (counted here)


def llm_row(payer: Payer, completions: Iterable[Completion], stats: RunStats | None, run_id: str | None, costs: CostsConfig) -> dict:
    """The row of a model stage: its partition's replies from one model (see the module docstring)."""
    replies = list(completions)
    ok = [c for c in replies if c.finish_reason != "error"]
    paid_by = {c.paid_by for c in replies if c.paid_by is not None}
    reported = [c for c in ok if c.n_tokens is not None]
    batched = [c for c in ok if c.batched]  # each reply as it was paid: a partition may hold both after a mode switch
    row = {
        "stage": payer.stage,
        "partition": payer.partition,
        "role": payer.role,
        "model": payer.model,
        "requests_ok": len(ok),
        "requests_failed": len(replies) - len(ok),
        "retries": sum(max(c.attempts - 1, 0) for c in replies),
        "prompt_tokens": sum(c.n_prompt_tokens or 0 for c in ok),
        "completion_tokens": sum(c.n_tokens or 0 for c in ok),
        "token_source": payer.token_source if reported else "unreported",
        "engine_seconds": round(sum(c.engine_s or 0.0 for c in replies), 3),
        "gpu_seconds": round(sum(c.gpu_s or 0.0 for c in replies), 3),
        "unstamped": sum(1 for c in replies if c.engine_s is None),
        "paid_by_runs": len(paid_by),
        "written_by_run": run_id,
        "requests_sent": stats.sent if stats is not None else 0,
        "cache_hits": stats.cache_hits if stats is not None else 0,
        "batched": bool(batched),
        "batched_prompt_tokens": sum(c.n_prompt_tokens or 0 for c in batched),
        "batched_completion_tokens": sum(c.n_tokens or 0 for c in batched),
    }
    return {**row, **money(row, costs.price(*payer.price_names), costs)}


def process_row(payer: Payer, *, seconds: float, gpus: int, tokens: int | None, run_id: str | None, costs: CostsConfig) -> dict:
    """The row of a training or evaluation step: one process that ran `seconds` on `gpus` leased devices."""
    row = {
        "stage": payer.stage,
        "partition": payer.partition,
        "role": payer.role,
        "model": payer.model,
        "requests_ok": 0,
        "requests_failed": 0,
        "retries": 0,
        "prompt_tokens": int(tokens or 0),
        "completion_tokens": 0,
        "token_source": "counted" if tokens is not None else "unreported",
        "engine_seconds": round(seconds, 3),
        "gpu_seconds": round(seconds * gpus, 3),
        "unstamped": 0,
        "paid_by_runs": 1,
        "written_by_run": run_id,
        "requests_sent": 0,
        "cache_hits": 0,
        "batched": False,
        "batched_prompt_tokens": 0,
        "batched_completion_tokens": 0,
    }
    price = costs.price(*payer.price_names)
    # A process's tokens are what it read, not what it bought: only its device time is priced.
    return {**row, **money({**row, "prompt_tokens": 0}, price, costs)}


def money(row: dict, price: Price | None, costs: CostsConfig) -> dict:
    """Token and GPU money of a row, never a guess: null without a price (or one that prices nothing); tokens at the token
    prices (less the batch discount for the tokens of batched replies) - null where tokens were used whose price is missing, 0 for a
    model priced by its GPU time alone; GPU-seconds at the GPU-hour price - null where some of the engine's time is unknown
    (replies cached before the ledger existed). `cost` is null when either part is."""
    base = {
        "currency": costs.currency,
        "price_version": None,
        "input_per_million": None,
        "output_per_million": None,
        "batch_discount": None,
        "gpu_hour": None,
        "token_cost": None,
        "gpu_cost": None,
        "cost": None,
    }
    if price is None or (price.input_per_million is None and price.output_per_million is None and price.gpu_hour is None):
        return base
    discounted = row.get("batched_prompt_tokens", 0), row.get("batched_completion_tokens", 0)
    by_time_alone = price.input_per_million is None and price.output_per_million is None
    unpriced = (row["prompt_tokens"] and price.input_per_million is None) or (row["completion_tokens"] and price.output_per_million is None)
    tokens = (
        0.0
        if by_time_alone
        else None
        if unpriced
        else (
            (row["prompt_tokens"] - discounted[0] * price.batch_discount) * (price.input_per_million or 0.0)
            + (row["completion_tokens"] - discounted[1] * price.batch_discount) * (price.output_per_million or 0.0)
        )
        / 1e6
    )
    if price.gpu_hour is None:
        gpu = 0.0  # priced by its tokens alone: its GPU time is the provider's
    elif row.get("unstamped"):
        gpu = None
    else:
        gpu = row["gpu_seconds"] / 3600 * price.gpu_hour
    return {
        **base,
        "price_version": costs.version,
        "input_per_million": price.input_per_million,
        "output_per_million": price.output_per_million,
        "batch_discount": price.batch_discount,
        "gpu_hour": price.gpu_hour,
        "token_cost": None if tokens is None else round(tokens, 9),
        "gpu_cost": None if gpu is None else round(gpu, 9),
        "cost": None if tokens is None or gpu is None else round(tokens + gpu, 9),
    }


def write_ledger(store: CorpusStore, stage: str, partition: str, rows: list[dict]):
    """Replace the ledger of one step partition (a rerun's rows replace the earlier run's: nothing is counted twice)."""
    return store.write_partition(
        LEDGER_TABLE, {"stage": stage, "partition": partition}, pa.Table.from_pylist(rows, schema=COST_LEDGER.schema)
    )


LEDGER_SUMMARY_SQL = """
SELECT stage, role, model, sum(requests_ok) AS requests_ok, sum(requests_failed) AS requests_failed, sum(retries) AS retries,
       sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
       round(sum(engine_seconds), 1) AS engine_seconds, round(sum(gpu_seconds), 1) AS gpu_seconds,
       CASE WHEN count(DISTINCT currency) = 1 THEN any_value(currency) ELSE 'mixed' END AS currency,
       CASE WHEN count(*) = count(cost) AND count(DISTINCT currency) = 1 THEN round(sum(cost), 6) END AS cost,
       count(*) - count(cost) AS unpriced_partitions
FROM cost_ledger GROUP BY ALL ORDER BY stage, role, model
"""


def ledger_summary(con) -> list[dict]:
    """The ledger summed per stage, role and model (cost null where any partition of it is unpriced, or where its partitions
    were priced in different currencies)."""
    cursor = con.execute(LEDGER_SUMMARY_SQL)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


LEDGER_SHOWN = (
    "role",
    "model",
    "requests_ok",
    "requests_failed",
    "retries",
    "prompt_tokens",
    "completion_tokens",
    "token_source",
    "engine_seconds",
    "gpu_seconds",
    "requests_sent",
    "cache_hits",
    "cost",
)


def ledger_metadata(rows: list[dict]) -> dict:
    """Plain values for a step's metadata (the asset layer shows them; Dagster plots the numbers over time): per model its
    tokens, engine seconds and money (left out where unpriced), and the rows themselves."""
    out: dict = {"cost_ledger": [{k: row[k] for k in LEDGER_SHOWN} for row in rows]}
    for row in rows:
        prefix = f"ledger/{row['role']}/{row['model']}"
        out[f"{prefix}/tokens"] = row["prompt_tokens"] + row["completion_tokens"]
        out[f"{prefix}/engine_seconds"] = row["engine_seconds"]
        if row["cost"] is not None:
            out[f"{prefix}/cost_{row['currency']}"] = row["cost"]
    return out
