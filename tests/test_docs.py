"""The docs state what the code does: generated table reference, every quarantine reason."""

from pathlib import Path

from omnithought_dagster.seed.sources import QuarantineReason
from omnithought_dagster.store.tables import tables_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_table_reference_is_generated_from_the_specs():
    assert (DOCS / "tables.md").read_text() == tables_markdown(), "run: omnithought tables > docs/tables.md"


def test_every_quarantine_reason_is_documented():
    text = (DOCS / "store.md").read_text()
    missing = [r.value for r in QuarantineReason if f"| `{r.value}` |" not in text]
    assert not missing


def test_every_quarantine_reason_has_an_example():
    rows = {
        line.split("|")[1].strip(" `"): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in (DOCS / "store.md").read_text().splitlines()
        if line.startswith("| `")
    }
    without = [r.value for r in QuarantineReason if len(rows.get(r.value, [])) != 2 or "->" not in rows[r.value][1]]
    assert not without
