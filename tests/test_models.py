"""Base models: loading diffusers directories from disk and S3 (single files:
test_models_single_file.py)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from lorapipe import store
from lorapipe.errors import ModelError
from lorapipe.models import load_base_model, model_cache_root, resolve_model_dir


def _weight_digests(model_dir: Path) -> dict[str, str]:
    return {
        str(path.relative_to(model_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(model_dir.rglob("*.safetensors"))
    }


def test_missing_or_foreign_directory_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_base_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="no model_index.json"):
        load_base_model(str(tmp_path))


def test_model_on_s3_is_downloaded_once_and_refetched_when_it_changes(
    tiny_model_dir: Path, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    uri = store.join(s3_bucket, "models", "tiny-sd")
    store.put_dir(tiny_model_dir, uri)

    first = resolve_model_dir(uri)
    assert first.parent == model_cache_root()
    assert _weight_digests(first) == _weight_digests(tiny_model_dir)
    assert resolve_model_dir(uri) == first  # same ETags: the cache answers

    changed_model = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed_model)
    scheduler_config = changed_model / "scheduler" / "scheduler_config.json"
    scheduler_config.write_text(
        scheduler_config.read_text().replace('"beta_end": 0.012', '"beta_end": 0.0125')
    )
    store.put_dir(changed_model, uri)
    changed = resolve_model_dir(uri)
    assert changed != first
    assert load_base_model(uri).scheduler.config.beta_end == 0.0125
