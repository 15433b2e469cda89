"""Shared fixtures: the tiny offline SD model, a real S3 HTTP endpoint (moto), and the LoRA and
pipeline of the generate tests (one per test module)."""

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
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL diffusers pipeline with random weights, built once per test session."""
    from lorapipe.demo.tiny_model import build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0, preset="tiny-sdxl")


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


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA (UNet and text encoder) as select writes it: the diffusers file and the kohya
    file ``film_style.safetensors``."""
    from lora_fixtures import TEXT_ENCODER_TARGETS, add_random_lora, save_lora

    from lorapipe import lora_format
    from lorapipe.models import load_base_model

    directory = tmp_path_factory.mktemp("selected")
    trained = load_base_model(str(tiny_model_dir))
    add_random_lora(trained, text_encoder_targets=TEXT_ENCODER_TARGETS)
    diffusers_file = save_lora(trained, directory)
    state_dict, metadata, kind = lora_format.load_lora_state_dict(str(diffusers_file))
    modules = lora_format.modules_from_state_dict(state_dict, metadata, kind)
    lora_format.save_kohya(
        directory / "film_style.safetensors", modules, {"ss_output_name": "film_style"}
    )
    return directory


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path, lora_dir: Path):
    """The tiny pipeline with the kohya LoRA loaded as generate loads it."""
    from lorapipe import lora_format
    from lorapipe.models import load_base_model

    pipeline = load_base_model(str(tiny_model_dir))
    kohya_file = str(lora_dir / "film_style.safetensors")
    lora_format.load_into_pipeline(pipeline, kohya_file, adapter_name="lora_0")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    """``make run`` once per test session: the whole DAG on the demo world, twice (cleaned and
    as scraped), with its claims measured. Read-only for the tests that share it."""
    from pipelines import local_run

    out = tmp_path_factory.mktemp("demo-run")
    return local_run.run_local(out, {})
