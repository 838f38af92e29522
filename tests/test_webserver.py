"""The Dagster webserver over the demo's instance serves the asset, its partitions, checks and metadata.

This is what `make ui` shows, asked through the same GraphQL API the UI's pages use. (The
rendered pages in a real browser are covered by the operations issue.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import SERVED_NAME, write_config
from omnithought_dagster.cli import app

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = json.loads(response.read())
    assert "errors" not in payload, payload
    return payload["data"]


@pytest.fixture
def webserver(tmp_path, monkeypatch, vllm_server):
    config = write_config(
        tmp_path, [{"name": "synthetic", "kind": "synthetic", "n_samples": 12}],
        teacher={"backend": "openai", "base_url": vllm_server.base_url, "model": SERVED_NAME, "name": "tiny-test"},
        generation={"rollouts": 4, "shards": 1, "max_tokens": 64, "reasoning_max_chars": 60, "answer_max_chars": 12},
    )
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert CliRunner().invoke(app, ["demo", "--config", str(config)]).exit_code == 0
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "OMNITHOUGHT_CONFIG": str(config)}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"webserver did not start:\n{process.stdout.read().decode()}") from None
                time.sleep(0.5)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_ui_api_shows_asset_partitions_checks_and_preview(webserver):
    nodes = _graphql(webserver, """{ assetNodes { assetKey { path } groupName partitionKeys
        partitionStats { numMaterialized }
        assetChecksOrError { ... on AssetChecks { checks { name executionForLatestMaterialization { status } } } } } }""")["assetNodes"]
    seed = next(n for n in nodes if n["assetKey"]["path"] == ["seed_pool"])
    assert seed["groupName"] == "seed" and seed["partitionKeys"] == ["synthetic"]
    assert seed["partitionStats"]["numMaterialized"] == 1
    statuses = {c["name"]: (c["executionForLatestMaterialization"] or {}).get("status") for c in seed["assetChecksOrError"]["checks"]}
    assert statuses == {name: "SUCCEEDED" for name in
                        ["answer_type_valid", "images_in_store", "required_columns_present", "row_accounting", "sample_id_unique"]}

    traces = next(n for n in nodes if n["assetKey"]["path"] == ["cot_traces"])
    assert traces["groupName"] == "teacher" and traces["partitionKeys"] == ["000|synthetic"]
    assert {(c["executionForLatestMaterialization"] or {}).get("status") for c in traces["assetChecksOrError"]["checks"]} == {"SUCCEEDED"}
    assert len(traces["assetChecksOrError"]["checks"]) == 6

    asset = _graphql(webserver, """{ assetOrError(assetKey: {path: ["seed_pool"]}) { ... on Asset {
        assetMaterializations(limit: 1) { partition metadataEntries { label
            ... on MarkdownMetadataEntry { mdStr } ... on IntMetadataEntry { intValue } } } } } }""")["assetOrError"]
    (materialisation,) = asset["assetMaterializations"]
    entries = {e["label"]: e for e in materialisation["metadataEntries"]}
    assert materialisation["partition"] == "synthetic"
    assert entries["dagster/row_count"]["intValue"] == 12
    assert entries["preview"]["mdStr"].startswith("| sample_id | native_id | question")
