"""Where the tensor files live: one small interface, two implementations (no torch).

- `LocalBlobs(root)`: files under a directory, owner-only, written to a temp file, fsynced and
  renamed into place (a crash leaves no file or the whole file). The default; the layout is the
  one stores have always had, so existing stores load unchanged.
- `S3Blobs(bucket, prefix)`: objects in S3-compatible object storage, through boto3 (the `s3`
  extra). A PUT is atomic (the object appears whole or not at all); the body is sent with its
  MD5, which the server checks, and the object is then looked up (HEAD) for its length and
  recorded sha256 before `put` returns. Endpoint, credentials, region, TLS and retries come from
  boto3's usual configuration: `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`),
  `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (or a profile, an instance role, ...),
  `AWS_DEFAULT_REGION`, `AWS_CA_BUNDLE`, `AWS_MAX_ATTEMPTS`. `MEMOIR_S3_ADDRESSING_STYLE=path`
  reaches servers that only answer path-style URLs (MinIO, Ceph behind one host name).

`open_blobs(location)` picks one: `s3://bucket/prefix` is object storage, anything else a
directory. Keys are the relative paths the ledger records (`<memory>/deltas/<sha256>.safetensors`):
`/`-separated, no `.` or `..` part, no leading `/`.

The store keeps its write order on either: a tensor is complete and verified (`put` returned)
before the ledger row naming it commits; readers check every file against the sha256 the ledger
recorded (`read_verified`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from store.files import private_dir, sha256_bytes, sha256_file, write_atomic
from store.records import StoreError

S3_SCHEME = "s3://"
_KEY_PART = re.compile(r"[A-Za-z0-9._+=-]+")


class CorruptFileError(StoreError):
    """A tensor file is missing or does not match the hash the ledger recorded for it."""


class BlobNotFoundError(FileNotFoundError):
    """No file or object under that key."""


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int


def check_key(key: str) -> str:
    """A key is a relative path of plain names: never absolute, never `..`, never a backslash."""
    if not isinstance(key, str) or not key or key.startswith("/") or key.endswith("/"):
        raise StoreError(f"invalid tensor key {key!r}")
    for part in key.split("/"):
        if part in (".", "..") or not _KEY_PART.fullmatch(part):
            raise StoreError(f"invalid tensor key {key!r}")
    return key


class Blobs:
    """Tensor storage: bytes under keys. `put` is atomic and verified; `get` raises
    `BlobNotFoundError` (a FileNotFoundError) for a missing key and OSError when it cannot read."""

    location: str

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def holds(self, key: str, sha256: str, size: int) -> bool:
        """Whether `key` holds exactly these bytes already (content-addressed writes skip it)."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove `key`; a key that is not there is no error."""
        raise NotImplementedError

    def list(self, prefix: str) -> list[BlobInfo]:
        """The keys under `prefix` (a folder, ending in `/`), sorted, with their sizes."""
        raise NotImplementedError

    def local_path(self, key: str) -> Path | None:
        """The file of `key` on this host, or None where the storage is not a directory."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


class LocalBlobs(Blobs):
    """Files under `root` (created owner-only)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = private_dir(root)
        self.location = str(self.root)

    def local_path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        directory, _, name = check_key(key).rpartition("/")
        write_atomic(private_dir(self.root / directory) if directory else self.root, name, data)

    def get(self, key: str) -> bytes:
        path = self.local_path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise BlobNotFoundError(exc.errno, exc.strerror, str(path)) from None

    def exists(self, key: str) -> bool:
        return self.local_path(key).is_file()

    def holds(self, key: str, sha256: str, size: int) -> bool:
        path = self.local_path(key)
        try:
            return path.stat().st_size == size and sha256_file(path) == sha256
        except FileNotFoundError:
            return False

    def delete(self, key: str) -> None:
        self.local_path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[BlobInfo]:
        folder = prefix.rstrip("/")
        directory = self.root / check_key(folder) if folder else self.root
        if not directory.is_dir():
            return []
        found = []
        for path in directory.rglob("*"):
            try:
                if path.is_file():
                    found.append(BlobInfo(path.relative_to(self.root).as_posix(), path.stat().st_size))
            except FileNotFoundError:  # deleted meanwhile (a prune): not there any more
                continue
        return sorted(found, key=lambda b: b.key)


class S3Blobs(Blobs):
    """Objects `<prefix>/<key>` in `bucket` of S3-compatible storage (boto3's usual configuration)."""

    def __init__(self, bucket: str, prefix: str = "", client: Any = None) -> None:
        if not bucket:
            raise StoreError("an s3:// tensor location needs a bucket: s3://<bucket>/<prefix>")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.location = f"{S3_SCHEME}{bucket}/{self.prefix}".rstrip("/")
        self.client = client if client is not None else _s3_client()
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)
        self._check_bucket()

    def _check_bucket(self) -> None:
        """Refuse at once a bucket that does not exist or storage that does not answer (a StoreError:
        every command reports it as a bad setting). Access denied passes: a replica whose
        credentials may only read objects cannot look at the bucket itself."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self._errors as exc:
            code = _code(exc)
            if code in ("403", "AccessDenied", "Forbidden"):
                return
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StoreError(f"{self.location}: the bucket {self.bucket!r} does not exist") from exc
            endpoint = getattr(getattr(self.client, "meta", None), "endpoint_url", "?")
            raise StoreError(f"{self.location}: the object storage at {endpoint} does not answer "
                             f"as expected ({exc}); check AWS_ENDPOINT_URL and the credentials") from exc

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _failure(self, action: str, key: str, exc: Exception) -> OSError:
        code = _code(exc)
        if code in ("NoSuchKey", "404", "NotFound"):
            return BlobNotFoundError(2, "no such object", f"{self.location}/{key}")
        if code == "NoSuchBucket":
            return OSError(f"{action} {self.location}/{key}: the bucket {self.bucket!r} does not exist")
        return OSError(f"{action} {self.location}/{key}: {exc}")

    def put(self, key: str, data: bytes) -> None:
        name, sha = self._name(key), sha256_bytes(data)
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324 - integrity, not security
        try:
            self.client.put_object(Bucket=self.bucket, Key=name, Body=data, ContentMD5=md5,
                                   ContentType="application/octet-stream", Metadata={"sha256": sha})
        except self._errors as exc:
            raise self._failure("cannot write", key, exc) from exc
        if not self.holds(key, sha, len(data)):
            raise OSError(f"{self.location}/{key}: the object written does not read back as written")

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._name(key))
            return response["Body"].read()
        except self._errors as exc:
            raise self._failure("cannot read", key, exc) from exc

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        except self._errors as exc:
            failure = self._failure("cannot look up", key, exc)
            if isinstance(failure, BlobNotFoundError):
                return None
            raise failure from exc

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def holds(self, key: str, sha256: str, size: int) -> bool:
        head = self._head(key)
        return (head is not None and head.get("ContentLength") == size
                and (head.get("Metadata") or {}).get("sha256") == sha256)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))
        except self._errors as exc:
            failure = self._failure("cannot delete", key, exc)
            if not isinstance(failure, BlobNotFoundError):
                raise failure from exc

    def list(self, prefix: str) -> list[BlobInfo]:
        folder = prefix.strip("/")
        if folder:
            check_key(folder)
        base = f"{self.prefix}/" if self.prefix else ""
        full = f"{base}{folder}/" if folder else base
        found = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", []):
                    found.append(BlobInfo(item["Key"][len(base):], int(item["Size"])))
        except self._errors as exc:
            raise self._failure("cannot list", folder, exc) from exc
        return sorted(found, key=lambda b: b.key)


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Code", ""))


def _s3_client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise StoreError("tensors in object storage (s3://...) need boto3: pip install 'memoir-service[s3]'") from exc
    style = os.environ.get("MEMOIR_S3_ADDRESSING_STYLE", "").strip() or "auto"
    if style not in ("auto", "path", "virtual"):
        raise StoreError(f"MEMOIR_S3_ADDRESSING_STYLE must be auto, path or virtual, got {style!r}")
    return boto3.client("s3", config=Config(s3={"addressing_style": style}))


def open_blobs(location: str | os.PathLike | Blobs) -> Blobs:
    """`s3://bucket/prefix` → S3Blobs; a directory path → LocalBlobs; a Blobs as it is."""
    if isinstance(location, Blobs):
        return location
    text = str(location)
    if text.startswith(S3_SCHEME):
        parts = urlparse(text)
        if parts.query or parts.params or parts.fragment or parts.username or parts.password:
            raise StoreError(f"{text!r}: an s3:// location is s3://<bucket>/<prefix>, without credentials "
                             "or options (those come from the AWS environment)")
        return S3Blobs(parts.netloc, parts.path)
    if "://" in text:
        raise StoreError(f"{text!r}: tensors live in a directory or at s3://<bucket>/<prefix>")
    return LocalBlobs(text)


def put_content_addressed(blobs: Blobs, folder: str, data: bytes, prefix: str = "") -> tuple[str, str]:
    """Store `data` as `<folder>/<prefix><sha256>.safetensors`; returns (key, sha256). The same
    bytes written twice find the key holding them already and keep it."""
    sha = sha256_bytes(data)
    key = check_key(f"{folder}/{prefix}{sha}.safetensors")
    if not blobs.holds(key, sha, len(data)):
        blobs.put(key, data)
    return key, sha


def read_verified(blobs: Blobs, key: str, sha256: str) -> bytes:
    """The bytes of `key`, checked against the sha256 the ledger recorded (CorruptFileError when
    missing, unreadable or different; its cause is a FileNotFoundError when the key is missing)."""
    where = f"{blobs.location}/{key}"
    try:
        data = blobs.get(key)
    except OSError as exc:
        raise CorruptFileError(f"{where}: cannot be read ({exc.strerror or exc})") from exc
    if sha256_bytes(data) != sha256:
        raise CorruptFileError(f"{where}: content does not match its recorded sha256 {sha256[:12]}…")
    return data


__all__ = ["BlobInfo", "BlobNotFoundError", "Blobs", "CorruptFileError", "LocalBlobs", "S3Blobs", "check_key",
           "open_blobs", "put_content_addressed", "read_verified"]
