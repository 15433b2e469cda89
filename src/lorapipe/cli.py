"""``lorapipe <command> ...``: the entrypoint of every container and of local use.

Each command lives in its own module, which provides ``configure_parser(parser)`` and
``main(args) -> int``. Modules are imported only when their command runs, so
``lorapipe ingest`` never pays for importing torch. A command runs inside
:func:`lorapipe.redaction.redacted_output`: no credential reaches its output or logs, even with
``--debug``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from lorapipe import redaction
from lorapipe.errors import LorapipeError, StorageError
from lorapipe.writer_lock import FORCE_ENV

# A write that fails for lack of space, whichever library did it (Python's OSError, pyarrow's,
# safetensors' "... (os error 28)"), is one line like any other LorapipeError, not a traceback.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny-model": (
        "lorapipe.demo.tiny_model",
        "write the tiny offline SD pipeline used by tests and the demo",
    ),
    "ingest": (
        "lorapipe.stages.ingest",
        "decode, clean and dedupe images (+ metadata.csv) into a dataset",
    ),
    "select": ("lorapipe.stages.select", "pick a checkpoint by loss; write diffusers+kohya LoRAs"),
    "tag": ("lorapipe.stages.tag", "DeepDanbooru tags and captions; exports metadata.csv"),
    "augment": ("lorapipe.stages.augment", "add mirrored copies, swapping left/right in captions"),
    "train": ("lorapipe.stages.train", "train a LoRA on 1..N processes, with validation loss"),
    "sweep": (
        "lorapipe.sweep",
        "train one LoRA per config of a sweep (a list or grid of overrides), comparable runs",
    ),
    "generate": ("lorapipe.stages.generate", "image grid with layered negatives, metrics, report"),
    "report": ("lorapipe.report.run_report", "one HTML page for a run: a section per stage"),
    "fingerprint": (
        "lorapipe.fingerprint",
        "the digest of each input's listing, as the pipeline's cache key",
    ),
}


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorapipe",
        description="Stable Diffusion LoRA training pipeline. Run `lorapipe COMMAND --help`.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument(
        "--force",
        action="store_true",
        help="take over an S3 output whose lease another run holds (when that run is dead)",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in sorted(COMMANDS.items()):
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def _version() -> str:
    from lorapipe import __version__

    return f"lorapipe {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command with every credential scrubbed from what it prints and logs."""
    with redaction.redacted_output():
        return _run_command(argv)


def _run_command(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if "--force" in argv:  # for writer_lock; through the environment it reaches workers too
        argv.remove("--force")
        os.environ[FORCE_ENV] = "1"
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        _top_level_parser().parse_args(argv or ["--help"])
        return 2
    module_name, help_text = COMMANDS[command]
    argv.remove(command)

    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"lorapipe {command}", description=help_text)
        module.configure_parser(parser)
        args = parser.parse_args(argv)
        return int(module.main(args) or 0)
    except LorapipeError as error:
        return _fail(command, error, debug)
    except Exception as error:
        full = _disk_full(error)
        if full is None:  # a bug: its traceback, printed here so that it is redacted too
            traceback.print_exc()
            return 1
        return _fail(command, full, debug)
    except KeyboardInterrupt:
        print(f"lorapipe {command}: interrupted", file=sys.stderr)
        return 130


def _fail(command: str, error: LorapipeError, debug: bool) -> int:
    """The one error line (after the traceback with ``--debug``) and the error's exit status,
    the same with ``--debug`` as without, so a script that checks it can be debugged."""
    if debug:
        traceback.print_exc()
    print(f"lorapipe {command}: error: {error}", file=sys.stderr)
    return error.exit_code


def _disk_full(error: Exception) -> StorageError | None:
    """The one-line error for a write that failed because the disk (or quota) is full."""
    text = str(error)
    for code in _DISK_FULL:
        if (isinstance(error, OSError) and error.errno == code) or os.strerror(code) in text:
            where = f" writing {error.filename}" if getattr(error, "filename", None) else ""
            return StorageError(
                f"disk full{where} ({os.strerror(code)}); free some space (or raise the quota) "
                "and run the command again; earlier results are left as they were"
            )
    return None


if __name__ == "__main__":
    sys.exit(main())
