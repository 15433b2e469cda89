"""Shared fixtures: the tiny offline SD model and a real S3 HTTP endpoint (moto)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x diffusers pipeline with random weights, built once per test session."""
    from lorapipe.demo.tiny_model import build_sd

    return build_sd(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0, preset="tiny")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server over real HTTP on 127.0.0.1; boto3 is pointed at it by environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    settings = {
        "LORAPIPE_S3_ENDPOINT": endpoint,
        "AWS_ACCESS_KEY_ID": "lorapipe-test-key",
        "AWS_SECRET_ACCESS_KEY": "lorapipe-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield endpoint
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh empty bucket on the test S3 server, as ``s3://<name>``."""
    from lorapipe import store

    name = f"test-{uuid.uuid4().hex[:12]}"
    store.client().create_bucket(Bucket=name)
    return f"s3://{name}"
