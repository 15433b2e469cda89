"""ingest's work over the input's files, on ``workers`` threads, in input order, with memory
bounded.

Threads, not processes: decoding, hashing, the audit's NumPy and encoding release the GIL,
so threads use every core; a spawned process pool cost about 0.3 s of imports per worker per
pass, and pickled every result back. (Workers are never forked: boto3 and tqdm have threads
by then, and forking a threaded process can deadlock.)

While the pool runs, BLAS (OpenBLAS under NumPy) is held to one thread: the pool already
puts a file on every core, and two workers' BLAS calls (the audit's dot products) each waking
a BLAS thread per core made pass 1 no faster on two threads than on one (300 photos: 9.8
ms an image on two workers against 10.7 on one; 6.2 ms with BLAS held to one thread)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from threadpoolctl import threadpool_limits
from tqdm import tqdm

from lorapipe.ingestion.inputs import Input

# tasks in flight per worker: keeps every thread busy while bounding memory
WINDOW_PER_WORKER = 4

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(function: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map`` in input order over ``workers`` threads, with at most WINDOW_PER_WORKER tasks
    per worker in flight: ``items`` is consumed lazily and results never pile up in memory."""
    if workers <= 1:
        yield from map(function, items)
        return
    with (
        threadpool_limits(limits=1, user_api="blas"),
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorapipe-ingest") as pool,
    ):
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= workers * WINDOW_PER_WORKER:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def over_files(
    source: Input,
    names: Sequence[str],
    task: Callable[[str, Path], R],
    workers: int,
    step: str,
) -> Iterator[tuple[str, R]]:
    """(name, ``task(name, path)``) for each name, in order, with a progress bar named
    ``step``. The local path is made here, in the calling thread: an S3 object is downloaded
    as its turn comes, one at a time."""
    items = ((name, source.path(name)) for name in names)
    results = bounded_map(lambda item: task(*item), items, workers)
    pairs = zip(names, results, strict=True)
    return tqdm(pairs, total=len(names), desc=f"ingest: {step}", unit="image", disable=None)
