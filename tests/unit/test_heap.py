"""``exchange.heap.settle``: start-up objects leave the collected generations; later cycles are still collected.

Each test runs in a child interpreter: settling freezes the whole process, which must not happen to pytest's."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_settle_moves_every_live_object_out_of_the_collected_generations() -> None:
    _run(
        """
        import gc
        from exchange import heap

        class Node:
            pass

        startup = Node()
        startup.self = startup  # a cycle that lives as long as the process
        assert any(o is startup for o in gc.get_objects())
        heap.settle()
        assert gc.get_freeze_count() > 0
        assert not any(o is startup for o in gc.get_objects())  # frozen: no collection walks it again
        assert gc.get_threshold()[0] == heap.YOUNG_THRESHOLD
        """
    )


def test_a_cycle_made_after_settle_is_still_collected() -> None:
    _run(
        """
        import gc, weakref
        from exchange import heap

        class Node:
            pass

        heap.settle()
        later = Node()
        later.self = later
        gone = weakref.ref(later)
        del later
        gc.collect()
        assert gone() is None
        """
    )


def test_with_an_observer_every_collection_from_settles_own_on_is_reported_with_generation_and_duration() -> None:
    _run(
        """
        import gc, threading, time
        from exchange import heap

        pauses = []
        heap.settle(lambda generation, seconds: pauses.append((generation, seconds, threading.current_thread().name)))
        gc.collect()
        gc.collect(0)
        deadline = time.monotonic() + 10 * heap.REPORT_EVERY_S
        while len(pauses) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [g for g, _, _ in pauses] == [2, 2, 0], pauses  # settle's own full collection, then these two
        assert all(0 <= s < 5 for _, s, _ in pauses), pauses
        assert {name for _, _, name in pauses} == {"gc-pauses"}  # reported by its own thread, not in the collector
        """
    )
