"""Running test code in several threads at once (concurrent matchers, api requests …)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def run_concurrently(target: Callable[[T], object], args: Iterable[T]) -> None:
    """``target(arg)`` for every arg, each in its own thread, all released at the same moment; waits for all of
    them and re-raises the first failure (after every thread has ended)."""
    items = list(args)
    start = threading.Barrier(len(items))
    errors: list[BaseException] = []

    def run(arg: T) -> None:
        try:
            start.wait()
            target(arg)
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(arg,)) for arg in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
