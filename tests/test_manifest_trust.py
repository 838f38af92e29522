"""The trust boundary of source manifests: a manifest reads only inside the roots the project file grants.

A canary file is planted outside the manifest folder; manifests try every way out (an absolute path, `..`, `~`, a
symlink inside the folder, a folder holding a symlink that leads out, an image root or allowed_image_roots outside, an
s3:// URI); each is refused with its reason, through the sensor and through the seed step as a user would run them,
and no row, log line, event or metadata value anywhere under the test's folders holds the canary. A manifest that stays
inside runs as before; a granted root lets one read further; the project file's own sources keep their freedom.
Excerpts of quarantined records are bounded and redacted (redact.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from omnithought_dagster.config import load_config
from omnithought_dagster.defs import SEED_JOB, build_definitions
from omnithought_dagster.manifests import manifest_filesystem, scan_manifests
from omnithought_dagster.redact import REDACTED, redact
from omnithought_dagster.seed.sources.base import RAW_EXCERPT_CHARS, bounded_excerpt
from omnithought_dagster.sensors import SENSOR_NAME
from omnithought_dagster.store import CorpusStore

from conftest import write_config

CANARY = "CANARY-7f3a9c51-never-to-be-read"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "Q9z3x8LkP2"


def _plant(tmp_path: Path) -> Path:
    """A credentials-like file outside the manifest folder, and a folder of images beside it."""
    outside = tmp_path / "outside"
    (outside / "pics").mkdir(parents=True)
    lines = [
        f"[default] {CANARY}",
        f"aws_secret_access_key = {SECRET}",
        json.dumps({"id": CANARY, "question": f"what is {CANARY}?", "answer": CANARY, "image": "a.png"}),
    ]
    (outside / "creds.jsonl").write_text("\n".join(lines) + "\n")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(outside / "pics" / "a.png")
    return outside


def _good_data(folder: Path) -> None:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "data" / "a.png")
    records = [{"id": f"g{i}", "question": f"How many squares? ({i})", "answer": "1", "image": "a.png"} for i in range(3)]
    (folder / "data" / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


ESCAPES = {  # manifest name -> (body, the field its refusal names)
    "absolute": ({"kind": "json", "path": "{outside}/creds.jsonl"}, "path"),
    "climb": ({"kind": "json", "path": "../outside/creds.jsonl"}, "path"),
    "home": ({"kind": "json", "path": "~/creds.jsonl"}, "path"),
    "linked": ({"kind": "json", "path": "link.jsonl"}, "path"),
    "linkdir": ({"kind": "hf", "path": "parquet_dir"}, "path"),
    "imageroot": ({"kind": "json", "path": "data/good.jsonl", "image_root": "../outside/pics"}, "image_root"),
    "widened": ({"kind": "json", "path": "data/good.jsonl", "allowed_image_roots": ["{outside}"]}, "allowed_image_roots[0]"),
    "bucket": ({"kind": "json", "path": "s3://someone-elses-bucket/creds.jsonl"}, "a URI"),
    "globbed": ({"kind": "json", "path": "innocent.json*"}, "lead outside the folders"),
    "globwalk": ({"kind": "json", "path": "s*b/**/*.jsonl"}, "one folder only"),
    "hfstate": ({"kind": "hf", "path": "state_ds"}, "lead outside the folders"),
    "hfsplit": ({"kind": "hf", "path": "dict_ds"}, "lead outside the folders"),
    "hfsplitfield": ({"kind": "hf", "path": "dict_ds", "split": "../../outside"}, "lead outside the folders"),
    "nul": ({"kind": "json", "path": "data/good.jsonl\u0000x"}, "embedded null"),
}


def _manifests(tmp_path: Path, outside: Path) -> Path:
    folder = tmp_path / "manifests"
    folder.mkdir()
    _good_data(folder)
    os.symlink(outside / "creds.jsonl", folder / "link.jsonl")
    os.symlink(outside / "creds.jsonl", folder / "innocent.jsonl")  # only a glob reaches it
    (folder / "state_ds").mkdir()
    (folder / "state_ds" / "state.json").write_text(json.dumps({"_data_files": [{"filename": str(outside / "creds.jsonl")}]}))
    (folder / "dict_ds").mkdir()
    (folder / "dict_ds" / "dataset_dict.json").write_text(json.dumps({"splits": ["../../outside"]}))
    os.symlink(outside / "creds.jsonl", folder / "evil.yaml")  # a manifest that is itself a symlink
    (folder / "parquet_dir").mkdir()
    os.symlink(outside / "creds.jsonl", folder / "parquet_dir" / "part-0.parquet")
    for name, (body, _) in ESCAPES.items():
        text = json.dumps(body).replace("{outside}", str(outside))
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(json.loads(text)))
    (folder / "good.yaml").write_text(yaml.safe_dump({"kind": "json", "path": "data/good.jsonl"}))
    return folder


def _holding_canary(tmp_path: Path, outside: Path) -> list[str]:
    found = []
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink() and outside not in path.parents:
            if CANARY.encode() in path.read_bytes() or SECRET.encode() in path.read_bytes():
                found.append(str(path))
    return found


def test_a_manifest_reaching_outside_is_refused_and_nothing_it_names_is_read(tmp_path, instance, monkeypatch):
    outside = _plant(tmp_path)
    monkeypatch.setenv("HOME", str(outside))  # `~` leads to the canary too
    _manifests(tmp_path, outside)
    config = load_config(
        write_config(tmp_path, [{"name": "synthetic", "kind": "synthetic", "n_samples": 4}], operations={"source_manifests": "manifests"})
    )
    found = {m.name: m for m in scan_manifests(config, *manifest_filesystem(config))}
    assert found["good"].source is not None and found["good"].error is None
    for name, (_, field) in ESCAPES.items():
        manifest = found[name]
        assert manifest.source is None and "refused" in manifest.error and f"{field} " in manifest.error, (name, manifest.error)
    assert "symlink that leads outside" in found["linkdir"].error and "may not be a symlink" in found["evil"].error

    defs = build_definitions(config)
    with dg.build_sensor_context(instance=instance, definitions=defs) as context:
        tick = defs.resolve_sensor_def(SENSOR_NAME)(context)
    assert sorted(r.partition_key for r in tick.run_requests) == ["good", "synthetic"]  # the refused ones run nothing
    for request in tick.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    job = defs.resolve_job_def(SEED_JOB)
    good = job.execute_in_process(partition_key="good", instance=instance, raise_on_error=False)
    assert good.success
    store = CorpusStore(config.store.root)
    assert store.catalog().execute("SELECT count(*) FROM seed_pool WHERE source = 'good'").fetchall() == [(3,)]

    # Someone adds a refused manifest's partition by hand and runs it: the step refuses it too, reading nothing.
    instance.add_dynamic_partitions("sources", [*ESCAPES, "evil"])
    for name in [*ESCAPES, "evil"]:
        run = job.execute_in_process(partition_key=name, instance=instance, raise_on_error=False)
        assert not run.success
        failure = next(e for e in run.all_events if e.event_type_value == "STEP_FAILURE")
        assert "refused" in failure.step_failure_data.error.message, name
        assert not store.has_partition("seed_pool", name) and not store.has_partition("quarantine", name)
    assert _holding_canary(tmp_path, outside) == []


def test_granted_roots_let_a_manifest_read_further_and_project_sources_keep_their_freedom(tmp_path, instance):
    outside = _plant(tmp_path)
    _good_data(outside)
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "far.yaml").write_text(yaml.safe_dump({"kind": "json", "path": str(outside / "data" / "good.jsonl")}))
    (folder / "farther.yaml").write_text(yaml.safe_dump({"kind": "json", "path": str(tmp_path / "elsewhere.jsonl")}))
    mine = [{"id": f"m{i}", "question": f"Which colour is the square? ({i})", "answer": "red", "image": "a.png"} for i in range(2)]
    (outside / "data" / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mine))
    config = load_config(
        write_config(
            tmp_path,
            [{"name": "mine", "kind": "json", "path": str(outside / "data" / "mine.jsonl")}],
            operations={"source_manifests": "manifests", "manifest_roots": ["manifests", "outside/data"]},
        )
    )
    found = {m.name: m for m in scan_manifests(config, *manifest_filesystem(config))}
    assert found["far"].source is not None and found["farther"].source is None and "outside the folders" in found["farther"].error
    defs = build_definitions(config)
    instance.add_dynamic_partitions("sources", ["mine", "far"])
    job = defs.resolve_job_def(SEED_JOB)
    assert job.execute_in_process(partition_key="far", instance=instance).success
    assert job.execute_in_process(partition_key="mine", instance=instance).success  # the project file: not confined


def test_quarantined_lines_of_a_credentials_file_keep_no_secret(tmp_path, instance):
    """The project file may point at anything (trusted); a file that is not a dataset becomes quarantine rows whose
    excerpts and details are redacted and bounded."""
    outside = _plant(tmp_path)
    long_line = "x" * 5000
    with (outside / "creds.jsonl").open("a") as handle:
        handle.write(f'{{"token": "{SECRET}", "password": "hunter2"}}\n{long_line}\nAKIAIOSFODNN7EXAMPLE\n')
    config = load_config(
        write_config(
            tmp_path, [{"name": "creds", "kind": "json", "path": str(outside / "creds.jsonl"), "image_root": str(outside / "pics")}]
        )
    )
    defs = build_definitions(config)
    assert defs.resolve_job_def(SEED_JOB).execute_in_process(partition_key="creds", instance=instance, raise_on_error=False)
    rows = CorpusStore(config.store.root).catalog().execute("SELECT raw_excerpt, detail FROM quarantine").fetchall()
    text = json.dumps(rows)
    assert rows and SECRET not in text and "hunter2" not in text and "AKIAIOSFODNN7EXAMPLE" not in text
    assert all(len(excerpt or "") <= RAW_EXCERPT_CHARS for excerpt, _ in rows) and REDACTED in text


@pytest.mark.parametrize(
    "text, kept, gone",
    [
        ("aws_secret_access_key = abc123SECRETvalue", "aws_secret_access_key = ", "abc123SECRETvalue"),
        ('{"api_key": "k-1", "question": "How many?"}', '"question": "How many?"', "k-1"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc", "Authorization", "eyJhbGciOiJIUzI1NiJ9"),
        ("postgres://bob:s3cret@db:5432/x", "@db:5432/x", "s3cret"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----", "", "MIIEowIBAAKCAQEA"),
        ("id AKIAIOSFODNN7EXAMPLE here", "id ", "AKIAIOSFODNN7EXAMPLE"),
        ("hf_" + "aB3dE5gH7jK9mN1pQ3sT5vX7zA9cE1gI3", "", "aB3dE5gH7jK9mN1pQ3sT5vX7zA9cE1gI3"),
        ("AKIAIOSFODNN7EXAMPLE,wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", ",", "bPxRfiCYEXAMPLEKEY"),  # accessKeys.csv: no names
        ("machine api.example.com login bob password hunter2", "login bob password ", "hunter2"),  # netrc
        ("db.example.com:5432:prod:bob:s3cretpw", "db.example.com:5432:prod:bob:", "s3cretpw"),  # pgpass
        ("redis://:p4ssw0rd@cache:6379", "@cache:6379", "p4ssw0rd"),
        ('{"auths": {"registry.io": {"auth": "Ym9iOnNlY3JldA=="}}}', '"registry.io"', "Ym9iOnNlY3JldA=="),  # docker config
        ("DB_PASS=hunter2", "DB_PASS=", "hunter2"),
        ("password: correct horse battery staple", "password: ", "battery staple"),
        ("AccountName=x;AccountKey=abc/def+ghi==;EndpointSuffix=core", "EndpointSuffix=core", "def+ghi"),
        ('{"apiKey": "abc1", "clientSecret": "def2"}', '"apiKey": ', "def2"),
        ("-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOYBF\n-----END PGP PRIVATE KEY BLOCK-----", "", "lQOYBF"),
    ],
)
def test_credentials_are_redacted(text, kept, gone):
    out = redact(text)
    assert gone not in out and kept in out and REDACTED in out


@pytest.mark.parametrize(
    "text",
    [
        "How many red squares are in the image? Answer: 3",
        "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881",  # a SHA-256 digest: not a key
        "/tmp/pytest-of-root/pytest-123/test_manifests_become_partitio0/manifests/data/0001.png",
        "images/coco/train2017/000000391895.jpg resolves outside the source root",
        "pneumonoultramicroscopicsilicovolcanoconiosis",
        "Key signature: D major. Time signature: 3/4",  # a music question, not a credential
        "Secretary: Jane Doe; author: Smith; passport number: 12",
        "tokenizer: fast, tokens: 512, max_tokens=5",
        "/work/main/.omnithought/images/ab/cd/abcdef0123456789abcdef0123456789.png",
    ],
)
def test_ordinary_text_paths_and_digests_stay(text):
    assert redact(text) == text


@settings(max_examples=200, deadline=None)
@given(
    secret=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+=_-", min_size=40, max_size=60).filter(
        lambda s: any(c.isdigit() for c in s) and any(c.isalpha() for c in s) and len(set(s)) >= 28
    ),
    before=st.text(max_size=40),
    after=st.text(max_size=40),
)
def test_a_random_key_anywhere_is_redacted_and_redaction_is_stable(secret, before, after):
    text = f"{before} {secret} {after}"
    out = redact(text)
    assert secret not in out and redact(out) == out


def test_excerpts_are_bounded_after_redaction():
    text = "a" * (RAW_EXCERPT_CHARS - 10) + f" token={SECRET}"
    out = bounded_excerpt(text)
    assert len(out) <= RAW_EXCERPT_CHARS and SECRET[:10] not in out


def test_what_is_opened_is_checked_on_its_descriptor(tmp_path):
    """open_data checks the file it opened (where the kernel says the descriptor points), not a name resolved before or
    after: a link into the root reads, a link out does not, and a FIFO swapped in is refused at once, never waited on."""
    import time

    from omnithought_dagster.seed.sources import confine

    outside = _plant(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.jsonl").write_text("{}\n")
    os.symlink(root / "a.jsonl", root / "inside.jsonl")
    os.symlink(outside / "creds.jsonl", root / "out.jsonl")
    os.mkfifo(root / "pipe.jsonl")
    roots = (os.path.realpath(root),)
    with confine.open_data(root / "inside.jsonl", roots) as handle:
        assert handle.read() == b"{}\n"
    with pytest.raises(confine.OutsideRoots, match="outside the folders"):
        confine.open_data(root / "out.jsonl", roots)
    started = time.monotonic()
    with pytest.raises(OSError, match="not a regular file"):
        confine.open_data(root / "pipe.jsonl", roots)
    assert time.monotonic() - started < 2
    assert confine.open_data(outside / "creds.jsonl", None).close() is None  # a project-file source: anywhere


def test_a_reader_of_a_confined_source_sets_aside_a_file_swapped_out_after_listing(tmp_path):
    """The listing was checked; the file is then replaced by a symlink to the canary: the reader's open refuses it (one
    unreadable_file record naming the refusal), and the independent recount refuses it too."""
    from omnithought_dagster.config import JsonSourceConfig
    from omnithought_dagster.seed.sources import make_reader
    from omnithought_dagster.seed.sources.recount import raw_record_count

    outside = _plant(tmp_path)
    folder = tmp_path / "manifests"
    _good_data(folder)
    source = JsonSourceConfig(name="s", kind="json", path=str(folder / "data" / "good.jsonl"))
    source._read_roots = (os.path.realpath(folder),)
    reader = make_reader(source)
    (folder / "data" / "good.jsonl").unlink()
    os.symlink(outside / "creds.jsonl", folder / "data" / "good.jsonl")
    records = list(reader.records())
    assert len(records) == 1 and "outside the folders" in records[0].detail and CANARY not in json.dumps([r.detail for r in records])
    assert CANARY not in (records[0].raw_excerpt or "")
    assert raw_record_count(source, reader) == 1


def test_an_image_folder_swapped_out_after_the_check_gives_no_image(tmp_path):
    """A manifest's image_root passed its check, then the folder is replaced by a symlink to an outside folder of
    images: every image is set aside (path_escape), none of its bytes stored."""
    from omnithought_dagster.config import JsonSourceConfig, SeedSettings
    from omnithought_dagster.seed.ingest import ingest_source
    from omnithought_dagster.seed.sources import make_reader

    outside = _plant(tmp_path)
    folder = tmp_path / "manifests"
    (folder / "imgs").mkdir(parents=True)
    Image.new("RGB", (40, 40), (9, 9, 9)).save(folder / "imgs" / "a.png")
    records = [{"id": f"i{i}", "question": f"How many? ({i})", "answer": "1", "image": "a.png"} for i in range(2)]
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    source = JsonSourceConfig(name="s", kind="json", path=str(folder / "d.jsonl"), image_root=str(folder / "imgs"))
    source._read_roots = (os.path.realpath(folder),)
    reader = make_reader(source)
    os.rename(folder / "imgs", tmp_path / "moved")
    os.symlink(outside / "pics", folder / "imgs")
    stored = []
    result = ingest_source(
        "s",
        reader.records(),
        SeedSettings(),
        image_root=reader.image_root,
        put_image=lambda key, data: stored.append(data) or True,
        read_roots=source._read_roots,
    )
    reasons = result.quarantine.column("reason").to_pylist()
    assert result.kept.num_rows == 0 and reasons == ["path_escape", "path_escape"] and stored == []
