"""Tensor storage (store/blobs.py): the local directory and S3-compatible object storage hold to
one contract, checked here against both; S3 is moto's standalone server over real HTTP
(tests/objectstore.py), reached through boto3's usual environment. Then a whole store on object
storage: edits, checkpoints, loading, verify, pruning, and the write order kept when a put fails.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from objectstore import s3_server, s3_url  # noqa: F401 (fixtures)
from pipeline.local_redis import free_port
from store import APPLYING, Store, StoreError
from store.blobs import (
    BlobInfo,
    BlobNotFoundError,
    CorruptFileError,
    LocalBlobs,
    S3Blobs,
    open_blobs,
    put_content_addressed,
    read_verified,
)
from store.files import sha256_bytes
from test_store import D_FFN, D_MODEL, REPO, apply_edit, make_result, make_state

pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(params=["local", "s3"])
def blobs(request, tmp_path):
    if request.param == "local":
        return LocalBlobs(tmp_path / "tensors")
    return open_blobs(request.getfixturevalue("s3_url"))


# ------------------------------------------------------------------------------ the contract


def test_put_get_exists_delete(blobs):
    assert not blobs.exists("m/deltas/a.safetensors")
    blobs.put("m/deltas/a.safetensors", b"first")
    assert blobs.exists("m/deltas/a.safetensors") and blobs.get("m/deltas/a.safetensors") == b"first"
    blobs.put("m/deltas/a.safetensors", b"second, longer")  # a put replaces the whole object
    assert blobs.get("m/deltas/a.safetensors") == b"second, longer"
    blobs.put("m/deltas/empty", b"")
    assert blobs.get("m/deltas/empty") == b""
    blobs.delete("m/deltas/a.safetensors")
    assert not blobs.exists("m/deltas/a.safetensors")
    blobs.delete("m/deltas/a.safetensors")  # deleting what is not there is no error
    with pytest.raises(BlobNotFoundError):
        blobs.get("m/deltas/a.safetensors")
    with pytest.raises(FileNotFoundError):  # the store tells a missing file by this
        blobs.get("never/there")


def test_list_is_sorted_with_sizes_and_stays_in_its_folder(blobs):
    for key, data in [("m/deltas/b", b"bb"), ("m/deltas/a", b"a"), ("m/checkpoints/c", b"ccc"),
                      ("m2/deltas/x", b"x"), ("mm/deltas/y", b"y")]:
        blobs.put(key, data)
    assert blobs.list("m/deltas/") == [BlobInfo("m/deltas/a", 1), BlobInfo("m/deltas/b", 2)]
    assert [b.key for b in blobs.list("m/")] == ["m/checkpoints/c", "m/deltas/a", "m/deltas/b"]
    assert blobs.list("m/jobs/") == [] and blobs.list("nothing/") == []


def test_holds_checks_the_content(blobs):
    data = b"tensor bytes"
    blobs.put("m/x", data)
    assert blobs.holds("m/x", sha256_bytes(data), len(data))
    assert not blobs.holds("m/x", sha256_bytes(b"other bytes!"), len(data))
    assert not blobs.holds("m/x", sha256_bytes(data), len(data) + 1)
    assert not blobs.holds("m/missing", sha256_bytes(data), len(data))


@pytest.mark.parametrize("key", ["", "/abs/x", "m/../x", "m/./x", "..", "m\\x", "m//x", "m/x/", "m/x y", "m/\x00"])
def test_bad_keys_are_refused_and_nothing_is_written(blobs, key):
    with pytest.raises(StoreError, match="invalid tensor key"):
        blobs.put(key, b"data")
    with pytest.raises(StoreError, match="invalid tensor key"):
        blobs.get(key)
    with pytest.raises(StoreError, match="invalid tensor key"):
        blobs.delete(key)
    assert blobs.list("") == []


def test_content_addressed_put_and_verified_read(blobs):
    data = b"\x00\x01 some safetensors bytes"
    key, sha = put_content_addressed(blobs, "m/deltas", data)
    assert (key, sha) == (f"m/deltas/{sha256_bytes(data)}.safetensors", sha256_bytes(data))
    assert put_content_addressed(blobs, "m/deltas", data) == (key, sha)  # the same bytes: the same key
    assert read_verified(blobs, key, sha) == data
    with pytest.raises(CorruptFileError, match="does not match its recorded sha256"):
        read_verified(blobs, key, sha256_bytes(b"another content"))
    blobs.put(key, b"damaged")  # a damaged object under the key is rewritten by the next put of its bytes
    with pytest.raises(CorruptFileError, match="does not match"):
        read_verified(blobs, key, sha)
    assert put_content_addressed(blobs, "m/deltas", data) == (key, sha) and read_verified(blobs, key, sha) == data
    blobs.delete(key)
    with pytest.raises(CorruptFileError, match="cannot be read") as missing:
        read_verified(blobs, key, sha)
    assert isinstance(missing.value.__cause__, FileNotFoundError)
    key, _ = put_content_addressed(blobs, "m/checkpoints", data, prefix="v00000007-")
    assert key == f"m/checkpoints/v00000007-{sha}.safetensors" and blobs.get(key) == data


# ------------------------------------------------------------------------------ each implementation


def test_local_files_are_owner_only_and_leave_no_temp_file(tmp_path):
    old = os.umask(0o022)
    try:
        blobs = LocalBlobs(tmp_path / "tensors")
        blobs.put("m/deltas/a", b"data")
    finally:
        os.umask(old)
    path = tmp_path / "tensors" / "m" / "deltas" / "a"
    assert blobs.local_path("m/deltas/a") == path and path.read_bytes() == b"data"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["a"]


def test_s3_prefixes_keep_two_stores_apart(s3_url):
    bucket = s3_url.split("/")[2]
    one, two, bare = open_blobs(f"s3://{bucket}/one"), open_blobs(f"s3://{bucket}/two/deep"), open_blobs(f"s3://{bucket}")
    one.put("m/x", b"1")
    two.put("m/x", b"2")
    assert (one.get("m/x"), two.get("m/x")) == (b"1", b"2")
    assert one.list("m/") == [BlobInfo("m/x", 1)] and two.list("") == [BlobInfo("m/x", 1)]
    assert [b.key for b in bare.list("")] == ["one/m/x", "two/deep/m/x"]
    assert isinstance(one, S3Blobs) and one.local_path("m/x") is None and one.location == f"s3://{bucket}/one"


def test_s3_objects_record_their_sha256(s3_url, s3_server):
    import boto3

    blobs = open_blobs(s3_url)
    key, sha = put_content_addressed(blobs, "m/deltas", b"abc")
    head = boto3.client("s3", endpoint_url=s3_server.endpoint).head_object(Bucket=blobs.bucket,
                                                                          Key=f"memoir/{key}")
    assert head["Metadata"]["sha256"] == sha and head["ContentLength"] == 3


def test_s3_errors_are_clear(s3_url, s3_server, monkeypatch):
    with pytest.raises(StoreError, match="the bucket 'memoir-no-such-bucket' does not exist"):
        open_blobs("s3://memoir-no-such-bucket/x")  # refused when opened, before anything is written
    gone = s3_server.bucket()
    blobs = open_blobs(f"s3://{gone}/x")
    s3_server.client().delete_bucket(Bucket=gone)  # removed while in use
    with pytest.raises(OSError, match=f"bucket '{gone}' does not exist"):
        blobs.put("m/x", b"data")
    with pytest.raises(OSError, match=f"bucket '{gone}' does not exist"):
        blobs.list("m/")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    other = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    other.start()
    host, port = other.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")  # a second server, which goes away
    going = open_blobs(f"s3://{s3_server.bucket()}/x")  # (moto's servers in one process share their buckets)
    going.put("m/x", b"data")
    other.stop()
    with pytest.raises(OSError, match="cannot read .*m/x"):
        going.get("m/x")
    with pytest.raises(CorruptFileError, match="cannot be read"):
        read_verified(going, "m/x", sha256_bytes(b"data"))
    with pytest.raises(StoreError, match="does not answer as expected"):
        open_blobs(going.location)


@pytest.mark.parametrize("location", ["s3://", "s3:///prefix", "s3://key:secret@bucket/x", "s3://bucket/x?region=eu",
                                      "http://host/bucket", "s3://bucket/../x"])
def test_bad_locations_are_refused(location):
    with pytest.raises(StoreError):
        open_blobs(location)


def test_the_addressing_style_is_checked(monkeypatch):
    monkeypatch.setenv("MEMOIR_S3_ADDRESSING_STYLE", "sideways")
    with pytest.raises(StoreError, match="MEMOIR_S3_ADDRESSING_STYLE"):
        open_blobs("s3://bucket/x")


# ------------------------------------------------------------------------------ a store on object storage


def test_a_store_on_object_storage(tmp_path, s3_url):
    ledger = tmp_path / "ledger"
    with Store.open(ledger, tensor_dir=s3_url) as store:
        assert store.tensor_dir is None and "s3://" in repr(store)
        store.create_memory("default", make_state(), "synthetic", checkpoint_every=2)
        weight = torch.zeros(D_MODEL, D_FFN)
        edits = [apply_edit(store, weight, n)[0] for n in range(1, 6)]
        for n in (6, 7):
            store.checkpoint("default", weight)
            edits.append(apply_edit(store, weight, n)[0])
        store.prune_checkpoints("default", keep=1)
        keys = [b.key for b in store.blobs.list("default/")]
        assert len([k for k in keys if "/checkpoints/" in k]) == 1
        assert {e.delta_file for e in edits} <= set(keys)
        with pytest.raises(StoreError, match="not in a directory"):
            store.path(edits[0].delta_file)
    assert not (ledger / "tensors").exists()  # nothing of the tensors on this host
    with Store.open(ledger, tensor_dir=s3_url) as store:  # another process, reading the same objects
        assert torch.equal(store.load_state("default").weight, weight)
        report = store.verify("default")
        assert report.ok and report.checked["delta_files"] == 7 and not report.warnings, report
        store.blobs.put("default/deltas/" + "0" * 64 + ".safetensors", b"orphan")
        store.blobs.put(edits[0].delta_file, b"damaged")
        report = store.verify("default")
        assert any("corrupt" in e for e in report.errors) and any("orphan file" in w for w in report.warnings)
        with pytest.raises(CorruptFileError):
            store.load_delta(edits[0].id)


def test_memoir_tensors_names_object_storage(tmp_path, s3_url, monkeypatch):
    monkeypatch.setenv("MEMOIR_TENSORS", s3_url)
    with Store.open(tmp_path / "ledger") as store:
        store.create_memory("default", make_state(), "synthetic")
        edit, _ = apply_edit(store, torch.zeros(D_MODEL, D_FFN), 1)
        assert store.blobs.exists(edit.delta_file)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "ledger", "verify", "--store", str(tmp_path / "ledger"),
                          "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and '"ok": true' in out.stdout, out.stderr


def test_memoir_store_compact_on_object_storage(tmp_path, s3_url, monkeypatch):
    monkeypatch.setenv("MEMOIR_TENSORS", s3_url)
    ledger = str(tmp_path / "ledger")
    with Store.open(ledger) as store:
        store.create_memory("default", make_state(), "synthetic")
        weight = torch.zeros(D_MODEL, D_FFN)
        for n in (1, 2, 3):
            apply_edit(store, weight, n)
            store.checkpoint("default", weight)
        old = [c.file for c in store.checkpoints("default")[:-1]]
        orphan = "default/checkpoints/v00000099-" + "0" * 64 + ".safetensors"
        store.blobs.put(orphan, b"left by a crash")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "store", "compact", "--store", ledger,
                           "--keep-checkpoints", "1", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])["default"]
    assert summary["removed"] == [1, 2] and summary["kept"] == [3] and summary["orphans"] == [orphan.split("/")[-1]]
    with Store.open(ledger) as store:
        left = [b.key for b in store.blobs.list("default/checkpoints/")]
        assert left == [store.checkpoints("default")[0].file] and not set(old) & set(left)
        assert store.verify("default").ok and torch.equal(store.load_state("default").weight, weight)


def test_a_failed_put_commits_nothing(tmp_path, s3_url, s3_server):
    """The object is complete and verified before the ledger row naming it commits: when the
    object storage refuses the write, the edit stays `applying` and the ledger names no object."""
    ledger = tmp_path / "ledger"
    with Store.open(ledger, tensor_dir=s3_url) as store:
        store.create_memory("default", make_state(), "synthetic")
    vanishing = s3_server.bucket()
    with Store.open(ledger, tensor_dir=f"s3://{vanishing}/x") as store:
        edit, _ = store.record_request("default", "r1", "p", "t")
        store.mark_applying(edit)
        s3_server.client().delete_bucket(Bucket=vanishing)
        with pytest.raises(OSError, match="does not exist"):
            store.mark_applied(edit, make_result(edit.id, seed=1))
        after = store.edit(edit.id)
        assert after.status == APPLYING and after.delta_file is None
        assert "applied" not in [e.kind for e in store.events(name="default")]


def test_the_compose_profile_keeps_nothing_of_the_memory_on_a_host():
    """docker-compose.yml, profile s3: the worker and the replica name PostgreSQL and object
    storage, mount no store volume, and use a queue the default worker never consumes."""
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("worker-s3", "server-s3"):
        service = services[name]
        env = service["environment"]
        assert service["profiles"] == ["s3"] and service["command"][0] == name.split("-")[0].replace("server", "serve")
        assert env["MEMOIR_STORE"].startswith("postgresql://") and env["MEMOIR_TENSORS"].startswith("${MEMOIR_TENSORS:-s3://")
        assert env["AWS_ENDPOINT_URL"] and env["MEMOIR_S3_ADDRESSING_STYLE"] == "path"
        assert not any(v.split(":")[0] == "store" or "/data/store" in v for v in service["volumes"]), service["volumes"]
        assert env["MEMOIR_REDIS_URL"] != services["worker"]["environment"]["MEMOIR_REDIS_URL"]
        assert {"postgres", "redis"} <= set(service["depends_on"])
    assert set(services["worker-s3"]["depends_on"]) >= {"objects-bucket"}
    for name in ("postgres", "objects", "objects-bucket"):
        assert services[name]["profiles"] == ["s3"]
    assert "profiles" not in services["worker"] and "profiles" not in services["server"]
