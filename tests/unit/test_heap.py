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


def test_a_keep_collects_the_cycles_already_garbage_and_freezes_what_is_alive() -> None:
    _run(
        """
        import gc, weakref
        from exchange import heap

        class Node:
            pass

        gc.disable()  # no automatic collection may do the keep's work
        book = Node()  # alive: the keep freezes it
        dead = Node()
        dead.self = dead  # garbage already, reachable only from itself: the keep frees it instead of freezing it
        gone = weakref.ref(dead)
        del dead
        promoted = Node()
        promoted.self = promoted
        gc.collect(1)  # now in the oldest generation, which a young collection would not walk
        promoted_gone = weakref.ref(promoted)
        del promoted

        assert heap.Keeper()() is True

        assert gone() is None and promoted_gone() is None
        assert gc.get_freeze_count() > 0
        assert not any(o is book for o in gc.get_objects())
        """
    )


def test_a_keeper_keeps_at_most_once_per_interval_whatever_the_calls() -> None:
    _run(
        """
        import gc
        from exchange import heap

        now = [100.0]
        keep = heap.Keeper(every_s=1.0, clock=lambda: now[0])
        kept = []
        for t in (100.0, 100.2, 100.99, 101.0, 101.5, 103.0):
            now[0] = t
            kept.append(keep())
        assert kept == [True, False, False, True, False, True], kept
        """
    )


def test_an_object_a_keep_froze_is_still_freed_when_its_last_reference_goes() -> None:
    _run(
        """
        import gc, weakref
        from exchange import heap

        class Order:
            pass

        resting = Order()
        resting.owner = Order()  # tracked, no cycle: reference counting frees both, frozen or not
        heap.Keeper()()
        assert not any(o is resting for o in gc.get_objects())
        freed = []
        watch = weakref.ref(resting.owner, lambda _: freed.append(True))
        del resting
        assert freed == [True] and watch() is None
        """
    )


def test_no_collection_runs_while_the_collector_is_paused_and_it_is_enabled_again_after() -> None:
    _run(
        """
        import gc
        from exchange import heap

        runs = []
        gc.callbacks.append(lambda phase, info: runs.append(phase))
        with heap.collector_paused():
            kept = [[i] for i in range(200_000)]  # far past every generation's threshold
            assert runs == [] and not gc.isenabled()
        assert gc.isenabled()
        gc.disable()
        with heap.collector_paused():
            pass
        assert not gc.isenabled()  # a collector disabled before stays disabled
        """
    )
