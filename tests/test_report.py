"""`omnithought report`: one self-contained HTML file with the curation's numbers and plots."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from omnithought_dagster.cli import app
from omnithought_dagster.config import load_config
from omnithought_dagster.defs import FILTER_JOB, SUBSET_JOB
from omnithought_dagster.report import write_report
from omnithought_dagster.store import CorpusStore

from conftest import run_job, write_config
from curation_data import build_store


def test_report_of_a_curated_store_is_self_contained(tmp_path, instance):
    build_store(tmp_path / "store", n_samples=24)
    config = load_config(
        write_config(
            tmp_path,
            [{"name": "synthetic", "kind": "synthetic", "n_samples": 24}],
            recipes=[{"name": "even", "size": 12, "difficulty_mix": {"easy": 1, "medium": 1, "hard": 1}}],
        )
    )
    assert run_job(config, instance, FILTER_JOB, "synthetic").success and run_job(config, instance, SUBSET_JOB, "even").success
    result = CliRunner().invoke(app, ["report", "--out", str(tmp_path / "r/report.html"), "--config", config.config_path])
    assert result.exit_code == 0 and "9 sections" in result.output
    page = (tmp_path / "r/report.html").read_text()
    sources = re.findall(r"src='([^']*)'", page)
    assert len(sources) >= 5 and all(s.startswith("data:image/png;base64,") for s in sources)  # nothing fetched from anywhere
    assert "http://" not in page and "https://" not in page
    for caption in ["samples by difficulty label", "drop reasons", "even: members by difficulty", "rollout pass rate per sample"]:
        assert caption in page, caption
    assert "<td>synthetic</td><td>48</td><td>96</td>" in page  # of 24 samples x 4 rollouts, 2 per sample kept
    assert "none trained yet" in page and "none scored yet" in page
    # The teachers side by side (one here) and the costs (no model step wrote a ledger: the store was built by hand).
    assert "<h2>Teachers</h2>" in page and "no ledger yet" in page


def test_report_of_an_empty_store_says_what_is_missing(tmp_path):
    report = write_report(CorpusStore(str(tmp_path / "empty")), tmp_path / "report.html")
    page = report.path.read_text()
    assert report.figures == 0 and "empty: materialise seed_pool" in page and "empty: materialise filtered_set" in page
    assert "empty: materialise cot_traces" in page and "no ledger yet" in page
