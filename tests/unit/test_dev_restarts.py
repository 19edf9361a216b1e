"""``exchange dev`` restarts a child that died the way Docker's restart policy does."""

from __future__ import annotations

from exchange.dev import FIRST_RESTART_DELAY_S, HEALTHY_RUN_S, MAX_RESTART_DELAY_S, restart_delay


def test_a_first_death_is_restarted_after_100_ms() -> None:
    assert FIRST_RESTART_DELAY_S == 0.1
    assert restart_delay(None, ran_s=0.5) == FIRST_RESTART_DELAY_S
    assert restart_delay(None, ran_s=3600) == FIRST_RESTART_DELAY_S


def test_a_child_dying_soon_after_each_start_waits_twice_as_long_each_time_up_to_the_cap() -> None:
    delays: list[float] = []
    delay = None
    for _ in range(10):
        delay = restart_delay(delay, ran_s=0.2)
        delays.append(delay)
    assert delays[:5] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert delays[-1] == MAX_RESTART_DELAY_S
    assert max(delays) == MAX_RESTART_DELAY_S


def test_a_child_that_ran_long_enough_is_restarted_after_the_first_delay_again() -> None:
    assert restart_delay(6.4, ran_s=HEALTHY_RUN_S) == FIRST_RESTART_DELAY_S
    assert restart_delay(6.4, ran_s=HEALTHY_RUN_S - 0.01) == MAX_RESTART_DELAY_S
