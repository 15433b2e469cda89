"""ingest's work runs on threads, in input order, never far ahead of its consumer."""

from __future__ import annotations

import threading
import time

from lorapipe.ingestion.parallel import WINDOW_PER_WORKER, bounded_map


def test_results_come_in_input_order_whichever_finishes_first() -> None:
    def slow_for_small(value: int) -> int:
        time.sleep(0.002 * (10 - value))
        return value * value

    assert list(bounded_map(slow_for_small, range(10), workers=3)) == [v * v for v in range(10)]


def test_items_are_taken_lazily_at_most_a_window_ahead() -> None:
    taken: list[int] = []

    def items() -> object:
        for value in range(100):
            taken.append(value)
            yield value

    results = bounded_map(lambda value: value, items(), workers=2)
    assert next(results) == 0
    assert len(taken) <= 2 * WINDOW_PER_WORKER
    results.close()


def test_work_runs_on_several_threads_and_with_one_worker_in_the_caller() -> None:
    def thread_of(_: int) -> str:
        time.sleep(0.01)
        return threading.current_thread().name

    assert len(set(bounded_map(thread_of, range(8), workers=2))) == 2
    caller = threading.current_thread().name
    assert set(bounded_map(thread_of, range(3), workers=1)) == {caller}


def test_numpys_blas_runs_on_one_thread_inside_the_workers_and_is_restored_after() -> None:
    """Every core already decodes a file of its own: a BLAS pool per worker call only
    oversubscribes them (it made pass 1 no faster on two threads than on one)."""
    import numpy  # noqa: F401  (loads the BLAS that threadpoolctl reports)
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads()
    assert before, "NumPy's BLAS is loaded"
    inside = list(bounded_map(lambda _: blas_threads(), range(4), workers=2))
    assert inside == [[1] * len(before)] * 4
    assert blas_threads() == before
