"""The exchange's Redis namespace (:mod:`exchange.messaging.names`): derived from the database identity, checked when
configured, and, in the api, read on first need when the database did not answer at start."""

from __future__ import annotations

import asyncio

import pytest

from exchange.config import Settings, SettingsError
from exchange.messaging.broker import DoorbellRedisBroker, NamespaceUnknownError
from exchange.messaging.names import LazyNamespace, derive
from exchange.messaging.wakeups import partition_message

pytestmark = pytest.mark.anyio


def test_the_derived_namespace_depends_on_both_the_cluster_and_the_database_name() -> None:
    ours = derive(7716636910968096983, "exchange")
    assert ours == derive(7716636910968096983, "exchange")
    assert ours != derive(7716636910968096983, "exchange_staging")
    assert ours != derive(7716636910968096984, "exchange")
    assert ours.startswith("exchange-")
    assert len(ours) == len("exchange-") + 12


@pytest.mark.parametrize("bad", ["a:b", "a*", "-lead", "x" * 65, "with space"])
def test_a_configured_namespace_with_key_syntax_in_it_is_refused_naming_the_variable(bad: str) -> None:
    with pytest.raises(SettingsError, match="EXCHANGE_REDIS_NAMESPACE"):
        Settings.from_env({"EXCHANGE_REDIS_NAMESPACE": bad})


def test_a_configured_namespace_is_kept_and_an_unset_one_is_left_to_the_database() -> None:
    assert Settings.from_env({"EXCHANGE_REDIS_NAMESPACE": "staging.1"}).redis_namespace == "staging.1"
    assert Settings.from_env({}).redis_namespace is None


def test_a_broker_whose_namespace_is_not_known_refuses_to_enqueue_rather_than_guess() -> None:
    broker = DoorbellRedisBroker(url="redis://127.0.0.1:1/0", namespace=None)  # type: ignore[no-untyped-call]
    with pytest.raises(NamespaceUnknownError):
        broker.enqueue(partition_message(0, ["X"]))
    broker.namespace = "exchange-0123456789ab"
    assert broker.namespace == "exchange-0123456789ab"
    broker.close()


async def test_a_namespace_unreadable_at_start_is_read_on_first_need_once_and_names_the_broker() -> None:
    answers: list[str | Exception] = [OSError("database down"), "exchange-aaaaaaaaaaaa"]
    reads: list[int] = []
    named: list[str] = []

    async def read() -> str:
        reads.append(1)
        await asyncio.sleep(0)
        answer = answers[min(len(reads), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    names = LazyNamespace(None, read, named.append)
    with pytest.raises(OSError, match="database down"):
        await names.get()
    assert names.value is None
    assert named == []
    assert await asyncio.gather(names.get(), names.get(), names.get()) == ["exchange-aaaaaaaaaaaa"] * 3
    assert len(reads) == 2  # one failed read, then ONE read for the three concurrent callers
    assert named == ["exchange-aaaaaaaaaaaa"]
    assert await names.get() == "exchange-aaaaaaaaaaaa"
    assert len(reads) == 2


async def test_a_configured_namespace_is_never_read_from_the_database() -> None:
    async def read() -> str:
        raise AssertionError("read")

    named: list[str] = []
    names = LazyNamespace("staging", read, named.append)
    assert await names.get() == "staging"
    assert named == ["staging"]
