"""``uv run python -m ops.bench …`` (same as ``exchange bench …``)."""

from ops.bench.main import main

raise SystemExit(main())
