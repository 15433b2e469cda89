"""Where finished LoRAs go, and which one ``latest.json`` points at.

Every run's LoRA is copied to ``<publish_uri>/<run id>/``; ``<publish_uri>/latest.json`` points
at the one to use (WebUI users, generate and the next scheduled run read it). A new LoRA moves
the pointer only when it is *promoted*: with ``promote: better`` (the default) when its
validation loss is not worse than the published LoRA's by more than ``promotion_epsilon``,
both measured on the new run's validation images with the same timesteps and noise (train
measures the published one: its ``compare_with`` key, ``published_validation.json``). A
scheduled run on grown data is judged by the newest images, not by numbers each LoRA got on
its own validation set.

``latest.json``:

- ``run_id``, ``uri``: the promoted LoRA; ``fingerprint``, ``val_loss``, ``checkpoint_step``,
  ``base_model_hash``, ``published_at``: its record;
- ``history``: every run published here, oldest first, promoted or not (:class:`RunRecord`).

The pointer is written after every file of the run's folder is there, and the read, decision
and write happen while the publish folder is held (:mod:`lorapipe.writer_lock`), so two runs
publishing at once cannot lose each other's history.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorapipe import outputs, store, writer_lock
from lorapipe.errors import ConfigError, InputError

log = logging.getLogger(__name__)

LATEST_NAME = "latest.json"
PROMOTE_CHOICES = ("better", "always")
# a published run's folder: select's output files (its markers, which outputs.OutputKind checks)
RUN_KIND = outputs.OutputKind(
    name="a published lorapipe LoRA",
    markers=("selection.json", "report.json"),
    error=ConfigError,
)


@dataclass(frozen=True)
class Candidate:
    """The new run's LoRA, as select chose it."""

    run_id: str
    fingerprint: str
    checkpoint_step: int
    val_loss: float | None  # on its own validation images
    base_model_hash: str | None


@dataclass(frozen=True)
class RunRecord:
    """One run published here: what it scored, against what, and whether it was promoted."""

    run_id: str
    uri: str
    fingerprint: str
    checkpoint_step: int
    val_loss: float | None  # on its own validation images (the newest set when it ran)
    base_model_hash: str | None
    compared_with: str | None  # the run id of the published LoRA it was measured against
    compared_val_loss: float | None  # that LoRA's validation loss on this run's images
    promoted: bool
    reason: str
    decided_at: str

    @property
    def margin(self) -> float | None:
        """How much worse (+) or better (-) than the published LoRA, relative to it."""
        if self.val_loss is None or not self.compared_val_loss:
            return None
        return self.val_loss / self.compared_val_loss - 1


@dataclass(frozen=True)
class RetrainDecision:
    """Whether a run has anything new to train on, and why (a line for the UI)."""

    retrain: bool
    reason: str
    published_run_id: str | None


def read_latest(publish_uri: str) -> dict[str, Any] | None:
    """``latest.json`` at ``publish_uri``, or None before the first publish."""
    uri = store.join(publish_uri, LATEST_NAME)
    if not store.exists(uri):
        return None
    try:
        latest = json.loads(store.read_text(uri))
    except json.JSONDecodeError as error:
        raise InputError(f"{uri} is not JSON ({error}); restore it or remove it") from None
    if not isinstance(latest, dict) or not {"run_id", "uri"} <= set(latest):
        raise InputError(f"{uri} has no run_id and uri; restore it or remove it")
    latest.setdefault("history", [])
    return latest


def retrain_decision(publish_uri: str, fingerprint: str, *, force: bool) -> RetrainDecision:
    """Train unless the inputs' ``fingerprint`` is that of the published LoRA or of the last
    run published here (a run that was not promoted would be trained again to the same LoRA,
    since training is deterministic), or ``force``."""
    latest = read_latest(publish_uri) if publish_uri else None
    if latest is None:
        reason = "no LoRA is published yet" if publish_uri else "publish_uri is empty"
        return RetrainDecision(True, f"training: {reason}", None)
    published = latest["run_id"]
    last = latest["history"][-1] if latest["history"] else {}
    same_as = next(
        (record["run_id"] for record in (last, latest) if record.get("fingerprint") == fingerprint),
        None,
    )
    if same_as is None:
        return RetrainDecision(
            True, f"training: the inputs changed since run {published}", published
        )
    if force:
        return RetrainDecision(
            True,
            f"training: force_retrain, although nothing changed since run {same_as}",
            published,
        )
    return RetrainDecision(
        False,
        f"no new data since run {same_as}; nothing trained (latest.json stays at run "
        f"{published}; force_retrain=true trains anyway)",
        published,
    )


def decide(
    candidate: Candidate,
    measured: Mapping[str, Any] | None,
    latest: Mapping[str, Any] | None,
    *,
    promote: str,
    epsilon: float,
) -> tuple[bool, str, str | None, float | None]:
    """(promoted, why, run id compared with, its validation loss on this run's images).

    ``measured`` is train's ``published_validation.json`` (None: train measured nothing);
    ``latest`` is ``latest.json`` now. A LoRA that nobody measured against the new images is
    never replaced silently: without a measurement of the LoRA that is published now, the new
    one is not promoted (``promote: always`` publishes it anyway)."""
    compared = measured.get("run_id") if measured else None
    compared_loss = measured.get("val_loss") if measured else None
    if latest is None:
        return True, "the first LoRA published here", None, None
    published = str(latest["run_id"])
    if promote == "always":
        return True, f"promote: always (replacing run {published})", compared, compared_loss
    published_hash = latest.get("base_model_hash") or (measured or {}).get("base_model_hash")
    if published_hash and candidate.base_model_hash and published_hash != candidate.base_model_hash:
        return (
            True,
            f"run {published}'s LoRA is for another base model; this one replaces it",
            None,
            None,
        )
    if measured is None:
        return (
            False,
            f"run {published}'s LoRA was not measured on this run's validation images; train "
            "with compare_with: <publish_uri> (the pipeline does), or select with promote: always",
            None,
            None,
        )
    if measured.get("status") == "none_published" or compared != published:
        was = f"run {compared}" if compared else "nothing"
        return (
            False,
            f"latest.json moved from {was} to run {published} while this run trained; run "
            "again to compare with it",
            compared,
            compared_loss,
        )
    if measured.get("status") != "measured" or compared_loss is None:
        return False, f"not compared with run {published}: {measured.get('reason')}", compared, None
    if candidate.val_loss is None:
        return False, "this run has no validation loss to compare", compared, compared_loss
    threshold = compared_loss * (1 + epsilon)
    numbers = (
        f"validation loss {candidate.val_loss:.5g} against run {published}'s {compared_loss:.5g} "
        f"on this run's validation images"
    )
    if candidate.val_loss <= threshold:
        return True, f"{numbers}: not worse by more than {epsilon:.3g}", compared, compared_loss
    worse = candidate.val_loss / compared_loss - 1
    return (
        False,
        f"{numbers}: {worse:.1%} worse, more than promotion_epsilon {epsilon:.3g}; latest.json "
        f"stays at run {published}",
        compared,
        compared_loss,
    )


class Publication:
    """The publish folder, held: decide on the candidate, then publish it."""

    def __init__(self, publish_uri: str, latest: dict[str, Any] | None) -> None:
        self.publish_uri = publish_uri
        self.latest = latest

    def record(
        self,
        candidate: Candidate,
        measured: Mapping[str, Any] | None,
        *,
        promote: str,
        epsilon: float,
    ) -> RunRecord:
        promoted, reason, compared, compared_loss = decide(
            candidate, measured, self.latest, promote=promote, epsilon=epsilon
        )
        log.info("%s: %s", "promoted" if promoted else "not promoted", reason)
        return RunRecord(
            run_id=candidate.run_id,
            uri=self.run_uri(candidate.run_id),
            fingerprint=candidate.fingerprint,
            checkpoint_step=candidate.checkpoint_step,
            val_loss=candidate.val_loss,
            base_model_hash=candidate.base_model_hash,
            compared_with=compared,
            compared_val_loss=compared_loss,
            promoted=promoted,
            reason=reason,
            decided_at=_now(),
        )

    def history(self, record: RunRecord) -> list[dict[str, Any]]:
        """Every run published here once ``record`` is, oldest first."""
        earlier = list(self.latest["history"]) if self.latest else []
        return [*earlier, asdict(record)]

    def run_uri(self, run_id: str) -> str:
        return store.join(self.publish_uri, store.safe_name(run_id))

    def publish(self, lora_dir: str | Path, record: RunRecord) -> dict[str, Any]:
        """Copy the LoRA to its run folder, then write ``latest.json``: pointing at it when
        ``record`` is promoted, where it pointed otherwise; the history gains the record."""
        with outputs.staged_output(record.uri, RUN_KIND) as staging:
            ignore = shutil.ignore_patterns(store.MANIFEST_NAME)  # publishing writes its own
            shutil.copytree(lora_dir, staging, ignore=ignore, dirs_exist_ok=True)
        pointer = _pointer(record) if record.promoted or self.latest is None else self.latest
        latest = {**pointer, "history": self.history(record)}
        store.write_text(
            store.join(self.publish_uri, LATEST_NAME), json.dumps(latest, indent=2) + "\n"
        )
        log.info(
            "published the LoRA to %s; latest.json points at run %s", record.uri, latest["run_id"]
        )
        return latest


def _pointer(record: RunRecord) -> dict[str, Any]:
    return {
        "run_id": record.run_id,
        "uri": record.uri,
        "fingerprint": record.fingerprint,
        "val_loss": record.val_loss,
        "checkpoint_step": record.checkpoint_step,
        "base_model_hash": record.base_model_hash,
        "published_at": record.decided_at,
    }


@contextlib.contextmanager
def publishing(publish_uri: str) -> Iterator[Publication]:
    """The publish folder held for the block, with its ``latest.json`` as it is now."""
    with writer_lock.hold(publish_uri):
        yield Publication(publish_uri, read_latest(publish_uri))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
