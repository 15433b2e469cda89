"""Submit the pipeline to a Kubeflow Pipelines server, once or on a schedule.

Both upload the freshly compiled YAML as a new version of the ``lorapipe-lora-training``
pipeline, so the KFP UI lists every version that ever ran, and start it with the given
parameters.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from lorapipe.errors import ClusterError, ConfigError
from pipelines.lora_training import PIPELINE_NAME, compile_pipeline


def _host(host: str | None) -> str:
    host = host or os.environ.get("KFP_HOST")
    if not host:
        raise ConfigError("KFP_HOST is not set; export KFP_HOST=https://<your Kubeflow>/pipeline")
    return host


def _client(host: str) -> Any:
    """A KFP client for ``host``; $KFP_TOKEN, when set, is sent as the bearer token
    (otherwise kfp's own credential discovery applies)."""
    import kfp

    return kfp.Client(
        host=host,
        existing_token=os.environ.get("KFP_TOKEN") or None,
        namespace=os.environ.get("KFP_NAMESPACE") or "kubeflow",
    )


@contextlib.contextmanager
def kfp_errors(host: str) -> Iterator[None]:
    """A refused or unreachable KFP server becomes one line naming the host and the HTTP
    status (the response body and headers, which may echo the token, are left out)."""
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as error:
        hint = " (check KFP_TOKEN or your kfp credentials)" if error.status in (401, 403) else ""
        raise ClusterError(
            f"KFP at {host} answered HTTP {error.status} {error.reason}{hint}"
        ) from None
    except (HTTPError, OSError) as error:
        raise ClusterError(
            f"cannot reach KFP at {host} ({type(error).__name__}); check KFP_HOST and the network"
        ) from None


def upload_version(client: Any) -> tuple[str, str]:
    """Compile, then upload as a new version of the ``lorapipe-lora-training`` pipeline
    (or as the pipeline itself on first use); returns (pipeline id, version id)."""
    import datetime as dt

    package = str(compile_pipeline())
    pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(package, PIPELINE_NAME).pipeline_id
        (first_version,) = client.list_pipeline_versions(pipeline_id).pipeline_versions
        return pipeline_id, first_version.pipeline_version_id
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    version = client.upload_pipeline_version(
        package,
        pipeline_version_name=f"{PIPELINE_NAME}-{stamp}",
        pipeline_id=pipeline_id,
    )
    return pipeline_id, version.pipeline_version_id


def _run_target(client: Any, experiment: str) -> dict[str, str]:
    """A new pipeline version and the experiment to run it in, as the keyword arguments that
    both ``run_pipeline`` and ``create_recurring_run`` take."""
    pipeline_id, version_id = upload_version(client)
    experiment_id = client.create_experiment(experiment).experiment_id
    return {"experiment_id": experiment_id, "pipeline_id": pipeline_id, "version_id": version_id}


def submit(arguments: dict[str, Any], host: str | None, experiment: str) -> str:
    """Upload a pipeline version and start one run of it; returns the run's URL."""
    host = _host(host)
    with kfp_errors(host):
        client = _client(host)
        target = _run_target(client, experiment)
        run = client.run_pipeline(
            job_name=f"{PIPELINE_NAME} {target['version_id'][:8]}", params=arguments, **target
        )
    return f"{client._uihost.rstrip('/')}/#/runs/details/{run.run_id}"


def schedule(
    arguments: dict[str, Any], host: str | None, experiment: str, cron: str, name: str
) -> str:
    """A recurring run of a new pipeline version: at most one run at a time, and no catch-up
    of runs missed while paused. KFP cron has six fields, seconds first: '0 0 3 * * 1' is
    Mondays at 03:00."""
    if len(cron.split()) != 6:
        raise ConfigError(
            f"SCHEDULE '{cron}' has {len(cron.split())} fields; KFP wants six, seconds first, "
            "e.g. '0 0 3 * * 1' for Mondays at 03:00"
        )
    host = _host(host)
    with kfp_errors(host):
        client = _client(host)
        recurring = client.create_recurring_run(
            job_name=name,
            cron_expression=cron,
            max_concurrency=1,
            no_catchup=True,
            params=arguments,
            **_run_target(client, experiment),
        )
    return recurring.recurring_run_id
