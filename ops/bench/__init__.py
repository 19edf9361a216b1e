"""``exchange bench``: an open-loop load generator modelled on B3 traffic (see :mod:`ops.bench.model`).

Modules: :mod:`~ops.bench.model` (traffic model, precomputed Poisson schedule), :mod:`~ops.bench.http`
(a minimal keep-alive HTTP/1.1 client), :mod:`~ops.bench.runner` (sender worker processes),
:mod:`~ops.bench.receiver` (webhook receiver), :mod:`~ops.bench.report` (statistics, JSON),
:mod:`~ops.bench.ceiling` (pgbench one-row-INSERT ceiling), :mod:`~ops.bench.main` (CLI and orchestration).
"""
