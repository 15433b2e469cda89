"""``lorapipe fingerprint``: what a run reads, as digests that change exactly when it does.

Kubeflow Pipelines caches a task on its component and its input values. A ``data_uri`` string
says nothing about the files under it, so a weekly run whose users add images under the same
prefix would get the first week's dataset from the cache. The pipeline's first step therefore
fingerprints every input and hands the digests to the data stages as inputs: their cache key
then changes exactly when the content does.

An input's digest is the sha256 of its listing: each file's path below the URI, its size and
its ETag (S3) or modification time (local files), read without opening a file, so a bucket of
10,000 images costs one listing. A rewritten file changes it (a new ETag or mtime); so does
``touch``, the rule make and rsync follow. The run's digest adds the settings that shape the
LoRA (the training config and the data stages' parameters) to the inputs' digests; it is what
``latest.json`` records, to tell a scheduled run that nothing changed since.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from lorapipe import store
from lorapipe.errors import ConfigError, InputError

# the inputs a run reads, by the pipeline parameter that names each
INPUT_ROLES = ("data_uri", "metadata_uri", "tagger_uri", "base_model_uri")


@dataclass(frozen=True)
class InputFingerprint:
    """One input's digest and what it covers."""

    uri: str
    digest: str
    files: int
    bytes: int

    def line(self) -> str:
        """``sha256sum``-style: the digest, the URI and its size."""
        return f"{self.digest}  {self.uri}  ({self.files} files, {self.bytes} bytes)"


@dataclass(frozen=True)
class RunFingerprint:
    """Every input of a run and the settings that shape its LoRA."""

    inputs: dict[str, InputFingerprint]  # by INPUT_ROLES name; an empty URI is absent
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def data(self) -> str:
        """Of the images and their captions: ingest's cache key."""
        return _combine({role: self._digest(role) for role in ("data_uri", "metadata_uri")})

    @property
    def tagger(self) -> str:
        """Of the tagger project: the tag stage's cache key."""
        return self._digest("tagger_uri")

    @property
    def run(self) -> str:
        """Of everything: equal for two runs that would train the same LoRA."""
        parts = {role: self._digest(role) for role in INPUT_ROLES}
        parts["settings"] = _digest_text(json.dumps(self.settings, sort_keys=True))
        return _combine(parts)

    def _digest(self, role: str) -> str:
        found = self.inputs.get(role)
        return found.digest if found else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "data": self.data,
            "tagger": self.tagger,
            "inputs": {role: asdict(found) for role, found in self.inputs.items()},
            "settings": self.settings,
        }


def fingerprint_input(uri: str, role: str = "input") -> InputFingerprint:
    """The digest of the files at ``uri`` (a folder, a file or an s3:// prefix or object)."""
    listing = store.list_objects(uri)
    if not listing and store.is_s3(uri) and store.exists(uri):
        listing = [store.object_info(uri)]  # one object, e.g. an archive
    if not listing:
        raise InputError(
            f"{role} '{uri}' holds no files; give the folder, archive or s3:// prefix the run "
            "should read"
        )
    root = uri.rstrip("/")
    lines = []
    for info in listing:
        relative = info.uri[len(root) :].lstrip("/") if info.uri != root else ""
        lines.append(f"{relative}\t{info.size}\t{info.etag}")
    return InputFingerprint(
        uri=uri,
        digest=_digest_text("\n".join(lines)),
        files=len(listing),
        bytes=sum(info.size for info in listing),
    )


def fingerprint_run(uris: Mapping[str, str], settings: Mapping[str, Any]) -> RunFingerprint:
    """The fingerprint of a run reading ``uris`` (by INPUT_ROLES name; empty: not read) with
    ``settings`` (pipeline parameters; a ``training_config`` YAML text counts by its values,
    not by its spelling)."""
    inputs = {
        role: fingerprint_input(uri, role) for role in INPUT_ROLES if (uri := uris.get(role, ""))
    }
    return RunFingerprint(inputs, _canonical_settings(settings))


def _canonical_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    canonical = dict(settings)
    if isinstance(canonical.get("training_config"), str):
        try:
            canonical["training_config"] = yaml.safe_load(canonical["training_config"]) or {}
        except yaml.YAMLError as error:
            raise ConfigError(
                f"pipeline parameter training_config is not valid YAML ({error}); fix it"
            ) from None
    return json.loads(json.dumps(canonical, sort_keys=True, default=str))


def _digest_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _combine(parts: Mapping[str, str]) -> str:
    return _digest_text("\n".join(f"{name}={digest}" for name, digest in sorted(parts.items())))


# --------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "uris",
        nargs="+",
        metavar="URI",
        help="a folder, file or s3:// prefix; the digest is the one the pipeline's "
        "fingerprint step shows for it",
    )


def main(args: argparse.Namespace) -> int:
    for line in fingerprint_lines(args.uris):
        print(line)
    return 0


def fingerprint_lines(uris: Sequence[str]) -> list[str]:
    """One line per URI; with several, a last line of their combined digest."""
    found = [fingerprint_input(uri) for uri in uris]
    lines = [input_fingerprint.line() for input_fingerprint in found]
    if len(found) > 1:
        combined = _combine({str(index): f.digest for index, f in enumerate(found)})
        lines.append(f"{combined}  all {len(found)} inputs")
    return lines
