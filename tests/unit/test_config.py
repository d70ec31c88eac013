from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config import (
    Settings,
    env_name,
    load_settings,
    nest,
    parse_accounts,
    renamed_variables,
    unknown_variables,
)
from gateway.errors import ConfigError

BASE = {"name": "acme", "provider": "serwersms", "base_url": "https://api2.serwersms.pl", "token": "t0ken"}


def test_accounts_from_a_toml_file_and_from_json_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "accounts.toml"
    path.write_text(
        '[[accounts]]\nname = "one"\nprovider = "mobizon"\nbase_url = "https://api.mobizon.kz"\n'
        'api_key = "env:ONE_KEY"\nrate_per_s = 5\n'
    )
    monkeypatch.setenv("ONE_KEY", "k-123")
    monkeypatch.setenv("GATEWAY_ACCOUNTS_FILE", str(path))
    monkeypatch.setenv("GATEWAY_ACCOUNTS", json.dumps([{**BASE, "name": "two"}]))
    accounts = load_settings().load_accounts()
    assert [a.name for a in accounts] == ["one", "two"]
    assert accounts[0].api_key is not None
    assert accounts[0].api_key.get_secret_value() == "k-123"
    assert accounts[0].rate_per_s == 5


def test_secret_from_a_mounted_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    (acc,) = parse_accounts([{**BASE, "token": f"file:{secret}"}])
    assert acc.token is not None
    assert acc.token.get_secret_value() == "from-file"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"provider": "twilio"}, "provider"),
        ({"base_url": "ftp://x"}, "base_url"),
        ({"rate_per_s": 0}, "rate_per_s"),
        ({"default_country": "XX"}, "default_country"),
        ({"token": None}, "token"),
        ({"token": "env:NOT_SET_ANYWHERE"}, "token"),
        ({"batch_size": 0}, "batch_size"),
        ({"name": "Bad Name"}, "name"),
        ({"colour": "red"}, "colour"),
        ({"name": "all"}, "name"),  # the opt-out routing key of every account
        ({"allowed_countries": ["PL", "XX"]}, "allowed_countries"),
        ({"transliterate": "ascii"}, "transliterate"),
        ({"max_parts": 0}, "max_parts"),
        ({"price_per_part": -1}, "price_per_part"),
        ({"optout_lanes": ["promo"]}, "optout_lanes"),
        ({"country_caps_per_hour": {"XX": 5}}, "country_caps_per_hour"),
        ({"app_budgets": {"crm|x": {"budget_parts_per_day": 5}}}, "app_budgets"),
        ({"budget_timezone": "Mars/Olympus"}, "budget_timezone"),
        ({"frequency_cap_per_day": 0}, "frequency_cap_per_day"),
    ],
)
def test_bad_account_names_the_field(override: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_accounts([{**BASE, **override}])
    assert field in str(info.value) or (field == "token" and "token" in str(info.value))
    assert "acme" in str(info.value) or override.get("name") in ("Bad Name", "all")


def test_guardrail_keys_read_as_written() -> None:
    (acc,) = parse_accounts(
        [{**BASE, "allowed_countries": ["pl", "CZ", "pl"], "transliterate": "full", "optout_lanes": ["bulk"]}]
    )
    assert acc.allowed_countries == ("CZ", "PL")
    assert acc.transliterate == "full"
    assert acc.optout_lanes == ("bulk",)
    (default,) = parse_accounts([BASE])
    assert default.optout_lanes == ("normal", "bulk")  # urgent codes reach people who opted out of campaigns
    assert default.allowed_countries is None


def test_duplicate_account_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="acme"):
        parse_accounts([BASE, BASE])


def test_routes_name_configured_accounts_and_known_regions() -> None:
    other = {**BASE, "name": "other"}
    (home, _) = parse_accounts([{**BASE, "failover_to": ["other"], "route_by_country": {"ua": "other"}}, other])
    assert home.routes_to == ("acme", "other")
    assert home.route_for("UA") == "other"
    assert home.route_for("PL") == "acme"
    with pytest.raises(ConfigError, match="not configured: ghost"):
        parse_accounts([{**BASE, "failover_to": ["ghost"]}])
    with pytest.raises(ConfigError, match="names the account itself"):
        parse_accounts([{**BASE, "failover_to": ["acme"]}])
    with pytest.raises(ConfigError, match="twice"):
        parse_accounts([{**BASE, "failover_to": ["other", "other"]}, other])
    with pytest.raises(ConfigError, match="route_by_country"):
        parse_accounts([{**BASE, "route_by_country": {"Poland": "other"}}, other])


def test_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_MAX_ATTEMPTS", "zero")
    with pytest.raises(ConfigError, match="GATEWAY_MAX_ATTEMPTS"):
        load_settings()


def test_secrets_are_masked_in_repr_and_redacted_dump() -> None:
    (acc,) = parse_accounts([BASE])
    assert "t0ken" not in repr(acc)
    assert "t0ken" not in json.dumps(acc.redacted())
    settings = Settings.model_validate({"redis_url": "redis://:hunter2@localhost:6379/0"})
    assert "hunter2" not in repr(settings)


def test_the_store_recovery_window_follows_the_retry_schedule_unless_set() -> None:
    assert Settings().recovery_s == 2 * (1800 + 60)  # the longest default delay and the default lease
    assert Settings(retry_schedule_s=[1, 5], claim_lease_s=10).recovery_s == 30
    assert Settings(store_recovery_s=0).recovery_s == 0  # set: taken as it is
    assert Settings(retry_schedule_s=[1, 5]).send.store_recovery_s == 130  # what the pipeline gets


def test_grouped_settings_read_from_double_underscore_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_DLR__WINDOW_S", "7200")
    monkeypatch.setenv("GATEWAY_HTTP__PORT", "9100")
    monkeypatch.setenv("GATEWAY_WEBHOOK__RATE_PER_S", "50")
    settings = load_settings()
    assert (settings.dlr.window_s, settings.http.port, settings.webhook.rate_per_s) == (7200, 9100, 50)
    assert settings.dlr.poll_after_s == 300  # the rest of the group keeps its defaults
    assert unknown_variables() == []
    assert renamed_variables() == []


def test_a_flat_name_is_still_read_and_named_for_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_DLR_POLL_AFTER_S", "30")
    monkeypatch.setenv("GATEWAY_HTTP_PORT", "9101")
    monkeypatch.setenv("GATEWAY_HTTP__PORT", "9102")  # both set: the grouped name wins
    settings = load_settings()
    assert settings.dlr.poll_after_s == 30
    assert settings.http.port == 9102
    assert unknown_variables() == []
    assert dict(renamed_variables()) == {
        "GATEWAY_DLR_POLL_AFTER_S": "read, but its name is now GATEWAY_DLR__POLL_AFTER_S",
        "GATEWAY_HTTP_PORT": "read, but its name is now GATEWAY_HTTP__PORT",
    }


def test_a_retired_setting_is_named_with_why_and_a_misspelling_as_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_MAX_TEXT_CHARS", "5000")
    monkeypatch.setenv("GATEWAY_DLR__WINDOWS", "1")
    assert unknown_variables() == ["GATEWAY_DLR__WINDOWS"]
    ((name, hint),) = renamed_variables()
    assert name == "GATEWAY_MAX_TEXT_CHARS"
    assert "contract" in hint


def test_a_bad_grouped_value_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_DLR__WINDOW_S", "soon")
    with pytest.raises(ConfigError, match=r"^GATEWAY_DLR__WINDOW_S: "):
        load_settings()
    monkeypatch.delenv("GATEWAY_DLR__WINDOW_S")
    monkeypatch.setenv("GATEWAY_RETRY_SCHEDULE_S", "[1, -5]")
    with pytest.raises(ConfigError, match=r"^GATEWAY_RETRY_SCHEDULE_S: "):
        load_settings()


def test_flat_keyword_names_fold_into_their_group() -> None:
    assert nest({"dlr_window_s": 5, "http_port": 0, "max_attempts": 2}) == {
        "dlr": {"window_s": 5},
        "http": {"port": 0},
        "max_attempts": 2,
    }
    assert env_name("dlr_window_s") == env_name("dlr.window_s") == "GATEWAY_DLR__WINDOW_S"
    assert env_name("amqp_url") == "GATEWAY_AMQP_URL"
