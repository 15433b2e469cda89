"""The pipeline's first step: fingerprint what the run reads and decide whether to train.

A scheduled run whose inputs (images, captions, tagger, base model) and settings are those of
the LoRA ``latest.json`` records, or of the last run published there, has nothing new to
learn: it stops here, before any pod asks for a GPU, unless ``force_retrain``. Otherwise the
digests go to the data stages as inputs, so that KFP's cache hits exactly when the content is
the same (:mod:`lorapipe.fingerprint`), and the run's digest goes to select, which records it
with the LoRA.

Output (a folder, local or s3://): ``report.json``, the fingerprints and the decision, which
the run report's first section shows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from lorapipe import store
from lorapipe.fingerprint import fingerprint_run
from lorapipe.publication import retrain_decision

log = logging.getLogger(__name__)

REPORT_NAME = "report.json"


def check_inputs(
    output_uri: str,
    uris: Mapping[str, str],
    settings: Mapping[str, Any],
    *,
    publish_uri: str,
    force_retrain: bool,
) -> dict[str, Any]:
    """Fingerprint ``uris`` with ``settings``, decide against ``publish_uri``'s latest.json,
    write the report to ``output_uri`` and return it."""
    fingerprint = fingerprint_run(uris, settings)
    decision = retrain_decision(publish_uri, fingerprint.run, force=force_retrain)
    report = {
        "stage": "fingerprint",
        "retrain": decision.retrain,
        "reason": decision.reason,
        "published_run_id": decision.published_run_id,
        "publish_uri": publish_uri,
        "force_retrain": force_retrain,
        "fingerprint": fingerprint.to_dict(),
    }
    store.write_text(store.join(output_uri, REPORT_NAME), json.dumps(report, indent=2) + "\n")
    log.info("%s", decision.reason)
    return report
