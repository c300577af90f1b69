"""A real S3-compatible HTTP server for the tests: moto's standalone server (`ThreadedMotoServer`)
on a free port of 127.0.0.1. The code under test reaches it only the way it reaches any S3:
boto3's usual environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...); nothing in `store/`
knows it is moto."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from pipeline.local_redis import free_port


def aws_env(endpoint: str) -> dict[str, str]:
    """The environment a process needs to reach the server (and nothing of this machine's AWS setup)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "memoir-test", "AWS_SECRET_ACCESS_KEY": "memoir-test",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "3",
            "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SimpleNamespace]:
    """The server, for the session; `env` reaches it, `bucket()` makes a fresh, empty bucket,
    `client()` is a boto3 client of it for the tests' own checks."""
    pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = aws_env(endpoint)

    def client():
        import boto3

        return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="memoir-test",
                            aws_secret_access_key="memoir-test")

    def bucket() -> str:
        name = f"memoir-{uuid.uuid4().hex[:12]}"
        client().create_bucket(Bucket=name)
        return name

    try:
        yield SimpleNamespace(endpoint=endpoint, env=env, bucket=bucket, client=client)
    finally:
        server.stop()


@pytest.fixture
def s3_url(s3_server, monkeypatch) -> str:
    """`s3://<a fresh bucket>/memoir`, with this process's environment pointed at the server."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return f"s3://{s3_server.bucket()}/memoir"
