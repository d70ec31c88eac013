from __future__ import annotations

import json

import pytest

from gateway.cli import main


def test_config_prints_effective_settings_with_secrets_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_AMQP_URL", "amqp://app:s3cret-amqp@rabbit:5672/")
    monkeypatch.setenv("GATEWAY_REDIS_URL", "redis://:s3cret-redis@redis:6379/0")
    monkeypatch.setenv(
        "GATEWAY_ACCOUNTS",
        json.dumps([{"name": "acme", "provider": "serwersms", "base_url": "https://x.test", "token": "s3cret-tok"}]),
    )
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    doc = json.loads(out)
    assert doc["amqp_url"] == "amqp://app:****@rabbit:5672/"
    assert doc["accounts"][0]["name"] == "acme"
    assert doc["accounts"][0]["token"] == "**********"
    assert doc["max_attempts"] == 7


def test_bad_configuration_exits_2_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_ACCOUNTS", json.dumps([{"name": "acme", "provider": "serwersms"}]))
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert "account acme" in err
    assert "base_url" in err


def test_no_accounts_without_sandbox_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GATEWAY_ACCOUNTS", raising=False)
    monkeypatch.delenv("GATEWAY_ACCOUNTS_FILE", raising=False)
    assert main(["config"]) == 2
    assert "--sandbox" in capsys.readouterr().err
    assert main(["config", "--sandbox"]) == 0
    assert json.loads(capsys.readouterr().out)["accounts"][0]["name"] == "demo"
