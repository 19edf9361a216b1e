"""``python -m exchange.dramatiq_master KIND <dramatiq's arguments>``: dramatiq's command line (``python -m
dramatiq …``) with the exchange's logging in its master process, as ``exchange matcher`` and ``exchange webhooks``
run it.

Why: dramatiq's master never imports the actor modules (only its worker processes do, and they configure the
exchange's logging there), so its own lines — its start, the signals it forwards, a worker's unexpected exit —
were in dramatiq's text format (``logging.basicConfig``) among the workers' JSON lines. Here the root logger gets
the exchange's handler (:func:`~exchange.observability.logs.configure_logging`, ``EXCHANGE_LOG_FORMAT`` and
``EXCHANGE_LOG_LEVEL``, ``process`` = KIND) before dramatiq's ``main`` runs, and dramatiq is told not to configure
logging (``--skip-logging``). Invariant: every line the master writes is in the exchange's format; so are its
worker processes' lines before they import the actor module (they inherit the handler at the fork and replace it
with their own once the module is imported).

Only dramatiq's documented command line is used (its argument parser and ``main``), never a copy of it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from exchange.config import Settings, SettingsError

USAGE = "usage: python -m exchange.dramatiq_master KIND MODULE [dramatiq's options]"


def argv(kind: str, dramatiq_args: Sequence[str]) -> list[str]:
    """The command line that runs dramatiq with ``dramatiq_args`` as a ``kind`` process (``matcher``, …)."""
    return [sys.executable, "-m", "exchange.dramatiq_master", kind, *dramatiq_args]


def main(args: Sequence[str]) -> int:
    """Run dramatiq's master over ``args`` (``KIND`` then dramatiq's own arguments); return its exit code."""
    if len(args) < 2:
        print(USAGE, file=sys.stderr)
        return 2
    kind, dramatiq_args = args[0], args[1:]
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"exchange {kind}: configuration error: {exc}", file=sys.stderr)
        return 2
    from exchange.observability.logs import configure_logging  # here: exchange.cli imports this module for argv

    # Not batched: the master forks its workers after this, and logs from its signal handler.
    configure_logging(kind, level=settings.log_level, fmt=settings.log_format, replace=True, batched=False)

    from dramatiq.cli import main as dramatiq_main
    from dramatiq.cli import make_argument_parser

    parsed = make_argument_parser().parse_args([*dramatiq_args, "--skip-logging"])  # type: ignore[no-untyped-call]
    # On SIGHUP dramatiq's master re-executes sys.argv (python -m dramatiq only when argv[0] is dramatiq's
    # __main__.py): this command line, so that the new master logs as this one does.
    sys.argv = argv(kind, dramatiq_args)
    code: int = dramatiq_main(parsed)  # type: ignore[no-untyped-call]
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
