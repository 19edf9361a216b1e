"""``BatchingStreamHandler``: log lines are written in batches, whole and in order, errors at once."""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator

import pytest

from exchange.observability.logs import BatchingStreamHandler


class CountingStream(io.StringIO):
    """A text stream that records each ``write`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, CountingStream, BatchingStreamHandler]]:
    stream = CountingStream()
    handler = BatchingStreamHandler(stream, flush_interval_s=0.05)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test-batching-{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield logger, stream, handler
    logger.removeHandler(handler)


def _wait_for(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)


def test_info_lines_are_held_then_written_together_in_order(
    logged: tuple[logging.Logger, CountingStream, BatchingStreamHandler],
) -> None:
    logger, stream, _ = logged
    for n in range(3):
        logger.info("line %d", n)
    assert stream.writes == []  # held: no write per line
    _wait_for(lambda: stream.writes)
    assert stream.writes == ["INFO line 0\nINFO line 1\nINFO line 2\n"]


def test_a_warning_is_written_at_once_after_the_lines_held_before_it(
    logged: tuple[logging.Logger, CountingStream, BatchingStreamHandler],
) -> None:
    logger, stream, _ = logged
    logger.info("first")
    logger.warning("second")
    assert stream.getvalue() == "INFO first\nWARNING second\n"
    assert len(stream.writes) == 1


def test_flush_writes_what_is_held_and_a_full_batch_goes_out_by_itself(
    logged: tuple[logging.Logger, CountingStream, BatchingStreamHandler],
) -> None:
    logger, stream, handler = logged
    logger.info("held")
    handler.flush()
    assert stream.getvalue() == "INFO held\n"
    handler.max_lines = 2
    logger.info("a")
    logger.info("b")
    assert stream.getvalue() == "INFO held\nINFO a\nINFO b\n"


def test_a_forked_child_writes_its_held_lines_with_a_flusher_of_its_own() -> None:
    read_end, write_end = os.pipe()
    handler = BatchingStreamHandler(open(write_end, "w", closefd=False), flush_interval_s=0.05)  # noqa: SIM115
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test-batching-fork")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        logger.info("parent")  # starts the parent's flusher, which the child inherits as a stopped thread
        time.sleep(0.3)  # written by it meanwhile
        pid = os.fork()
        if pid == 0:
            logger.warning("child started")
            logger.info("child info")  # held: only the child's own flusher can write it
            time.sleep(1.0)
            os._exit(0)  # no atexit flush: what reached the pipe was written by the flusher
        os.waitpid(pid, 0)
        os.close(write_end)
        with open(read_end) as pipe:
            assert pipe.read().splitlines() == ["parent", "child started", "child info"]
    finally:
        logger.removeHandler(handler)
