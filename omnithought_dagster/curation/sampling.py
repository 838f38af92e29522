"""Tag-diverse, difficulty-stratified, deterministic sampling of a recipe's subset from the filtered set.

The method (docs/curation.md says the same):
1. Quotas. The recipe's difficulty mix is turned into whole quotas per difficulty label that
   sum to the target size (largest remainder).
2. Order. Within a label, candidates are ordered by closeness of their verbosity to the
   label's target (when the recipe sets one), then judge quality (higher first), then a
   pseudo-random key derived from (recipe seed, trace_id) - so ties break the same way every
   time, and differently for a different seed.
3. Tag-diverse draw. Candidates queue by primary tag (their first judge tag). Tags take turns
   in a seed-determined order, each contributing its best remaining candidate, until the
   label's quota is met. A tag stops at its cap: `max_tag_share` x the quota (at least 1), or
   its `tag_caps` entry; a sample stops at `traces_per_sample` members.
4. Shortfall, never silent. When a label cannot fill its quota, the deficit is first drawn
   from the other labels' remaining candidates with the same caps counted over the whole
   subset, then without tag caps; what still cannot be filled (candidates exhausted) is the
   shortfall, reported per label in metadata and by a WARN check.
The members, their order and so `subset_version` (a hash of the member trace ids) depend only
on the filtered set and the recipe.

Controls (`kind: random | filtered`, RecipeConfig) are drawn uniformly instead (`sample_uniform`): every candidate of
their pool in the order of a pseudo-random key from (recipe seed, trace_id), taken while its sample has room
(traces_per_sample), up to the size - the realised size of the curated recipe naming them (`draw`). The pool of
`filtered` is the filtered set; that of `random` every annotated trace that is not contaminated.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from omnithought_dagster.curation.settings import RecipeConfig
from omnithought_dagster.ids import content_id, version_of
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.store.tables import SUBSET_MEMBERS

CANDIDATE_COLUMNS = ["trace_id", "sample_id", "source", "tags", "difficulty_label", "verbosity", "quality"]
UNTAGGED = "untagged"


@dataclass
class Candidates:
    """The filtered set's kept traces as columns (numpy), the input of every recipe."""

    trace_id: np.ndarray
    sample_id: np.ndarray
    source: np.ndarray
    primary_tag: np.ndarray
    label: np.ndarray
    verbosity: np.ndarray  # float, nan when unknown
    quality: np.ndarray  # float, nan when unknown
    order_key: np.ndarray  # uint64 from the trace id

    def __len__(self) -> int:
        return len(self.trace_id)


@dataclass
class SubsetResult:
    members: pa.Table
    strata: list[dict] = field(default_factory=list)  # label, quota, picked (first pass), shortfall
    filled_from_other_labels: int = 0
    filled_without_tag_caps: int = 0
    shortfall: int = 0
    version: str = ""
    candidates: int = 0  # the size of the pool it was drawn from
    target: int = 0  # the size it was drawn for (a control's: its curated recipe's realised size)


def draw(
    store: CorpusStore, recipe: RecipeConfig, curated: RecipeConfig | None = None, teachers: dict[str, str] | None = None
) -> SubsetResult:
    """A recipe's subset from the store's decisions: a curated recipe's selection, or a control's uniform draw - at the
    realised size, with the sources, teachers and traces_per_sample, of the curated recipe naming it (`curated`), else its
    own. `teachers` maps a teacher's name in the project file to its identity in cot_traces (needed when a recipe names
    teachers)."""

    def identities(names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        missing = [n for n in names if n not in (teachers or {})]
        if missing:
            raise KeyError(f"recipe {recipe.name!r}: no identity for teachers {missing}")
        return [teachers[n] for n in names]

    if curated is not None:  # a control: at the realised size of the recipe naming it, with its sources and traces per sample
        size = sample_subset(load_candidates(store, curated.sources, teachers=identities(curated.teachers)), curated).members.num_rows
        taken = {"size": size, "sources": curated.sources, "traces_per_sample": curated.traces_per_sample}
        if recipe.is_control:  # a random or filtered control draws from the same teachers; a curated one names its own
            taken["teachers"] = curated.teachers
        recipe = recipe.model_copy(update=taken)
    candidates = load_candidates(store, recipe.sources, pool=recipe.kind, teachers=identities(recipe.teachers))
    return sample_uniform(candidates, recipe) if recipe.is_control else sample_subset(candidates, recipe)


def load_candidates(store: CorpusStore, sources: list[str] | None, pool: str = "curated", teachers: list[str] | None = None) -> Candidates:
    """The traces of a recipe kind's pool in filter_decisions (all sources, or these; every teacher's, or these teachers'),
    read as small columns only."""
    con = store.catalog(["filter_decisions", "cot_traces"])
    where, params = pool_where(sources, pool, teachers)
    table = con.sql(
        f"SELECT {', '.join(CANDIDATE_COLUMNS)} FROM filter_decisions WHERE {where} ORDER BY trace_id", params=params or None
    ).to_arrow_table()
    con.close()
    return candidates_from_table(table)


# The reasons that keep a trace out of every arm, the random control's too: a benchmark item is never a training example,
# and a trace without annotations is not one of the annotated traces the control draws from.
CONTAMINATION_CODES = ("contaminated_question", "contaminated_image")
UNUSABLE_CODES = (*CONTAMINATION_CODES, "not_annotated")


def pool_where(sources: list[str] | None, kind: str = "curated", teachers: list[str] | None = None) -> tuple[str, dict]:
    """The WHERE clause (and its named parameters) over filter_decisions of a recipe kind's candidates: the kept traces
    (curated, filtered), or every annotated trace that is not contaminated (random); of these sources and these teachers'
    traces (identities in cot_traces.teacher: the clause reads cot_traces, since decisions written before they carried the
    teacher have none)."""
    if kind == "random":
        codes = ", ".join(f"'{code}'" for code in UNUSABLE_CODES)
        clauses = [f"NOT list_has_any(list_transform(reasons, lambda r: r.code), [{codes}])"]
    else:
        clauses = ["kept"]
    params: dict = {}
    if sources:
        clauses.append("source IN (SELECT unnest($sources::VARCHAR[]))")
        params["sources"] = sources
    if teachers is not None:
        clauses.append("trace_id IN (SELECT trace_id FROM cot_traces WHERE list_contains($teachers::VARCHAR[], teacher))")
        params["teachers"] = teachers
    return " AND ".join(clauses), params


def candidates_from_table(table: pa.Table) -> Candidates:
    trace_ids = np.asarray(table.column("trace_id").to_numpy(zero_copy_only=False), dtype=object)
    tags = table.column("tags").to_pylist()
    return Candidates(
        trace_id=trace_ids,
        sample_id=np.asarray(table.column("sample_id").to_numpy(zero_copy_only=False), dtype=object),
        source=np.asarray(table.column("source").to_numpy(zero_copy_only=False), dtype=object),
        primary_tag=np.asarray([t[0] if t else UNTAGGED for t in tags], dtype=object),
        label=np.asarray(table.column("difficulty_label").to_numpy(zero_copy_only=False), dtype=object),
        verbosity=table.column("verbosity").to_numpy(zero_copy_only=False).astype(float),
        quality=table.column("quality").to_numpy(zero_copy_only=False).astype(float),
        order_key=np.fromiter((int(t[:16], 16) for t in trace_ids), dtype=np.uint64, count=len(trace_ids)),
    )


def sample_uniform(candidates: Candidates, recipe: RecipeConfig) -> SubsetResult:
    """A control's members: the pool in a seed-determined pseudo-random order, a sample at most traces_per_sample times."""
    mask = np.isin(candidates.source, recipe.sources) if recipe.sources else np.ones(len(candidates), dtype=bool)
    rows = np.flatnonzero(mask)
    rows = rows[np.argsort(_mix(candidates.order_key[rows] ^ _seed_key(recipe.seed)), kind="stable")]
    per_sample: dict[str, int] = defaultdict(int)
    picks = []
    for row in rows:
        if len(picks) == recipe.size:
            break
        sample = candidates.sample_id[row]
        if per_sample[sample] < recipe.traces_per_sample:
            per_sample[sample] += 1
            picks.append((int(row), f"{candidates.label[row]}/{candidates.primary_tag[row]}"))
    result = _result(candidates, recipe, picks)
    result.shortfall = recipe.size - len(picks)
    return result


def sample_subset(candidates: Candidates, recipe: RecipeConfig) -> SubsetResult:
    quotas = _quotas(recipe.size, recipe.difficulty_mix)
    mask = np.ones(len(candidates), dtype=bool)
    if recipe.sources:
        mask &= np.isin(candidates.source, recipe.sources)
    random_key = _mix(candidates.order_key ^ _seed_key(recipe.seed))
    state = _State(recipe, candidates)
    strata, from_other_labels, without_tag_caps = [], 0, 0
    queues_by_label = {}
    for label, quota in quotas.items():
        rows = np.flatnonzero(mask & (candidates.label == label))
        queues_by_label[label] = _queues(rows, candidates, recipe.verbosity_targets.get(label), random_key, recipe.seed)
        cap = max(1, math.floor(recipe.max_tag_share * quota))
        picked = state.draw(queues_by_label[label], quota, cap, label)
        strata.append({"label": label, "quota": quota, "picked": picked, "shortfall": quota - picked})
    deficit = sum(s["shortfall"] for s in strata)
    if deficit:
        # Fill from every label's leftovers (larger mix shares first), caps over the whole subset.
        cap = max(1, math.floor(recipe.max_tag_share * recipe.size))
        order = sorted(quotas, key=lambda label: -recipe.difficulty_mix[label])
        for label in order:
            got = state.draw(queues_by_label[label], deficit, cap, label, whole_subset=True)
            from_other_labels += got
            deficit -= got
        for label in order:
            got = state.draw(queues_by_label[label], deficit, None, label, whole_subset=True)
            without_tag_caps += got
            deficit -= got
    result = _result(candidates, recipe, state.picks)
    result.strata, result.filled_from_other_labels, result.filled_without_tag_caps = strata, from_other_labels, without_tag_caps
    result.shortfall = deficit
    return result


def _result(candidates: Candidates, recipe: RecipeConfig, picks: list[tuple[int, str]]) -> SubsetResult:
    """The members of a draw, in pick order, with their version."""
    result = SubsetResult(members=pa.table({}), candidates=len(candidates), target=recipe.size)
    trace_ids = [candidates.trace_id[i] for i, _ in picks]
    result.version = version_of(trace_ids)
    result.members = pa.Table.from_pylist(
        [
            {
                "subset": recipe.name,
                "subset_version": result.version,
                "trace_id": candidates.trace_id[i],
                "sample_id": candidates.sample_id[i],
                "source": candidates.source[i],
                "stratum": stratum,
                "pick": n,
            }
            for n, (i, stratum) in enumerate(picks)
        ],
        schema=SUBSET_MEMBERS.schema,
    )
    return result


class _State:
    def __init__(self, recipe: RecipeConfig, candidates: Candidates):
        self.recipe = recipe
        self.candidates = candidates
        self.per_sample: dict[str, int] = defaultdict(int)
        self.per_tag_label: dict[tuple[str, str], int] = defaultdict(int)
        self.per_tag: dict[str, int] = defaultdict(int)
        self.taken: set[int] = set()
        self.picks: list[tuple[int, str]] = []

    def draw(self, queues: dict[str, list], wanted: int, cap: int | None, label: str, whole_subset: bool = False) -> int:
        """Round-robin over tags; returns how many were picked (at most `wanted`)."""
        picked = 0
        active = [tag for tag in queues if queues[tag][1] < len(queues[tag][0])]
        while picked < wanted and active:
            still = []
            for tag in active:
                if picked >= wanted:
                    still.append(tag)
                    continue
                count = self.per_tag[tag] if whole_subset else self.per_tag_label[(tag, label)]
                limit = min(cap if cap is not None else math.inf, self.recipe.tag_caps.get(tag, math.inf))
                if count >= limit or self.per_tag[tag] >= self.recipe.tag_caps.get(tag, math.inf):
                    continue  # this tag is full
                rows, position = queues[tag]
                while position < len(rows):
                    row = rows[position]
                    position += 1
                    sample = self.candidates.sample_id[row]
                    if row in self.taken or self.per_sample[sample] >= self.recipe.traces_per_sample:
                        continue
                    self.taken.add(row)
                    self.per_sample[sample] += 1
                    self.per_tag[tag] += 1
                    self.per_tag_label[(tag, label)] += 1
                    self.picks.append((row, f"{label}/{tag}"))
                    picked += 1
                    break
                queues[tag][1] = position
                if position < len(rows):
                    still.append(tag)
            active = still
        return picked


def _queues(rows: np.ndarray, c: Candidates, target: float | None, random_key: np.ndarray, seed: int) -> dict[str, list]:
    """tag -> [row indices in preference order, read position]; tags in a seed-determined order."""
    if len(rows) == 0:
        return {}
    distance = np.abs(np.nan_to_num(c.verbosity[rows], nan=99.0) - target) if target is not None else np.zeros(len(rows))
    quality = -np.nan_to_num(c.quality[rows], nan=-1.0)
    order = rows[np.lexsort((random_key[rows], quality, distance))]
    by_tag: dict[str, list[int]] = defaultdict(list)
    for row in order:
        by_tag[c.primary_tag[row]].append(int(row))
    tags = sorted(by_tag, key=lambda tag: content_id("tag-order", [seed, tag]))
    return {tag: [by_tag[tag], 0] for tag in tags}


def _seed_key(seed: int) -> np.uint64:
    return np.uint64(int(content_id("recipe-seed", seed)[:16], 16))


def _quotas(size: int, mix: dict[str, float]) -> dict[str, int]:
    exact = {label: size * share for label, share in mix.items()}
    quotas = {label: math.floor(value) for label, value in exact.items()}
    for label in sorted(exact, key=lambda label: (-(exact[label] - quotas[label]), label))[: size - sum(quotas.values())]:
        quotas[label] += 1
    return quotas


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (splitmix64): turns structured keys into well-spread pseudo-random ones."""
    x = x.copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x
