"""``exchange sweeper``'s options: a value that would make it spin or never recover anything is a usage error."""

from __future__ import annotations

import pytest

from exchange.cli import build_parser


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--interval", "0"),  # a sweep loop without a pause: the database queried as fast as it answers
        ("--interval", "-1"),
        ("--interval", "nan"),
        ("--interval", "inf"),  # one sweep, then never again: no expiry, no lost message recovered
        ("--stale-after", "-1"),
        ("--stale-after", "nan"),
        ("--stale-after", "inf"),  # no symbol is ever stale: a lost wake-up leaves its orders pending forever
    ],
)
def test_the_sweeper_refuses_an_interval_or_staleness_it_could_not_work_with(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["sweeper", option, value])

    assert exit_.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err


def test_the_sweeper_takes_fractions_of_a_second() -> None:
    args = build_parser().parse_args(["sweeper", "--interval", "0.25", "--stale-after", "0"])
    assert (args.interval, args.stale_after) == (0.25, 0.0)
