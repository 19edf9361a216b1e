"""gunicorn settings for the exchange api: Litestar on uvicorn workers (``exchange.api.server.ApiWorker``:
``uvicorn_worker.UvicornWorker`` whose protocol writes each response to the socket once).

``exchange api`` passes --bind/--workers on the command line when given; without them, and for everything else, the
defaults here hold, overridden by the usual GUNICORN_CMD_ARGS or the EXCHANGE_API_* variables (``exchange api`` sets
those of ``.env`` in gunicorn's environment). Workers are stateless: any of them can be
killed at any moment (an accepted order is already committed in Postgres before the 201 is sent).
"""

import os

from exchange.config import Settings

wsgi_app = "exchange.api.app:create_app()"
worker_class = "exchange.api.server.ApiWorker"
bind = os.environ.get("EXCHANGE_API_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("EXCHANGE_API_WORKERS", "2"))
# gunicorn 27 shares one control-socket path between instances on a machine; the exchange does not use it.
control_socket_disable = True
# Keep-alive matters for brokers' clients and the load generator (connection reuse).
keepalive = 30
graceful_timeout = 10
timeout = 30
accesslog = None
errorlog = "-"
# The log level and format as the workers read them (Settings: the environment over ``.env``, values compared
# case-insensitively), so gunicorn's and uvicorn's lines come out in the format of the exchange's own.
_settings = Settings.from_env()
loglevel = _settings.log_level
if _settings.log_format == "json":
    # gunicorn's own lines (its master's, and its workers' start and stop) in the exchange's format, one JSON object
    # per line, so that a log shipper reading the api's stderr meets no other kind. gunicorn updates its default
    # configuration with this one, key by key.
    os.environ.setdefault("EXCHANGE_PROCESS_KIND", "api")  # the master's lines' "process", as its workers'
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "exchange.observability.logs.JsonFormatter"}},
        "handlers": {
            "error_console": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
        },
        "root": {"level": "INFO", "handlers": []},  # gunicorn's default gives the root a text handler on stdout
        "loggers": {
            "gunicorn.error": {"level": loglevel.upper(), "handlers": ["error_console"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": False},  # off: accesslog = None
        },
    }

# Prometheus multiprocess mode: every worker writes its metrics to files in PROMETHEUS_MULTIPROC_DIR and /metrics
# (any worker) aggregates them. The directory must be set before a worker imports prometheus_client, and must not
# hold files of an earlier run: a given directory is emptied at start; without one, a fresh one is made and removed
# when the master process exits, however it exits (stopped, or unable to bind its port: gunicorn calls no on_exit
# hook then, and `exchange dev` restarts a dying api again and again). Only a master killed outright leaves it behind.
# The pid check: forked workers inherit the exit handlers (gunicorn's workers do not run them today; one that did must
# not remove its master's directory).
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    import atexit
    import shutil
    import tempfile

    _metrics_dir = tempfile.mkdtemp(prefix="exchange-metrics-")
    _master_pid = os.getpid()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir

    def _remove_metrics_dir():
        if os.getpid() == _master_pid:
            shutil.rmtree(_metrics_dir, ignore_errors=True)

    atexit.register(_remove_metrics_dir)


def on_starting(server):  # gunicorn hook signatures: (server) and (server, worker)
    import glob

    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    for stale in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(stale)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):
    # The app is loaded: freeze what start-up made (a full collection of it stalls the event loop ~50 ms), and time
    # every collection from now on (exchange_gc_pause_seconds).
    from exchange.heap import settle
    from exchange.observability.metrics import observe_gc_pause

    settle(observe_gc_pause)
