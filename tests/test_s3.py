"""The corpus store on S3: an S3-API server on loopback (moto in server mode), keys through EnvVar.

Tables, images, the result cache and checkpoints go to the bucket; DuckDB reads the tables
through pyarrow datasets (no DuckDB extension or network), so checks, lineage and the CLI work
unchanged.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
from typer.testing import CliRunner

from omnithought_dagster.cli import app
from omnithought_dagster.config import StoreConfig, load_config
from omnithought_dagster.defs import FILTER_JOB, SEED_JOB, SUBSET_JOB, build_definitions
from omnithought_dagster.llm.vllm_server import free_port
from omnithought_dagster.store import open_store

from conftest import check_evaluations, materializations, run_job, write_config, write_image, write_json
from curation_data import build_store

BUCKET = "corpus"
KEYS = {"OMNI_S3_KEY": "omnithought-test", "OMNI_S3_SECRET": "not-a-real-secret"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on a free loopback port, with one bucket."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=KEYS["OMNI_S3_KEY"],
            aws_secret_access_key=KEYS["OMNI_S3_SECRET"],
        ).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def s3_store_config(s3_endpoint, monkeypatch, request):
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    # No ambient AWS keys: the store must get its keys from the env vars the project file names.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return {
        "root": f"s3://{BUCKET}/{request.node.name}",
        "endpoint_url": s3_endpoint,
        "region": "us-east-1",
        "access_key_env": "OMNI_S3_KEY",
        "secret_key_env": "OMNI_S3_SECRET",
    }


def _objects(endpoint: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEYS["OMNI_S3_KEY"],
        aws_secret_access_key=KEYS["OMNI_S3_SECRET"],
    )
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_seed_ingest_checks_lineage_and_cli_on_s3(tmp_path, instance, s3_store_config, s3_endpoint):
    write_image(tmp_path / "imgs/a.png", 1)
    files = {
        "name": "files",
        "kind": "json",
        "path": str(
            write_json(
                tmp_path / "f.json",
                [
                    {"id": "r1", "question": "How many?", "answer": "3", "image": "a.png"},
                    {"id": "r2", "question": "Gone?", "answer": "1", "image": "missing.png"},
                ],
            )
        ),
        "image_root": str(tmp_path / "imgs"),
    }
    config = load_config(write_config(tmp_path, [{"name": "synthetic", "kind": "synthetic", "n_samples": 8}, files], store=s3_store_config))
    for source in ("synthetic", "files"):
        result = run_job(config, instance, SEED_JOB, source)
        assert result.success and all(c.passed for c in check_evaluations(result).values()), source
    assert materializations(result)["seed_pool"]["path"].startswith(f"s3://{BUCKET}/")
    prefix = s3_store_config["root"].split(f"{BUCKET}/", 1)[1]
    keys = _objects(s3_endpoint, prefix)
    assert f"{prefix}/tables/seed_pool/source=synthetic/data.parquet" in keys
    assert f"{prefix}/tables/quarantine/source=files/data.parquet" in keys
    images = [k for k in keys if re.fullmatch(rf"{re.escape(prefix)}/images/[0-9a-f]{{2}}/[0-9a-f]{{32}}", k)]
    assert len(images) == 9  # 8 synthetic pictures + the file's one (Arrow also writes folder markers)

    runner = CliRunner()
    stats = runner.invoke(app, ["stats", "--config", config.config_path, "--json"])
    assert stats.exit_code == 0 and '"rows": 9' in stats.stdout
    story = runner.invoke(app, ["lineage", "files/r2", "--config", config.config_path])
    assert story.exit_code == 0 and "missing_image" in story.output


def test_curation_export_checkpoints_and_cache_on_s3(tmp_path, instance, s3_store_config):
    store = open_store(StoreConfig(**s3_store_config))
    build_store(store, n_samples=12)
    config = load_config(
        write_config(
            tmp_path,
            [{"name": "synthetic", "kind": "synthetic", "n_samples": 12}],
            store=s3_store_config,
            recipes=[{"name": "even", "size": 6, "difficulty_mix": {"easy": 1, "medium": 1, "hard": 1}}],
        )
    )
    for job, partition in [(FILTER_JOB, "synthetic"), (SUBSET_JOB, "even")]:
        result = run_job(config, instance, job, partition)
        failed = {n: c.description for n, c in check_evaluations(result).items() if not c.passed and c.severity.value == "ERROR"}
        assert result.success and not failed, (job, failed)
    assert store.read_partition("subset_members", "even").num_rows == 6

    from omnithought_dagster.curation.export import export_subset

    report = export_subset(store, "even", "llamafactory", tmp_path / "export")
    assert report.examples == 6 and len(list((tmp_path / "export/images").iterdir())) == report.images

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "sub").mkdir()
    (model / "sub/weights.bin").write_bytes(b"\x00" * 1000)
    uri = store.checkpoints.put("c" * 32, model, {"row": {"checkpoint_id": "c" * 32}})
    assert uri.startswith(f"s3://{BUCKET}/") and store.checkpoints.exists("c" * 32)
    local = store.checkpoints.local_dir("c" * 32, tmp_path / "downloads")
    assert (local / "sub/weights.bin").read_bytes() == b"\x00" * 1000 and store.checkpoints.manifest("c" * 32)["row"]

    cache = store.cache("generation")
    partition = {"source": "synthetic", "shard": "000"}
    cache.append(partition, [("k1", {"text": "a"}), ("k2", {"text": "b"})])
    cache.append(partition, [("k1", {"text": "newer"})])
    cache.compact(partition)
    assert cache.load(partition) == {"k1": {"text": "newer"}, "k2": {"text": "b"}} and cache.batch_count(partition) == 1


def test_training_checkpoints_of_a_run_round_trip_through_s3(tmp_path, s3_store_config, s3_endpoint):
    """A killed run's training checkpoints reach the bucket marker last, and a fresh machine restores the newest."""
    from test_run_checkpoints import _checkpoint

    from omnithought_dagster.train.checkpoints import COMPLETE, RunCheckpoints, complete_steps

    store = open_store(StoreConfig(**s3_store_config))
    run = RunCheckpoints(store, "d" * 32)
    local = tmp_path / "trainer" / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        with run.uploading(local, keep=1, log=lambda m: None, poll_s=0.05):
            for step in (5, 10):
                _checkpoint(local, step)
                deadline = time.monotonic() + 30
                while step not in run.steps():
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            raise KeyboardInterrupt  # the step is stopped
    keys = [
        key for key in _objects(s3_endpoint, f"{s3_store_config['root'].split('/', 3)[3]}/runs/{'d' * 32}/") if not key.endswith("/")
    ]  # Arrow's folder markers aside
    assert keys and all("/checkpoint-10/" in key for key in keys) and any(key.endswith(f"checkpoint-10/{COMPLETE}") for key in keys)
    fresh = tmp_path / "other-machine" / "checkpoints"
    assert run.restore(fresh, log=lambda m: None) == 10 and complete_steps(fresh) == [10]
    assert (fresh / "checkpoint-10/global_step10/optim_states.pt").read_text() == "optimizer 10"
    run.delete()
    assert run.steps() == [] and not [
        key for key in _objects(s3_endpoint, f"{s3_store_config['root'].split('/', 3)[3]}/runs/{'d' * 32}/") if not key.endswith("/")
    ]


def test_a_local_root_is_unchanged(tmp_path):
    store = open_store(StoreConfig(root=str(tmp_path / "local")))
    assert store.is_local and Path(store.root) == (tmp_path / "local").resolve()


def test_manifest_sensor_watches_an_s3_prefix(tmp_path, instance, s3_store_config, s3_endpoint):
    """A manifest uploaded under the watched prefix becomes a partition whose seed_pool run writes to the bucket."""
    import boto3
    import yaml

    from omnithought_dagster.sensors import SENSOR_NAME

    prefix = s3_store_config["root"].split(f"{BUCKET}/", 1)[1] + "-manifests"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEYS["OMNI_S3_KEY"],
        aws_secret_access_key=KEYS["OMNI_S3_SECRET"],
    )
    client.put_object(
        Bucket=BUCKET, Key=f"{prefix}/lake.yaml", Body=yaml.safe_dump({"kind": "synthetic", "n_samples": 4, "seed": 5}).encode()
    )
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/nested/ignored.yaml", Body=b"kind: synthetic\n")  # only files directly under it
    config = load_config(write_config(tmp_path, [], store=s3_store_config, operations={"source_manifests": f"s3://{BUCKET}/{prefix}"}))
    defs = build_definitions(config)
    with dg.build_sensor_context(instance=instance, definitions=defs) as context:
        tick = defs.resolve_sensor_def(SENSOR_NAME)(context)
    assert [r.partition_key for r in tick.run_requests] == ["lake"]
    assert tick.run_requests[0].tags["omnithought/manifest"] == f"{BUCKET}/{prefix}/lake.yaml"
    instance.add_dynamic_partitions("sources", ["lake"])
    result = run_job(config, instance, SEED_JOB, "lake")
    assert result.success and all(c.passed for c in check_evaluations(result).values())
    store_prefix = s3_store_config["root"].split(f"{BUCKET}/", 1)[1]
    assert f"{store_prefix}/tables/seed_pool/source=lake/data.parquet" in _objects(s3_endpoint, store_prefix)


def test_a_manifest_in_s3_names_no_local_path_and_no_other_prefix(tmp_path, instance, s3_store_config, s3_endpoint):
    """A manifest uploaded to the watched prefix may not make a worker read its own disk (a relative path would be the
    worker's working folder, an absolute one anything), nor name a URI (the readers read local files: an s3:// path
    would be read as a local one); refused with the reason, and the sensor requests nothing for it."""
    import boto3
    import yaml

    from omnithought_dagster.manifests import manifest_filesystem, scan_manifests
    from omnithought_dagster.sensors import SENSOR_NAME

    prefix = s3_store_config["root"].split(f"{BUCKET}/", 1)[1] + "-manifests"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEYS["OMNI_S3_KEY"],
        aws_secret_access_key=KEYS["OMNI_S3_SECRET"],
    )
    bodies = {
        "relative": {"kind": "json", "path": "creds.jsonl"},
        "absolute": {"kind": "json", "path": str(tmp_path / "creds.jsonl")},
        "roots": {"kind": "json", "path": f"s3://{BUCKET}/{prefix}/d.jsonl", "allowed_image_roots": ["/"]},
        "otherbucket": {"kind": "json", "path": "s3://another-bucket/d.jsonl"},
        "climbs": {"kind": "json", "path": f"s3://{BUCKET}/{prefix}/../elsewhere/d.jsonl"},
        "inside": {"kind": "json", "path": f"s3://{BUCKET}/{prefix}/data/d.jsonl"},
        "lake": {"kind": "synthetic", "n_samples": 3},
    }
    for name, body in bodies.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}.yaml", Body=yaml.safe_dump(body).encode())
    config = load_config(write_config(tmp_path, [], store=s3_store_config, operations={"source_manifests": f"s3://{BUCKET}/{prefix}"}))
    found = {m.name: m for m in scan_manifests(config, *manifest_filesystem(config))}
    assert found["lake"].source is not None  # a synthetic source names no path
    for name in ("relative", "absolute"):
        assert found[name].source is None and "a manifest in S3 names no local path" in found[name].error, name
    for name in ("roots", "otherbucket", "climbs", "inside"):  # the readers read local files: no URI is readable
        assert found[name].source is None and "may not name a URI" in found[name].error, name
    defs = build_definitions(config)
    with dg.build_sensor_context(instance=instance, definitions=defs) as context:
        tick = defs.resolve_sensor_def(SENSOR_NAME)(context)
    assert [r.partition_key for r in tick.run_requests] == ["lake"]
