"""One writer per output: a second run into an output that a run is writing stops at once.

Two runs writing one output would interleave their files (two trainings' checkpoints and
``loss_log.csv`` rows in one folder, ``select`` choosing among them). A stage holds each output
it writes with :func:`hold` for as long as it writes it:

- **Local** ``<parent>/<name>``: ``fcntl.flock`` on the sibling file ``<parent>/.<name>.lock``.
  A sibling, because a published output directory is replaced by a rename, which would carry a
  lock file inside it away. The OS drops the lock when its process ends, however it ends, so a
  local lock never goes stale; a held one belongs to a live process, which ``--force`` does not
  take over (stop that process instead). The holder writes who it is into the file so that the
  refused run can name it.
- **S3** ``s3://bucket/prefix``: the lease object ``prefix/_LEASE.json`` (:data:`LEASE_NAME`),
  created with a conditional put (``If-None-Match: *``: of two runs exactly one creates it). It
  names an owner token, host, pid, command, since when, and the last heartbeat; a background
  thread renews it every TTL/3 with ``If-Match`` on its ETag, so a renewal never overwrites a
  lease someone took over. A lease not renewed for ``LORAPIPE_LEASE_TTL`` seconds (default
  120; its age is taken on the S3 server's clock, ``Last-Modified`` against ``Date``, so skewed
  client clocks do not matter) belongs to a dead run and is taken over; ``--force``
  (``LORAPIPE_FORCE=1``) takes over a live one too. The run that lost its lease learns it at
  :meth:`WriterLock.check`, which it calls before each upload, and stops. Release deletes the
  lease only while it is still ours (``If-Match``).

Within one process a nested :func:`hold` of the same output shares the outer lock (a stage's
hold and its publish helper's). Child processes started while a lock is held (accelerate's
workers) share it too: the holder lists its locks in ``LORAPIPE_WRITER_LOCKS``, which they
inherit.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lorapipe import store
from lorapipe.errors import (
    ConfigError,
    LorapipeError,
    ObjectNotFoundError,
    OutputBusyError,
    StorageError,
)

log = logging.getLogger(__name__)

LEASE_NAME = "_LEASE.json"
TTL_ENV = "LORAPIPE_LEASE_TTL"
DEFAULT_TTL_SECONDS = 120.0
FORCE_ENV = "LORAPIPE_FORCE"
SHARED_ENV = "LORAPIPE_WRITER_LOCKS"  # {output key: owner token} of the locks a parent holds
# conditional puts that lose a race: 412, or 409 when S3 sees two at once; NoSuchKey for an
# If-Match on a lease that is gone
_REFUSED = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"})
_ACQUIRE_ATTEMPTS = 5
_COMMAND_SHOWN = 80  # characters of the holder's command line in a message


def lease_ttl() -> float:
    """Seconds after its last heartbeat that an S3 lease counts as its holder's death."""
    text = os.environ.get(TTL_ENV, "")
    if not text:
        return DEFAULT_TTL_SECONDS
    try:
        ttl = float(text)
    except ValueError:
        ttl = float("nan")
    if not ttl > 0:
        raise ConfigError(
            f"{TTL_ENV}={text!r} is not a positive number of seconds; unset it for the "
            f"default {DEFAULT_TTL_SECONDS:.0f}"
        )
    return ttl


def force_requested() -> bool:
    """The process-wide ``--force`` (``lorapipe --force ...`` sets ``LORAPIPE_FORCE=1``)."""
    return os.environ.get(FORCE_ENV, "").lower() in ("1", "true", "yes")


@contextlib.contextmanager
def taking_over() -> Iterator[None]:
    """``--force`` inside the block, and for the processes started in it: for a pipeline task,
    whose outputs only earlier attempts of the same task (a killed pod, whose S3 lease has not
    yet expired) can hold."""
    before = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = before


# --------------------------------------------------------------------------- who holds it


@dataclass(frozen=True)
class Holder:
    """Who holds an output, as its lock file or lease says."""

    owner: str  # a random token: two holds never share one
    host: str
    pid: int
    command: str
    since: str  # ISO 8601, UTC
    heartbeat: str  # ISO 8601, UTC; a local lock's stays at ``since``

    @classmethod
    def this_process(cls) -> Holder:
        now = _now()
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), _command(), now, now)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Holder | None:
        """The holder in ``data``; None when it is not (yet) a whole record."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        command = self.command
        if len(command) > _COMMAND_SHOWN:
            command = command[: _COMMAND_SHOWN - 3] + "..."
        return f"`{command}` (pid {self.pid} on host {self.host}, since {self.since})"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _command() -> str:
    """This process's command line, as ``lorapipe ...`` when it is the lorapipe CLI."""
    program, *arguments = sys.argv or [""]
    if Path(program).name == "lorapipe" or program.endswith(os.path.join("lorapipe", "cli.py")):
        program = "lorapipe"
    return shlex.join([program, *arguments])


# --------------------------------------------------------------------------- the locks


class WriterLock:
    """This process's right to write one output, from :func:`hold`.

    A plain ``WriterLock`` is a local lock that a parent process holds for this one: nothing
    to check or release here."""

    def __init__(self, uri: str, owner: str) -> None:
        self.uri = uri
        self.owner = owner

    def check(self) -> None:
        """Raise ``OutputBusyError`` if another run took this output over (S3: the lease
        changed owner or is gone). A no-op locally: nobody can take a held flock away."""

    def _release(self) -> None:
        """Give the output up (only the process that acquired the lock does)."""


class _LocalLock(WriterLock):
    """An exclusive flock on ``<parent>/.<name>.lock``, held through an open descriptor."""

    def __init__(self, uri: str, owner: str, path: Path, fd: int) -> None:
        super().__init__(uri, owner)
        self.path = path
        self.fd = fd

    def _release(self) -> None:
        """Remove the lock file while still holding it, then unlock: a run that opened the
        file meanwhile sees it is no longer at ``path`` and locks a fresh one."""
        try:
            if _is_locked_file(self.fd, self.path):
                self.path.unlink()
        finally:
            os.close(self.fd)


class _LeaseWatch(WriterLock):
    """An S3 lease this process writes under, held by it or by its parent process: checked,
    never renewed or released here."""

    def __init__(self, uri: str, owner: str) -> None:
        super().__init__(uri, owner)
        self.lease_uri = store.join(uri, LEASE_NAME)

    def check(self) -> None:
        current = _read_lease(self.lease_uri)
        if current is None or current.holder is None or current.holder.owner != self.owner:
            raise OutputBusyError(_lost_message(self.uri, current))


class _S3Lease(_LeaseWatch):
    """A lease this process acquired: a heartbeat thread renews it until it is released."""

    def __init__(self, uri: str, holder: Holder, etag: str, ttl: float) -> None:
        super().__init__(uri, holder.owner)
        self.holder = holder
        self.etag = etag
        self.ttl = ttl
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._renew_until_released, name=f"lease {uri}", daemon=True
        )
        self._heartbeat.start()

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self._renew():
                    return
            except LorapipeError as error:  # e.g. the endpoint is down: try again next beat
                log.warning("could not renew the lease on %s: %s", self.uri, error)

    def _renew(self) -> bool:
        """Write a new heartbeat if the lease is still ours; False once it is not."""
        self.holder = replace(self.holder, heartbeat=_now())
        etag = _conditional_put(self.lease_uri, self.holder.to_json(), IfMatch=self.etag)
        if etag is None:
            etag = _our_etag(self.lease_uri, self.owner)  # our last renewal's answer got lost?
        if etag is None:
            log.warning(
                "the lease on %s was taken over; this run stops at its next check", self.uri
            )
            return False
        self.etag = etag
        return True

    def _release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours. Best effort: a lease
        left behind (endpoint down) expires after its TTL."""
        self._stop.set()
        self._heartbeat.join()
        try:
            if not _conditional_delete(self.lease_uri, self.etag):
                etag = _our_etag(self.lease_uri, self.owner)
                if etag is not None:
                    _conditional_delete(self.lease_uri, etag)
        except LorapipeError as error:
            log.warning(
                "could not delete the lease on %s (%s); it expires in %g s",
                self.uri,
                error,
                self.ttl,
            )


def _lost_message(uri: str, current: _LeaseState | None) -> str:
    if current is None:
        what = "deleted"
    elif current.holder is None:
        what = "overwritten"
    else:
        what = f"taken over by {current.holder.describe()}"
    return (
        f"{uri}: this run's lease ({LEASE_NAME}) was {what}, by --force or after it expired; "
        "this run stops so that two runs do not write one output: continue in the run that "
        "holds it now, or write to another output"
    )


def _is_locked_file(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (not removed or replaced)."""
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


# --------------------------------------------------------------------------- holding


@dataclass
class _Held:
    lock: WriterLock
    from_parent: bool  # the parent process holds it: not this process's to release
    depth: int = 0


_held: dict[tuple[int, str], _Held] = {}  # by (pid, output key): a forked child holds nothing
_held_guard = threading.Lock()


@contextlib.contextmanager
def hold(output_uri: str, *, force: bool | None = None) -> Iterator[WriterLock]:
    """Hold ``output_uri`` (local or s3://) for the block: raise ``OutputBusyError``, naming the
    holder, if another run holds it. ``force`` (None: ``--force``, i.e. ``LORAPIPE_FORCE``)
    takes over an S3 lease that is still being renewed. Held already in this process (or by
    the parent that started it): shares that lock."""
    key = (os.getpid(), output_key(output_uri))
    with _held_guard:
        held = _held.get(key)
        if held is None:
            held = _held[key] = _take(key[1], force_requested() if force is None else force)
        held.depth += 1
    try:
        yield held.lock
    finally:
        with _held_guard:
            held.depth -= 1
            if held.depth == 0:
                del _held[key]
                _give_up(key[1], held)


def output_key(output_uri: str) -> str:
    """One spelling per output: an absolute local path, or the s3:// URI without a final /."""
    uri = str(output_uri)
    if store.is_s3(uri):
        return uri.rstrip("/")
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def _take(key: str, force: bool) -> _Held:
    """The parent process's lock on ``key`` if it holds one, else a new one of this process,
    listed for the children it starts."""
    parents = _shared_locks()
    if key in parents:
        lock = _LeaseWatch(key, parents[key]) if store.is_s3(key) else WriterLock(key, parents[key])
        lock.check()  # taken over before this process even started: stop now
        return _Held(lock, from_parent=True)
    lock = _acquire_s3(key, force) if store.is_s3(key) else _acquire_local(key, force)
    _set_shared_locks(parents | {key: lock.owner})
    return _Held(lock, from_parent=False)


def _give_up(key: str, held: _Held) -> None:
    if held.from_parent:
        return
    _set_shared_locks({k: v for k, v in _shared_locks().items() if k != key})
    held.lock._release()


def _shared_locks() -> dict[str, str]:
    """The locks the parent process holds for this one (``LORAPIPE_WRITER_LOCKS``)."""
    try:
        return dict(json.loads(os.environ.get(SHARED_ENV) or "{}"))
    except ValueError:
        return {}


def _set_shared_locks(locks: dict[str, str]) -> None:
    if locks:
        os.environ[SHARED_ENV] = json.dumps(locks)
    else:
        os.environ.pop(SHARED_ENV, None)


# --------------------------------------------------------------------------- local


def lock_path(key: str) -> Path:
    """The lock file of a local output: its hidden sibling ``.<name>.lock``."""
    output = Path(key)
    return output.parent / f".{output.name}.lock"


def _acquire_local(key: str, force: bool) -> _LocalLock:
    path = lock_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock_file(key, path, force)
        holder = Holder.this_process()
        record = holder.to_json()
        os.pwrite(fd, record, 0)
        os.ftruncate(fd, len(record))
    except OSError as error:
        raise StorageError(
            f"cannot lock {key} ({path}: {error.strerror}); make its folder writable, on a "
            "filesystem with file locks"
        ) from None
    return _LocalLock(key, holder.owner, path, fd)


def _lock_file(key: str, path: Path, force: bool) -> int:
    """An open descriptor of ``path`` holding its exclusive flock, or ``OutputBusyError``."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputBusyError(_local_busy_message(key, path, holder, force)) from None
        if _is_locked_file(fd, path):
            return fd
        os.close(fd)  # its holder removed it as we opened it: lock the file there now


def _read_holder(fd: int, wait: float = 2.0) -> Holder | None:
    """The holder record of a lock file another process holds. It writes the record just
    after it takes the flock, so a record still empty is waited for briefly."""
    deadline = time.monotonic() + wait
    while (holder := Holder.from_json(os.pread(fd, 1 << 16, 0))) is None:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)
    return holder


def _local_busy_message(key: str, path: Path, holder: Holder | None, force: bool) -> str:
    who = holder.describe() if holder else f"another process (lock file {path})"
    stop = f"stop pid {holder.pid} on {holder.host}" if holder else "stop it"
    if force:
        return (
            f"{key} is being written by {who}, which is still running (the OS holds its lock "
            f"{path}), so --force cannot take it over: wait for it to finish or {stop}"
        )
    return (
        f"{key} is being written by {who}; wait for it to finish (or {stop}): its lock frees "
        "itself when that process ends, so --force is not needed"
    )


# --------------------------------------------------------------------------- S3


@dataclass(frozen=True)
class _LeaseState:
    holder: Holder | None  # None: not a lease record
    etag: str
    age: float  # seconds since it was last written, on the server's clock


def _acquire_s3(key: str, force: bool) -> _S3Lease:
    lease_uri = store.join(key, LEASE_NAME)
    ttl = lease_ttl()
    for _ in range(_ACQUIRE_ATTEMPTS):
        holder = Holder.this_process()
        etag = _conditional_put(lease_uri, holder.to_json(), IfNoneMatch="*")
        if etag is None:
            etag = _take_over_or_refuse(key, holder, force=force, ttl=ttl)
        if etag is not None:
            return _S3Lease(key, holder, etag, ttl)
    raise OutputBusyError(
        f"{key}: other runs took and gave up its lease {_ACQUIRE_ATTEMPTS} times while this "
        "one tried to get it; run again once only one run writes there"
    )


def _take_over_or_refuse(key: str, holder: Holder, *, force: bool, ttl: float) -> str | None:
    """The lease's new ETag once taken over from a dead (expired) or, with ``force``, a live
    holder; ``OutputBusyError`` when it is live; None when it changed meanwhile (try again)."""
    lease_uri = store.join(key, LEASE_NAME)
    current = _read_lease(lease_uri)
    if current is None:
        return None  # released meanwhile
    if current.holder and current.holder.owner == holder.owner:
        return current.etag  # our own put, retried after its answer got lost
    if not (force or current.age > ttl):
        raise OutputBusyError(_s3_busy_message(key, current, ttl))
    why = "with --force" if force else f"its lease expired ({current.age:.0f} s > {ttl:g} s)"
    previous = current.holder.describe() if current.holder else "an unreadable lease"
    log.warning("taking %s over from %s %s", key, previous, why)
    return _conditional_put(lease_uri, holder.to_json(), IfMatch=current.etag)


def _s3_busy_message(key: str, current: _LeaseState, ttl: float) -> str:
    who = current.holder.describe() if current.holder else f"another run ({LEASE_NAME})"
    return (
        f"{key} is being written by {who}, last heartbeat {current.age:.0f} s ago; wait for "
        f"it to finish, or if that run is dead, run again with --force (its lease also "
        f"expires {ttl:g} s after its last heartbeat)"
    )


def _read_lease(lease_uri: str) -> _LeaseState | None:
    """The lease at ``lease_uri``, or None when there is none."""
    bucket, key = store.split_s3(lease_uri)
    try:
        with store._s3_errors(lease_uri):
            answer = store.client().get_object(Bucket=bucket, Key=key)
            body = answer["Body"].read()
    except ObjectNotFoundError:
        return None
    return _LeaseState(Holder.from_json(body), answer["ETag"], _age_on_server(answer))


def _age_on_server(answer: dict[str, Any]) -> float:
    date = answer["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
    now = email.utils.parsedate_to_datetime(date) if date else dt.datetime.now(dt.timezone.utc)
    return (now - answer["LastModified"]).total_seconds()


def _our_etag(lease_uri: str, owner: str) -> str | None:
    current = _read_lease(lease_uri)
    ours = current is not None and current.holder is not None and current.holder.owner == owner
    return current.etag if ours else None


def _conditional_put(lease_uri: str, body: bytes, **condition: str) -> str | None:
    """Write the lease if ``condition`` (``IfNoneMatch``/``IfMatch``) holds: its new ETag, or
    None when the condition failed."""
    from botocore.exceptions import ClientError

    bucket, key = store.split_s3(lease_uri)
    with store._s3_errors(lease_uri):
        try:
            answer = store.client().put_object(
                Bucket=bucket, Key=key, Body=body, ContentType="application/json", **condition
            )
        except ClientError as error:
            if _refused(error):
                return None
            raise
    return answer["ETag"]


def _conditional_delete(lease_uri: str, etag: str) -> bool:
    """Delete the lease if it is still the version ``etag``; whether it was."""
    from botocore.exceptions import ClientError

    bucket, key = store.split_s3(lease_uri)
    with store._s3_errors(lease_uri):
        try:
            store.client().delete_object(Bucket=bucket, Key=key, IfMatch=etag)
        except ClientError as error:
            if _refused(error):
                return False
            raise
    return True


def _refused(error: Any) -> bool:
    code = str(error.response.get("Error", {}).get("Code", ""))
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in _REFUSED or status in (409, 412)
