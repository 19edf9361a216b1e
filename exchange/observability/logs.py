"""Logging set-up: one line per event, JSON by default (``EXCHANGE_LOG_FORMAT=text`` for a terminal).

Every JSON line has ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, ``process`` (the process kind:
api, matcher, webhooks, sweeper, dev), ``pid`` and, when known, ``request_id``; keys passed with
``logger.info(..., extra={...})`` are added as fields, and ``exc`` holds a traceback. Invariant: a line is always
valid JSON, whatever the message or extra values contain (unserialisable values are rendered with ``repr``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

import msgspec

from exchange.observability.context import current_request_id

_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "taskName"}
)
_NOT_FIELDS = _STANDARD_ATTRS | {"color_message"}
"""Record attributes never written as fields: logging's own, and uvicorn's ``color_message`` extra (``msg`` again
with ANSI colour escapes, for uvicorn's terminal formatter)."""
_HANDLER_NAME = "exchange-log"
PROCESS_KIND = {"value": os.environ.get("EXCHANGE_PROCESS_KIND", "exchange")}
_encoder = msgspec.json.Encoder(enc_hook=repr)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line (see the module docstring for the fields).

    Written for the api's access line, one per request: the timestamp's date and time of day are formatted once
    per second, and the line is encoded by msgspec (about three times faster than ``json.dumps``: 9 → 3.4 µs for
    an access line, measured with ``timeit``); values and keys it cannot encode are rendered with ``repr``, NaN
    and infinities as ``null``, so every line is valid JSON."""

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (-1, "")
        """The last second formatted and its text, one tuple so that threads swap them together."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": self._timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "process": PROCESS_KIND["value"],
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", None) or current_request_id()
        if request_id:
            body["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _NOT_FIELDS and key not in body and not key.startswith("_"):
                body[key] = value
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        try:
            return _encoder.encode(body).decode()
        except UnicodeEncodeError:  # a lone surrogate (not UTF-8): escaped as \uXXXX, still one valid JSON line
            return json.dumps(body, default=repr)

    def _timestamp(self, record: logging.LogRecord) -> str:
        """UTC, ISO 8601 with milliseconds (truncated), in ``datetime.isoformat(timespec="milliseconds")``'s form."""
        second = int(record.created)
        cached_second, text = self._second
        if second != cached_second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        return f"{text}.{int(record.msecs):03d}+00:00"


class TextFormatter(logging.Formatter):
    """``time level [logger] message (request_id=…)`` for humans."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(name)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None) or current_request_id()
        return f"{line} request_id={request_id}" if request_id else line


class BatchingStreamHandler(logging.StreamHandler[TextIO]):
    """A :class:`logging.StreamHandler` that writes its lines in batches: every ``flush_interval_s`` at most, and at
    once for a record at WARNING or above (after the lines before it), when ``max_lines`` wait, on :meth:`flush`
    and at exit (``logging.shutdown``).

    Why: stderr is a pipe (``exchange dev``, a container runtime), and a line per ``write`` costs a system call and
    a wake-up of the reader for every request's access line: 5 % of the api's py-spy samples at ``--scale 75``. The
    price is that a process killed outright (SIGKILL) loses up to ``flush_interval_s`` of its INFO lines; errors
    and warnings are never held back. Like nginx's ``access_log … buffer= flush=``.

    Invariant: lines reach the stream whole and in the order they were logged. The flusher thread is started with
    the first held line, in each process (a forked child starts its own)."""

    def __init__(self, stream: TextIO, *, flush_interval_s: float = 0.2, max_lines: int = 512) -> None:
        super().__init__(stream)
        self.flush_interval_s = flush_interval_s
        self.max_lines = max_lines
        self._held: list[str] = []
        self._due = threading.Event()
        self._flusher: threading.Thread | None = None
        os.register_at_fork(after_in_child=self._forget_flusher)

    def _forget_flusher(self) -> None:
        self._flusher = None  # threads do not survive fork(); the child's first held line starts its own
        self._due = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        # Handler.handle holds self.lock around emit.
        try:
            self._held.append(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING or len(self._held) >= self.max_lines:
                self._write_held()
            elif not self._due.is_set():
                if self._flusher is None:
                    self._flusher = threading.Thread(target=self._flush_periodically, name="log-flusher", daemon=True)
                    self._flusher.start()
                self._due.set()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_held()
        finally:
            self.release()

    def _write_held(self) -> None:
        """Write the held lines in one call (the caller holds the handler's lock)."""
        if self._held:
            text = "".join(self._held)
            self._held.clear()
            self.stream.write(text)
        if hasattr(self.stream, "flush"):
            self.stream.flush()

    def _flush_periodically(self) -> None:
        due = self._due
        while True:
            due.wait()
            time.sleep(self.flush_interval_s)
            self.acquire()
            try:
                due.clear()
                self._write_held()
            except Exception:  # a closed or broken stream: nothing to log it to
                self._held.clear()
            finally:
                self.release()


class StderrHandler(logging.StreamHandler[TextIO]):
    """Writes each record at once, in one call, to whatever ``sys.stderr`` is when the record is emitted.

    For a process that logs a few lines and forks workers (dramatiq's master, :mod:`exchange.dramatiq_master`):
    nothing is held, so a fork never copies a line that both processes would then write, and no flusher thread
    or event is involved (the master logs from its signal handler, where waiting on a lock its own thread may
    hold would hang). A worker that swaps ``sys.stderr`` after the fork (dramatiq's for its logging pipe) has the
    lines of the handler it inherited follow the swap."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        # Handler.handle holds self.lock around emit.
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(
    kind: str, *, level: str = "info", fmt: str = "json", replace: bool = False, batched: bool = True
) -> None:
    """Send every log record of this process to stderr, one line each (written in batches: see
    :class:`BatchingStreamHandler`; with ``batched=False`` each at once: :class:`StderrHandler`).

    Called once at start-up by each process kind (api worker, matcher, webhooks, sweeper, dramatiq's master);
    idempotent: a second call swaps the handler it installed. ``replace=True`` also removes handlers others
    installed on the root logger (dramatiq's worker processes install a text one), so no line is printed twice.
    """
    PROCESS_KIND["value"] = kind
    # Fields no formatter here writes, each costing every record a lookup (the logging HOWTO's "Optimization"):
    # thread and multiprocessing names, and the caller's file, function and line (``_srcfile = None``: no stack
    # walk per record; ~5 of the access line's ~26 µs).
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler: logging.Handler = BatchingStreamHandler(sys.stderr) if batched else StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if replace or old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Third-party loggers that log every request or message at INFO would drown the exchange's own lines.
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
