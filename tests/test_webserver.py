"""The Dagster webserver over an instance the demo materialised: what `make ui` shows.

One demo run (all seven stages: seed pool, traces, annotations, filtered set, subsets, a
trained tiny student, its scores) serves two tests: the GraphQL API the UI's pages use, and
Debian's chromium driven by Playwright through the asset catalog, the asset graph, the checks
and the materialisation metadata plots (screenshots saved under the test's tmp folder).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omnithought_dagster.cli import app
from omnithought_dagster.llm.vllm_server import free_port

from conftest import SERVED_NAME, wait_for_webserver, write_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = json.loads(response.read())
    assert "errors" not in payload, payload
    return payload["data"]


STAGES = ["seed_pool", "cot_traces", "annotations", "filtered_set", "sampled_subsets", "student_checkpoints", "benchmark_scores"]


@pytest.fixture(scope="module")
def served_project(tmp_path_factory, vllm_server):
    """A small project with every stage, materialised by `omnithought demo` into its own Dagster home."""
    folder = tmp_path_factory.mktemp("ui")
    config = write_config(
        folder,
        [{"name": "synthetic", "kind": "synthetic", "n_samples": 12}],
        teacher={"backend": "openai", "base_url": vllm_server.base_url, "model": SERVED_NAME, "name": "tiny-test"},
        generation={"rollouts": 4, "shards": 1, "max_tokens": 64, "reasoning_max_chars": 60, "answer_max_chars": 12},
        benchmarks=[{"name": "held", "kind": "synthetic", "n_samples": 4, "seed": 7, "start_index": 5000}],
        # The random tiny teacher is mostly wrong: keep wrong answers so the subset is not empty.
        curation={
            "rules": {"drop_wrong_answers": False, "drop_truncated": False, "min_tokens": 1},
            "selection": {"drop_unsolvable": False, "trivial_min_pass_rate": 1.0},
        },
        recipes=[{"name": "mix", "size": 6, "difficulty_mix": {"easy": 1, "medium": 1, "hard": 1}}],
        students=[{"name": "tiny", "model": "tiny:student"}],
        training={"micro_batch_size": 2, "learning_rate": 0.005, "max_steps": 4, "max_length": 1024},
        evaluation={"python": str(REPO / ".venv-lmms/bin/python"), "benchmarks": ["held"], "max_new_tokens": 16},
    )
    home = folder / "dagster_home"
    result = CliRunner().invoke(app, ["demo", "--config", str(config)], env={"DAGSTER_HOME": str(home)})
    assert result.exit_code == 0, result.output
    return config, home


@pytest.fixture(scope="module")
def webserver(served_project):
    config, home = served_project
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "OMNITHOUGHT_CONFIG": str(config)}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_webserver(port, process)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_ui_api_shows_asset_partitions_checks_and_preview(webserver):
    nodes = _graphql(
        webserver,
        """{ assetNodes { assetKey { path } groupName partitionKeys
        partitionStats { numMaterialized }
        assetChecksOrError { ... on AssetChecks { checks { name executionForLatestMaterialization { status } } } } } }""",
    )["assetNodes"]
    seed = next(n for n in nodes if n["assetKey"]["path"] == ["seed_pool"])
    assert seed["groupName"] == "seed" and seed["partitionKeys"] == ["synthetic"]
    assert seed["partitionStats"]["numMaterialized"] == 1
    statuses = {c["name"]: (c["executionForLatestMaterialization"] or {}).get("status") for c in seed["assetChecksOrError"]["checks"]}
    assert statuses == {
        name: "SUCCEEDED"
        for name in ["answer_type_valid", "images_in_store", "required_columns_present", "row_accounting", "sample_id_unique"]
    }

    traces = next(n for n in nodes if n["assetKey"]["path"] == ["cot_traces"])
    assert traces["groupName"] == "teacher" and traces["partitionKeys"] == ["000|synthetic"]
    assert {(c["executionForLatestMaterialization"] or {}).get("status") for c in traces["assetChecksOrError"]["checks"]} == {"SUCCEEDED"}
    assert len(traces["assetChecksOrError"]["checks"]) == 6

    asset = _graphql(
        webserver,
        """{ assetOrError(assetKey: {path: ["seed_pool"]}) { ... on Asset {
        assetMaterializations(limit: 1) { partition metadataEntries { label
            ... on MarkdownMetadataEntry { mdStr } ... on IntMetadataEntry { intValue } } } } } }""",
    )["assetOrError"]
    (materialisation,) = asset["assetMaterializations"]
    entries = {e["label"]: e for e in materialisation["metadataEntries"]}
    assert materialisation["partition"] == "synthetic"
    assert entries["dagster/row_count"]["intValue"] == 12
    assert entries["preview"]["mdStr"].startswith("| sample_id | native_id | question")

    # The teacher report on the filtered set's page, the cost ledger on the model steps' pages.
    labels = {
        key: {e["label"]: e for e in _latest_metadata(webserver, key)}
        for key in ("filtered_set", "cot_traces", "annotations", "student_checkpoints", "benchmark_scores")
    }
    assert labels["filtered_set"]["teachers"]["mdStr"].startswith("| teacher | traces | accuracy")
    assert "tiny-test" in labels["filtered_set"]["teachers"]["mdStr"]
    assert {"teacher/tiny-test/accuracy", "teacher/tiny-test/kept_share"} <= set(labels["filtered_set"])
    assert labels["cot_traces"]["ledger/teacher/tiny-test/tokens"]["intValue"] > 0
    assert "ledger/judge/tiny-test/tokens" in labels["annotations"]
    assert "ledger/training/tiny/engine_seconds" in labels["student_checkpoints"]
    assert "ledger/evaluation/tiny/engine_seconds" in labels["benchmark_scores"]


def _latest_metadata(port: int, asset: str) -> list[dict]:
    entries = (
        "metadataEntries { label ... on MarkdownMetadataEntry { mdStr } ... on IntMetadataEntry { intValue } "
        "... on FloatMetadataEntry { floatValue } }"
    )
    key = json.dumps([asset])
    found = _graphql(
        port, "{ assetOrError(assetKey: {path: " + key + "}) { ... on Asset { assetMaterializations(limit: 1) { " + entries + " } } } }"
    )["assetOrError"]
    return found["assetMaterializations"][0]["metadataEntries"]


# -- a real browser --------------------------------------------------------------------------------

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# asset -> a plot its latest materialisation carries (the Events tab opens on the latest one)
PLOTS = {
    "annotations": "plot/difficulty",
    "filtered_set": "plot/drop_reasons",
    "sampled_subsets": "plot/composition",
    "student_checkpoints": "plot/loss_curve",
    "benchmark_scores": "plot/scores",
}


def _shown_as(text: str, name: str) -> bool:
    """A graph node shows a long name shortened in the middle (`stude…_checkpoints`) when zoomed out."""
    text = text.strip()
    if "…" not in text:
        return text == name
    head, tail = text.split("…", 1)
    return name.startswith(head) and name.endswith(tail)


def _chromium() -> str:
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip(
            "chromium is not installed and `make browser` could not install it (it needs apt-get as root or "
            "password-less sudo); the browser test needs Debian's chromium"
        )
    return path


def test_browser_shows_assets_graph_checks_and_metadata_plots(webserver, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base = f"http://127.0.0.1:{webserver}"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)
            # A fresh instance greets with a "Join the Dagster community" dialog: skip it whenever it shows.
            page.add_locator_handler(
                page.get_by_text("Join the Dagster community"), lambda: page.get_by_role("button", name="Skip").click()
            )

            page.goto(f"{base}/assets")
            for asset in STAGES:
                expect(page.locator(f"a[href='/assets/{asset}']").first).to_be_visible()
            page.screenshot(path=shots / "catalog.png", full_page=True)

            # the asset graph: everything upstream of the scores, every stage a node
            page.goto(f"{base}/assets/benchmark_scores?view=lineage&lineageScope=upstream&lineageDepth=10")
            names = page.locator("[class*='AssetNode_assetName']")
            expect(names.filter(has_text="seed_pool").first).to_be_visible()
            # the graph lays nodes out progressively: wait until every stage has one
            deadline = time.monotonic() + 60
            while True:
                shown = names.all_inner_texts()
                if all(any(_shown_as(text, asset) for text in shown) for asset in STAGES):
                    break
                assert time.monotonic() < deadline, shown
                page.wait_for_timeout(250)
            page.screenshot(path=shots / "graph.png")

            page.goto(f"{base}/assets/seed_pool?view=checks")
            for check in ("row_accounting", "sample_id_unique", "images_in_store"):
                expect(page.get_by_text(check, exact=True).first).to_be_visible()
            page.screenshot(path=shots / "seed_pool_checks.png")

            for asset, plot in PLOTS.items():
                page.goto(f"{base}/assets/{asset}?view=events")
                row = page.locator("tr", has_text=plot)
                row.get_by_text("[Show Markdown]").click()
                dialog = page.get_by_role("dialog")
                image = dialog.locator("img[src^='data:image/png']")
                expect(image).to_be_visible()
                dialog.evaluate(
                    "d => Promise.allSettled(d.getAnimations({subtree: true}).map(a => a.finished))"
                )  # faded in (or the fade cancelled)
                # decoded by the browser (decode() settles once it is: data URIs decode asynchronously), at the figure's pixel size
                assert image.evaluate("i => i.decode().then(() => [i.complete, i.naturalWidth, i.naturalHeight])") == [True, 700, 320], (
                    asset
                )
                page.screenshot(path=shots / f"{asset}_{plot.split('/')[1]}.png")
                dialog.get_by_role("button", name="Close").click()
                expect(dialog).to_have_count(0)
        finally:
            browser.close()
    assert sorted(p.name for p in shots.iterdir()) == sorted(
        ["catalog.png", "graph.png", "seed_pool_checks.png"] + [f"{a}_{p.split('/')[1]}.png" for a, p in PLOTS.items()]
    )
