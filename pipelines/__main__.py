"""``python -m pipelines COMMAND``: run the DAG locally, compile it, submit it, schedule it.

    run-local   the whole DAG through kfp.local's SubprocessRunner (``make run``)
    compile     pipelines/lora_training.yaml (``make compile``)
    submit      one run on the cluster at $KFP_HOST (``make submit``)
    schedule    a recurring run, e.g. weekly retraining (``make schedule``)

Pipeline parameters are given as ``--param name=value`` (lists and numbers as JSON, e.g.
``--param 'seeds=[1,2,3]'``) or, for submit and schedule, in a YAML file (``--params``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from lorapipe import store
from lorapipe.errors import ConfigError, LorapipeError
from lorapipe.redaction import redacted_output
from pipelines import cluster, local_run, lora_training, parameters

log = logging.getLogger(__name__)


def parse_params(pairs: list[str], params_file: str | None) -> dict[str, Any]:
    """Pipeline arguments from a YAML file, then ``name=value`` flags (values parsed as JSON
    when they are JSON, else kept as strings); unknown names are refused. A text parameter
    (``training_config``, ``sweep``, ``job_yaml``) given as a list or mapping is written back
    as one line of YAML, its value."""
    inputs = lora_training.lora_training.component_spec.inputs or {}
    known = set(inputs)
    arguments: dict[str, Any] = {}
    if params_file:
        loaded = yaml.safe_load(store.read_text(params_file)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{params_file}: expected 'name: value' lines")
        arguments.update(loaded)
    for pair in pairs:
        name, separator, text = pair.partition("=")
        if not separator:
            raise ConfigError(f"--param '{pair}': write it as name=value, e.g. num_gpus=4")
        try:
            arguments[name] = json.loads(text)
        except json.JSONDecodeError:
            arguments[name] = text
    for old_name, name in parameters.RENAMED.items():
        if old_name in arguments:
            log.warning("pipeline parameter '%s' is now '%s'; rename it", old_name, name)
            arguments.setdefault(name, arguments.pop(old_name))
    for name in arguments:
        if name not in known:
            raise ConfigError(
                f"pipeline parameter '{name}' is unknown; the parameters are "
                f"{', '.join(sorted(known))}"
            )
        if inputs[name].type == "String" and isinstance(arguments[name], dict | list):
            arguments[name] = yaml.safe_dump(arguments[name], default_flow_style=True).strip()
    return arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("run-local", "submit", "schedule"):
        command = commands.add_parser(name)
        command.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
        command.add_argument("--params", help="YAML file of pipeline parameters")
    commands.add_parser("compile")
    run_parser = commands.choices["run-local"]
    run_parser.add_argument("--out", default="runs/pipeline", help="local pipeline root etc.")
    run_parser.add_argument(
        "--s3-prefix", help="s3://bucket/path: put the sample inputs, checkpoints and LoRA there"
    )
    for name in ("submit", "schedule"):
        commands.choices[name].add_argument("--host", help="KFP API endpoint (default $KFP_HOST)")
        commands.choices[name].add_argument("--experiment", default="lorapipe")
    commands.choices["schedule"].add_argument("--cron", default="0 0 3 * * 1")
    commands.choices["schedule"].add_argument("--name", default="lorapipe-weekly-retraining")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "compile":
            print(lora_training.compile_pipeline())
            return 0
        arguments = parse_params(args.param, args.params)
        if args.command == "run-local":
            run = local_run.run_local(Path(args.out), arguments, args.s3_prefix)
            if not run.trained:
                print(run.reason)
            for claim in run.claims:
                print(claim.line())
            if run.claims:
                held = sum(claim.passed for claim in run.claims)
                print(f"the demo shows {held} of its {len(run.claims)} claims")
            if run.report.is_file():
                print(f"report: {run.report.resolve()}")
        elif args.command == "submit":
            print(f"run: {cluster.submit(arguments, args.host, args.experiment)}")
        else:
            job_id = cluster.schedule(arguments, args.host, args.experiment, args.cron, args.name)
            print(f"recurring run id: {job_id}")
    except LorapipeError as error:
        print(f"python -m pipelines {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    with redacted_output():  # KFP_TOKEN and the S3 keys never reach a terminal or CI log
        sys.exit(main())
