"""The pipeline's first step: the inputs' fingerprints, the decision to train or not, and the
page that says which and why."""

from __future__ import annotations

import json
from pathlib import Path

from lorapipe import pipeline_steps
from lorapipe.report.run_report import StageOutputs, run_page
from lorapipe.retraining import check_inputs

SETTINGS = {"training_config": "{lora_rank: 8}", "min_size": 512, "epsilon": 0.01}


def _inputs(tmp_path: Path) -> dict[str, str]:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.png").write_bytes(b"png")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    return {"data_uri": str(raw), "base_model_uri": str(model), "tagger_uri": ""}


def _publish(publish_uri: Path, fingerprint: str) -> None:
    publish_uri.mkdir()
    record = {"run_id": "week-1", "fingerprint": fingerprint}
    latest = {"run_id": "week-1", "uri": str(publish_uri / "week-1"), "history": [record]}
    (publish_uri / "latest.json").write_text(json.dumps({**latest, "fingerprint": fingerprint}))


def test_a_first_run_trains_and_records_each_inputs_digest(tmp_path: Path) -> None:
    report = check_inputs(
        str(tmp_path / "out"), _inputs(tmp_path), SETTINGS, publish_uri="", force_retrain=False
    )

    assert report["retrain"] and report["reason"] == "training: publish_uri is empty"
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written == report
    assert set(written["fingerprint"]["inputs"]) == {"data_uri", "base_model_uri"}
    assert written["fingerprint"]["settings"]["training_config"] == {"lora_rank": 8}


def test_unchanged_inputs_stop_the_run_unless_forced(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    first = check_inputs(str(tmp_path / "a"), inputs, SETTINGS, publish_uri="", force_retrain=False)
    _publish(tmp_path / "loras", first["fingerprint"]["run"])
    loras = str(tmp_path / "loras")

    same = check_inputs(
        str(tmp_path / "b"), inputs, SETTINGS, publish_uri=loras, force_retrain=False
    )
    forced = check_inputs(
        str(tmp_path / "c"), inputs, SETTINGS, publish_uri=loras, force_retrain=True
    )
    (tmp_path / "raw" / "b.png").write_bytes(b"new")
    grown = check_inputs(
        str(tmp_path / "d"), inputs, SETTINGS, publish_uri=loras, force_retrain=False
    )

    assert not same["retrain"] and same["reason"].startswith("no new data since run week-1")
    assert forced["retrain"] and grown["retrain"]
    assert grown["fingerprint"]["data"] != same["fingerprint"]["data"]
    assert (
        grown["fingerprint"]["inputs"]["base_model_uri"]
        == same["fingerprint"]["inputs"]["base_model_uri"]
    )


def test_the_step_gives_the_digests_the_decision_and_a_page_saying_why(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    found = pipeline_steps.fingerprint(
        str(tmp_path / "inputs"),
        str(tmp_path / "report.html"),
        uris=inputs,
        settings=SETTINGS,
        publish_uri="",
        force_retrain=False,
    )

    assert found["retrain"] is True and len(found["run"]) == len(found["data"]) == 64
    assert found["tagger"] == ""  # no tagger: the tag stage does not run
    assert found["metrics"] == {"retrain": 1.0, "files": 2.0, "bytes": 5.0}
    page = (tmp_path / "report.html").read_text()
    assert 'id="fingerprint"' in page and "publish_uri is empty" in page
    run = run_page(StageOutputs(fingerprint=str(tmp_path / "inputs")))
    assert run.index('id="fingerprint"') > 0 and "data_uri" in run
