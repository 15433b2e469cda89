"""One writer per output (``lorapipe.writer_lock``): local flock and S3 lease, against other
real processes and moto's real S3 server."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorapipe import cli, store, writer_lock
from lorapipe.errors import ConfigError, OutputBusyError
from lorapipe.writer_lock import LEASE_NAME, hold, lock_path

# a process that holds its argument until its stdin closes, or reports why it cannot
HOLDER = """
import sys
from lorapipe.errors import OutputBusyError
from lorapipe.writer_lock import hold
try:
    with hold(sys.argv[1]) as lock:
        lock.check()
        print("held", flush=True)
        sys.stdin.read()
except OutputBusyError as error:
    print(f"busy: {error}", flush=True)
    sys.exit(2)
"""


class Holder:
    """Another process holding an output (``HOLDER``), with extra environment: another run's,
    or with ``child`` one that this process started to share its locks."""

    def __init__(self, uri: str, *, child: bool = False, **env: str) -> None:
        inherited = {k: v for k, v in os.environ.items() if child or k != writer_lock.SHARED_ENV}
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=inherited | env,
        )
        self.first_line = self.process.stdout.readline().strip()

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def finish(self) -> int:
        self.process.stdin.close()
        return self.process.wait(timeout=30)


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    """Holders started by a test, all ended after it."""
    started: list[Holder] = []
    yield started
    for holder in started:
        if holder.process.poll() is None:
            holder.kill()


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return f"{request.getfixturevalue('s3_bucket')}/out"


def lease(uri: str) -> dict[str, object] | None:
    lease_uri = store.join(uri, LEASE_NAME)
    return json.loads(store.read_text(lease_uri)) if store.exists(lease_uri) else None


def locked_elsewhere(path: Path) -> bool:
    """Whether another open of ``path`` (a separate flock in this process) would be refused."""
    if not path.exists():
        return False
    with path.open("rb") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(file, fcntl.LOCK_UN)
        return False


def is_held(uri: str) -> bool:
    return lease(uri) is not None if store.is_s3(uri) else locked_elsewhere(lock_path(uri))


# --------------------------------------------------------------------------- within one process


def test_a_nested_hold_shares_the_outer_lock_and_only_the_outer_one_releases(output: str) -> None:
    with hold(output) as outer:
        with hold(output.rstrip("/") + "/") as inner:
            assert inner is outer
            inner.check()
        assert is_held(output)
        outer.check()
    assert not is_held(output)
    assert not lock_path(writer_lock.output_key(output)).exists() or store.is_s3(output)
    assert writer_lock.SHARED_ENV not in os.environ


def test_a_hold_is_released_when_its_block_raises(output: str) -> None:
    with pytest.raises(RuntimeError), hold(output):
        assert is_held(output)
        raise RuntimeError("the stage failed")
    assert not is_held(output)
    with hold(output):  # free again
        pass


def test_the_lease_records_who_holds_it(s3_bucket: str) -> None:
    output = f"{s3_bucket}/out"
    with hold(output) as lock:
        record = lease(output)
        assert record["owner"] == lock.owner
        assert record["pid"] == os.getpid() and record["host"] and record["command"]
        assert record["since"] and record["heartbeat"]


def test_a_bad_lease_ttl_is_one_line_naming_the_variable(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(writer_lock.TTL_ENV, "soon")
    message = "LORAPIPE_LEASE_TTL='soon' is not a positive number"
    with pytest.raises(ConfigError, match=message), hold(f"{s3_bucket}/out"):
        pass


def test_the_force_flag_is_a_process_wide_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(writer_lock.FORCE_ENV, "0")  # restored after the test
    assert not writer_lock.force_requested()
    with pytest.raises(SystemExit):
        cli.main(["tiny-model", "--force", "--help"])
    assert writer_lock.force_requested()


# --------------------------------------------------------------------------- against other processes


def test_a_second_process_is_refused_in_one_line_naming_the_holder(
    output: str, holders: list[Holder]
) -> None:
    with hold(output):
        holders.append(second := Holder(output))
        assert second.process.wait(timeout=30) == 2
    message = second.first_line
    assert message.startswith("busy: ") and "\n" not in message
    assert f"pid {os.getpid()} on host" in message and "since" in message and "wait" in message
    assert ("--force" in message) if store.is_s3(output) else ("not needed" in message)


def test_a_local_lock_frees_itself_when_its_holder_is_sigkilled(
    tmp_path: Path, holders: list[Holder]
) -> None:
    output = str(tmp_path / "out")
    holders.append(first := Holder(output))
    assert first.first_line == "held"
    with pytest.raises(OutputBusyError, match=f"pid {first.pid} on host"), hold(output):
        pass
    first.kill()
    with hold(output):
        assert locked_elsewhere(lock_path(output))


def test_a_stale_lease_is_taken_over_after_its_ttl(
    s3_bucket: str, holders: list[Holder], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(writer_lock.TTL_ENV, "1")
    output = f"{s3_bucket}/out"
    holders.append(dead := Holder(output))
    assert dead.first_line == "held"
    dead.kill()  # its lease stays, no longer renewed
    with pytest.raises(OutputBusyError, match="run again with --force"), hold(output):
        pass
    time.sleep(2.5)  # > TTL, on the server's one-second clock
    with hold(output) as lock:
        assert lease(output)["owner"] == lock.owner
        lock.check()
    assert lease(output) is None


def test_the_heartbeat_keeps_a_live_lease_from_expiring(
    s3_bucket: str, holders: list[Holder], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(writer_lock.TTL_ENV, "2")
    output = f"{s3_bucket}/out"
    with hold(output) as lock:
        time.sleep(4.5)  # more than twice the TTL: only renewals keep it fresh
        holders.append(second := Holder(output))
        assert second.process.wait(timeout=30) == 2, second.first_line
        lock.check()


def test_force_takes_over_a_live_lease_and_the_old_holder_stops_at_its_check(
    s3_bucket: str, holders: list[Holder]
) -> None:
    output = f"{s3_bucket}/out"
    with hold(output) as lock:
        holders.append(thief := Holder(output, LORAPIPE_FORCE="1"))
        assert thief.first_line == "held"
        with pytest.raises(OutputBusyError, match=f"taken over by .*pid {thief.pid} on host"):
            lock.check()
    assert lease(output)["pid"] == thief.pid  # releasing a lost lease leaves the new one alone
    assert thief.finish() == 0
    assert lease(output) is None


def test_a_child_process_shares_the_lock_its_parent_holds(
    output: str, holders: list[Holder]
) -> None:
    """As accelerate's workers do: they inherit ``LORAPIPE_WRITER_LOCKS``."""
    with hold(output):
        holders.append(child := Holder(output, child=True))
        assert child.first_line == "held"
        assert child.finish() == 0
        assert is_held(output)  # the child's exit released nothing
    assert not is_held(output)


def test_a_pipeline_task_takes_over_what_a_killed_attempt_of_it_still_holds(
    s3_bucket: str, holders: list[Holder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retried pod starts while its killed predecessor's lease is still fresh."""
    monkeypatch.delenv(writer_lock.FORCE_ENV, raising=False)
    output = f"{s3_bucket}/out"
    holders.append(killed := Holder(output))
    killed.kill()
    with pytest.raises(OutputBusyError), hold(output):
        pass
    with writer_lock.taking_over(), hold(output) as lock:
        assert lease(output)["owner"] == lock.owner
    assert not writer_lock.force_requested()  # only inside the block
