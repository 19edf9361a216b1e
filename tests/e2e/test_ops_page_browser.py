"""The /ops page in a real headless Chromium: it logs in through /ops/login (cookie), renders every section with
live data, and leaves a screenshot in ``test-artifacts/ops-page.png`` for humans to look at.

Chromium missing: skipped locally, failed in CI (``CI=true``; ``ops/scripts/install-system-deps.sh`` installs it).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from litestar.testing import TestClient
from sqlalchemy import Engine, text

from exchange.api.app import create_app
from exchange.config import Settings
from ops.bench.main import free_port
from tests.conftest import skip_or_fail
from tests.integration.api_helpers import ADMIN_KEY, match, new_symbol, register

pytest_plugins = ["tests.integration.api_fixtures"]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SCREENSHOT = ARTIFACTS / "ops-page.png"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        skip_or_fail("chromium is not installed (ops/scripts/install-system-deps.sh installs it)")
    return found


@pytest.fixture
def served_api(api_settings_factory: Callable[..., Settings]) -> Iterator[str]:
    """The api on a real port (uvicorn in a thread): a browser cannot talk to a TestClient."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(api_settings_factory()), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(10)


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        argv = [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def seed(client: TestClient[Any], engine: Engine) -> tuple[str, str]:
    """A symbol with a trade and resting orders, and a disabled webhook endpoint with an error."""
    seller, buyer = register(client), register(client, name=f"hooked-{uuid.uuid4().hex[:6]}")
    symbol = new_symbol()
    for broker, side, price, qty in ((seller, "ask", 3850, 100), (seller, "ask", 3900, 50), (buyer, "bid", 3850, 40)):
        body = {"document_number": "1", "side": side, "symbol": symbol, "price": price, "quantity": qty}
        assert client.post("/orders", json=body, headers=broker.headers).status_code == 201
    match(engine, symbol)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE brokers SET webhook_url = 'https://broker.example/hook', webhook_enabled = false,"
                " webhook_disabled_reason = '5 consecutive failures', webhook_consecutive_failures = 5"
                " WHERE id = :id"
            ),
            {"id": buyer.id},
        )
        conn.execute(  # an event whose last attempt failed: the attempt is what "Recent errors" lists
            text(
                "WITH e AS (INSERT INTO webhook_events (broker_id, sequence, type, payload, attempts, last_error,"
                " status) VALUES (:b, 9999, 'order.fill', '{}', 7, 'HTTP 503 from receiver', 'failed') RETURNING id)"
                " INSERT INTO webhook_attempts (event_id, broker_id, url, status_code, error)"
                " SELECT id, :b, 'https://broker.example/hook', 503, 'HTTP 503 from receiver' FROM e"
            ),
            {"b": buyer.id},
        )
    return symbol, buyer.name


def test_ops_page_renders_live_data_in_headless_chromium_and_saves_a_screenshot(
    served_api: str, api_engine: Engine
) -> None:
    chromium_binary()
    with httpx.Client(base_url=served_api, timeout=10) as http:
        client: Any = http  # the helpers only use .get/.post, which httpx.Client has like a TestClient
        symbol, hooked = seed(client, api_engine)
    url = f"{served_api}/ops/login?key={ADMIN_KEY}&next=/ops"
    dom = chromium("--dump-dom", "--virtual-time-budget=2000", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for heading in ("Matching partitions", "Queues", "Books", "Webhook endpoints failing or disabled", "Recent errors"):
        assert heading in html, html[:2000]
    assert symbol in html
    assert hooked in html
    assert "DISABLED" in html
    assert "HTTP 503 from receiver" in html
    ARTIFACTS.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    shot = chromium(f"--screenshot={SCREENSHOT}", "--window-size=1280,900", "--virtual-time-budget=2000", url)
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert SCREENSHOT.stat().st_size > 10_000  # a rendered page, not a blank image
