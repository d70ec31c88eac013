"""The store backends translate their libraries' failures at the boundary: what retrying cannot
mend is `StoreRefused`, what may pass is `StoreUnavailable`, by type, never by message text.
Real Redis on 127.0.0.1 (no password set)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigError, GatewayError, StoreError, StoreRefused, StoreUnavailable
from gateway.state.redis import RedisStore
from gateway.state.sqlite import SqliteStore
from testkit import free_port


def test_the_hierarchy_sorts_store_and_config_errors_apart() -> None:
    assert issubclass(StoreRefused, StoreError)
    assert issubclass(StoreUnavailable, StoreError)
    assert issubclass(StoreError, GatewayError)
    assert issubclass(ConfigError, GatewayError)
    assert not issubclass(StoreRefused, ConfigError)  # the app says which setting it was


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis//127.0.0.1:6379/0", "scheme"),
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
        ("redis+sentinel://127.0.0.1:26379", "names the service"),
    ],
)
def test_a_url_the_client_cannot_read_is_refused_before_any_io(url: str, says: str) -> None:
    with pytest.raises(StoreRefused, match=says):
        RedisStore(url)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://127.0.0.1:6379/0?no_such_option=1", "no_such_option"),  # found at the first connect
        ("redis://:not-the-password@127.0.0.1:6379/0", "refused the login"),
    ],
)
async def test_what_retrying_cannot_mend_is_refused(url: str, says: str) -> None:
    store = RedisStore(url, timeout_s=2)
    try:
        with pytest.raises(StoreRefused, match=says):
            await store.ping()
    finally:
        await store.close()


async def test_a_store_that_does_not_answer_is_unavailable() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=1)
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        await store.close()
    answering = RedisStore("redis://127.0.0.1:6379/0", timeout_s=2)
    try:
        await answering.ping()  # the same client against a live server: no error at all
    finally:
        await answering.close()


async def test_a_state_file_that_cannot_be_opened_is_refused(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)  # a directory, not a database file
    try:
        with pytest.raises(StoreRefused, match=str(tmp_path)):
            await store.ping()
    finally:
        await store.close()
