"""Settings: `GATEWAY_*` environment variables plus accounts from a file or one JSON variable.

Only `app.py` and `cli.py` build `Settings()`; everything else receives the pieces it needs.
Credentials are `SecretStr`; in an accounts file they may be written literally, or as
`env:NAME` (read from an environment variable) or `file:/path` (a mounted Kubernetes secret).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import SplitResult, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from gateway.errors import ConfigError
from gateway.segments import Transliterate

ProviderName = Literal["serwersms", "mobizon"]
AccountName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]

SANDBOX_ACCOUNT = "demo"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ACCOUNT_FILE_KINDS = (".json", ".toml")
AMQP_SCHEMES = ("amqp", "amqps")
REDIS_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)


def _resolve_secret(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return os.environ[name]
    if isinstance(value, str) and value.startswith("file:"):
        path = Path(value[5:])
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
    return value


_APP_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True, slots=True)
class QuietHours:
    """A daily window in the recipient's local time, `start` to `end` minutes past midnight; it
    wraps midnight when `start > end` (21:00-08:00)."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> QuietHours:
        found = _WINDOW.match(text.strip())
        if found is None:
            raise ValueError(f"{text!r} is not a window such as 21:00-08:00")
        h1, m1, h2, m2 = (int(g) for g in found.groups())
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end:
            raise ValueError(f"{text!r} is empty: start and end are the same")
        return cls(start, end)

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"

    def seconds_left(self, local: datetime) -> float:
        """Seconds until the window ends at the wall-clock time `local`; 0 when outside it."""
        minute = local.hour * 60 + local.minute
        inside = self.start <= minute < self.end if self.start < self.end else minute >= self.start or minute < self.end
        if not inside:
            return 0.0
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        end = midnight + timedelta(minutes=self.end)
        if end <= local:
            end += timedelta(days=1)
        # The end is a wall-clock time in the zone; the difference is taken in UTC, so a DST change
        # inside the window counts (same-zone subtraction would compare wall clocks).
        return max(0.0, (end.astimezone(UTC) - local.astimezone(UTC)).total_seconds())


class AppBudget(BaseModel):
    """One producing application's budget within an account (`app_budgets`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget_parts_per_day: int | None = Field(default=None, ge=0)
    budget_parts_per_month: int | None = Field(default=None, ge=0)


V = TypeVar("V")


def _by_region(value: dict[str, V]) -> dict[str, V]:
    """A map keyed by ISO 3166 alpha-2 region (or `*`), keys upper-cased; unknown regions refused."""
    out = {k.upper(): v for k, v in value.items()}
    unknown = [k for k in out if k != "*" and k not in phonenumbers.SUPPORTED_REGIONS]
    if unknown:
        raise ValueError(f"not ISO 3166 alpha-2 regions the number parser knows (or *): {', '.join(unknown)}")
    return out


class Account(BaseModel):
    """One provider login: its provider, credentials, default sender and limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: AccountName = Field(description="routing key and queue suffix: `[a-z0-9][a-z0-9_-]*`, at most 63")
    provider: ProviderName = Field(description="`serwersms` or `mobizon`")
    base_url: str = Field(description="provider API root, e.g. https://api2.serwersms.pl")
    username: str | None = Field(default=None, description="SerwerSMS API user (with password)")
    password: SecretStr | None = Field(default=None, description="SerwerSMS API password (with username)")
    token: SecretStr | None = Field(default=None, description="SerwerSMS API token (Bearer)")
    api_key: SecretStr | None = Field(default=None, description="Mobizon apiKey")
    webhook_secret: SecretStr | None = Field(
        default=None, description="Mobizon webhook secret key: delivery-report webhooks must carry its `sign`"
    )
    sender: str | None = Field(default=None, description="default sender name")
    default_country: str = Field(default="PL", description="region for national numbers (ISO 3166)")
    rate_per_s: float = Field(default=50.0, gt=0, description="messages per second, all replicas")
    burst: int = Field(default=50, ge=1, description="messages that may go at once above the rate")
    batch_size: int = Field(default=100, ge=1, le=10000, description="messages per provider call")
    linger_ms: int = Field(
        default=100, ge=0, le=60000, description="the longest a batch waits to fill (while every send slot is busy)"
    )
    quiet_ms: int = Field(
        default=5,
        ge=0,
        le=60000,
        description="with a send slot free, a batch goes once nothing joined it for this long (low latency when idle)",
    )
    concurrency: int = Field(
        default=4, ge=1, le=256, description="provider calls in flight at start; grows under a backlog (adaptive)"
    )
    max_concurrency: int = Field(
        default=16,
        ge=1,
        le=256,
        description="the most provider calls in flight the adaptive limit may reach (always within rate_per_s)",
    )
    dedupe_window_s: int = Field(default=86400, ge=60, description="how long a unique_id is remembered")
    http_timeout_s: float = Field(default=10.0, gt=0, le=300, description="one provider call, end to end")
    urgent_validity_s: float = Field(
        default=600.0,
        gt=0,
        description="an urgent request without expires_at ends `expired` this long after it was published",
    )
    quiet_hours: str | None = Field(
        default=None,
        description="bulk requests wait while the recipient's local time is in this window, e.g. 21:00-08:00 (off)",
    )
    lane_min_share: float = Field(
        default=0.1,
        ge=0,
        le=0.5,
        description="while a higher lane waits for the rate, each lower lane still gets this share of it (at most 0.5)",
    )
    max_parts: int | None = Field(
        default=None, ge=1, le=255, description="longer texts end `invalid` / `too_many_parts` before any send (off)"
    )
    transliterate: Transliterate = Field(
        default=Transliterate.OFF,
        description="`lookalikes`: typographic quotes, dashes, odd spaces to GSM-7; `full`: Latin diacritics too "
        "(only when the whole text then fits GSM-7)",
    )
    price_per_part: float | None = Field(
        default=None, ge=0, description="what one SMS part costs: outcomes carry `cost`, a metric sums it"
    )
    allowed_countries: tuple[str, ...] | None = Field(
        default=None,
        description="ISO 3166 alpha-2 codes the account may send to; others end `rejected` / `country_blocked` "
        "(absent: all)",
    )
    budget_parts_per_day: int | None = Field(
        default=None,
        ge=0,
        description="SMS parts the account may send a day (budget_timezone); past it `quota_exceeded`",
    )
    budget_parts_per_month: int | None = Field(default=None, ge=0, description="the same, a calendar month")
    app_budgets: dict[str, AppBudget] = Field(
        default_factory=dict,
        description="per producing application (the AMQP `app_id`): its own budget_parts_per_day / _per_month",
    )
    budget_timezone: str = Field(default="UTC", description="the zone whose midnight starts a budget's day and month")
    country_caps_per_hour: dict[str, int] = Field(
        default_factory=dict,
        description="fraud guard: messages an hour to one country (ISO 3166 alpha-2, or `*` for any other), every "
        "lane; past it `velocity_blocked`",
    )
    frequency_cap_per_day: int | None = Field(
        default=None,
        ge=1,
        description="messages a day to one recipient on the normal and bulk lanes; past it `frequency_capped`",
    )
    budget_lanes: tuple[Literal["urgent", "normal", "bulk"], ...] = Field(
        default=("normal", "bulk"),
        description="the lanes a spent budget refuses; the others (urgent, by default) are counted, never refused",
    )
    optout_lanes: tuple[Literal["urgent", "normal", "bulk"], ...] = Field(
        default=("normal", "bulk"),
        description="the lanes whose requests to an opted-out number end `rejected` / `opted_out` "
        "(urgent one-time codes go through by default)",
    )
    failover_to: tuple[AccountName, ...] = Field(
        default=(),
        description="other configured accounts, in order, that send this account's requests while its route is "
        "paused, open or drained (only requests the first provably did not accept move)",
    )
    route_by_country: dict[str, AccountName] = Field(
        default_factory=dict,
        description="recipient country (ISO 3166 alpha-2, or `*` for any other) -> the configured account that "
        "sends it; the failover list follows",
    )

    @field_validator("password", "token", "api_key", "webhook_secret", mode="before")
    @classmethod
    def _secret_refs(cls, value: Any) -> Any:
        return _resolve_secret(value)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("quiet_hours")
    @classmethod
    def _quiet_hours(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return str(QuietHours.parse(value))

    @property
    def quiet_window(self) -> QuietHours | None:
        return QuietHours.parse(self.quiet_hours) if self.quiet_hours else None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value == "all":
            raise ValueError('"all" is the routing key of opt-outs for every account (sms.optout): choose another name')
        return value

    @field_validator("budget_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. Europe/Warsaw)") from None
        return value

    @field_validator("app_budgets")
    @classmethod
    def _apps(cls, value: dict[str, AppBudget]) -> dict[str, AppBudget]:
        bad = [k for k in value if not _APP_NAME.match(k)]
        if bad:
            raise ValueError(f"application names (app_id) must be 1-64 of A-Z a-z 0-9 . _ -: {bad[:3]}")
        return value

    @field_validator("country_caps_per_hour")
    @classmethod
    def _caps(cls, value: dict[str, int]) -> dict[str, int]:
        caps = _by_region(value)
        if any(v < 0 for v in caps.values()):
            raise ValueError("a cap is a number of messages, 0 or more")
        return caps

    @field_validator("route_by_country")
    @classmethod
    def _routes(cls, value: dict[str, str]) -> dict[str, str]:
        return _by_region(value)

    def route_for(self, country: str | None) -> str:
        """The account that sends to `country` first: its route, the `*` route, else this account."""
        routes = self.route_by_country
        return routes.get(country or "", routes.get("*", self.name))

    @property
    def routes_to(self) -> tuple[str, ...]:
        """Every account that may send this account's requests, this one first."""
        return tuple(dict.fromkeys((self.name, *self.route_by_country.values(), *self.failover_to)))

    @property
    def has_limits(self) -> bool:
        """Counted limits (core/budgets.py): budgets, country caps or a recipient cap."""
        return self.has_budget or bool(self.country_caps_per_hour) or self.frequency_cap_per_day is not None

    @property
    def has_budget(self) -> bool:
        return (
            self.budget_parts_per_day is not None
            or self.budget_parts_per_month is not None
            or any(
                b.budget_parts_per_day is not None or b.budget_parts_per_month is not None
                for b in self.app_budgets.values()
            )
        )

    @field_validator("allowed_countries")
    @classmethod
    def _countries(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        codes = tuple(sorted({v.upper() for v in value}))
        unknown = [c for c in codes if c not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"not ISO 3166 alpha-2 regions the number parser knows: {', '.join(unknown)}")
        return codes

    @field_validator("default_country")
    @classmethod
    def _country(cls, value: str) -> str:
        value = value.upper()
        if value not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{value!r} is not a region the number parser knows")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> Account:
        if self.provider == "serwersms":
            has_login = self.username is not None and self.password is not None
            if not (has_login or self.token is not None):
                raise ValueError("serwersms needs token, or username and password")
        elif self.api_key is None:
            raise ValueError("mobizon needs api_key")
        return self

    def redacted(self) -> dict[str, Any]:
        doc = self.model_dump(mode="json")
        for key in ("password", "token", "api_key", "webhook_secret"):
            if doc.get(key) is not None:
                doc[key] = "**********"
        return doc


class DlrOptions(BaseModel):
    """Delivery reports (`GATEWAY_DLR__*`): what the desk, the pollers, the tracking rebuild and the
    pipeline's tracking use."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        default=True, description="track accepted messages for delivery reports (correlation, webhooks, polling)"
    )
    poll_after_s: float = Field(
        default=300.0, gt=0, description="first status poll this long after acceptance; the gap then doubles"
    )
    poll_max_gap_s: float = Field(default=3600.0, gt=0, description="the longest gap between two polls")
    window_s: float = Field(
        default=4 * 86400.0,
        gt=0,
        description="how long an accepted message is tracked; without a final status by then it ends undelivered",
    )

    @property
    def track_ttl_s(self) -> float:
        """How long an accepted message's correlation is kept: the window, plus a day for its last poll."""
        return self.window_s + 86400.0


class HttpOptions(BaseModel):
    """The web port (`GATEWAY_HTTP__*`): probes, metrics and provider webhooks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(default="127.0.0.1", description="bind address of /healthz, /readyz, /metrics and webhooks")
    port: int = Field(default=8080, ge=0, le=65535, description="0 disables the HTTP endpoints")
    max_connections: int = Field(
        default=512,
        ge=8,
        description="open connections the HTTP port holds at most (and at most a quarter of the process's file "
        "limit); more are closed at once",
    )
    header_timeout_s: float = Field(
        default=5.0, gt=0, description="a connection that has not sent a whole request head by then is closed"
    )
    idle_timeout_s: float = Field(
        default=15.0, gt=0, description="a keep-alive connection idle this long between requests is closed"
    )


class WebhookOptions(BaseModel):
    """Provider webhooks on the web port (`GATEWAY_WEBHOOK__*`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    concurrency: int = Field(
        default=64, ge=1, description="webhooks handled at once; more are answered 503 before their body is read"
    )
    rate_per_s: float = Field(
        default=200.0,
        gt=0,
        description="webhooks taken a second by this replica (Mobizon sends one per SMS, and sends campaigns at "
        "100 a second at most); more wait up to a second, then are answered 503 before their body is read, and "
        "Mobizon retries them",
    )


class FailoverOptions(BaseModel):
    """Routes' circuits and delivery health (`GATEWAY_FAILOVER__*`): when a sending account is taken
    out of its routes and when it comes back (core/routes.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    failures: int = Field(
        default=5, ge=1, description="consecutive provider calls failing in transport, 5xx or timeout open the circuit"
    )
    error_rate: float = Field(
        default=0.5, gt=0, le=1, description="share of calls with a retryable failure in the window that opens it"
    )
    window_s: float = Field(default=30.0, gt=0, description="the window the error rate is counted over")
    min_calls: int = Field(default=20, ge=1, description="calls in the window before the error rate counts")
    open_s: float = Field(
        default=15.0, gt=0, description="an open circuit lets one probe call through (half-open) after this long"
    )
    undelivered_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="share of `undelivered` reports of one sending account and country in the health window that "
        "drains the route for that country",
    )
    undelivered_min: int = Field(default=20, ge=1, description="final reports in the window before the share counts")
    health_window_s: float = Field(default=900.0, gt=0, description="the window delivery health is counted over")
    drain_s: float = Field(default=900.0, gt=0, description="how long a drained country stays off its route")


GROUPS: dict[str, type[BaseModel]] = {
    "dlr": DlrOptions,
    "http": HttpOptions,
    "webhook": WebhookOptions,
    "failover": FailoverOptions,
}
"""Settings read as `GATEWAY_<GROUP>__<NAME>`."""

FLAT_NAMES: dict[str, tuple[str, str]] = {
    f"{group}_{name}": (group, name) for group, model in GROUPS.items() for name in model.model_fields
}
"""The flat spelling of each grouped setting (`dlr_window_s`), still read from `GATEWAY_DLR_WINDOW_S`
with a warning."""

RETIRED: dict[str, str] = {
    "GATEWAY_MAX_BODY_BYTES": "a request's largest size is part of the contract, the same on every deployment",
    "GATEWAY_MAX_TEXT_CHARS": "a text's longest length is part of the contract, the same on every deployment",
}
"""Variables that once were settings and are read no more, with why."""


def env_name(key: str) -> str:
    """The variable that sets `key`: `amqp_url`, a grouped one as `dlr.window_s`, or its flat
    spelling `dlr_window_s`."""
    if key in FLAT_NAMES:
        key = ".".join(FLAT_NAMES[key])
    group, dot, name = key.partition(".")
    if dot:
        return f"GATEWAY_{group.upper()}__{name.upper()}"
    return f"GATEWAY_{key.upper()}"


def nest(settings: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `Settings`, with flat names of grouped settings (`dlr_window_s=...`)
    folded into their group."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key in FLAT_NAMES:
            group, name = FLAT_NAMES[key]
            out.setdefault(group, {})[name] = value
        else:
            out[key] = value
    return out


class _FlatVariables(PydanticBaseSettingsSource):
    """Grouped settings given by their flat variable (`GATEWAY_DLR_WINDOW_S`); the grouped
    variable (`GATEWAY_DLR__WINDOW_S`) wins when both are set."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for variable, value in os.environ.items():
            hit = FLAT_NAMES.get(variable.upper().removeprefix("GATEWAY_").lower())
            if hit is not None and variable.upper().startswith("GATEWAY_"):
                out.setdefault(hit[0], {})[hit[1]] = value
        return out


@dataclass(frozen=True, slots=True)
class SendOptions:
    """What the pipeline of one account uses."""

    claim_lease_s: float
    wait_grace_s: float
    store_recovery_s: float
    retry_schedule_s: tuple[float, ...]
    max_attempts: int
    dlr: DlrOptions


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """What a queue's worker uses."""

    account_pause_s: float
    poison_deliveries: int
    publish_timeout_s: float
    dlr_enabled: bool


class Settings(BaseSettings):
    """Process-wide settings, from `GATEWAY_*` variables (or files in `secrets_dir`); grouped ones
    as `GATEWAY_<GROUP>__<NAME>` (`GATEWAY_DLR__WINDOW_S`)."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", env_nested_delimiter="__", extra="ignore", secrets_dir=None
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FlatVariables(settings_cls), dotenv_settings, file_secret_settings

    amqp_url: SecretStr = Field(default=SecretStr("amqp://guest:guest@127.0.0.1:5672/"), description="RabbitMQ URL")
    amqp_heartbeat_s: int = Field(
        default=10,
        ge=0,
        le=600,
        description="AMQP heartbeat proposed to the broker (a `heartbeat` in the URL wins; 0 turns it off). A "
        "broker that vanished without a word is given up after three missed (about 3 x (h + 1) s)",
    )
    redis_url: SecretStr | None = Field(
        default=None, description="Redis URL; unset means the embedded SQLite store (one node only)"
    )
    redis_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="one Redis command or connect; past it the call fails and the batch waits as delayed "
        "copies, so a Redis host that vanished without a reset cannot hold the store's calls",
    )
    state_path: Path = Field(default=Path("gateway-state.sqlite3"), description="SQLite state file")
    management_url: SecretStr | None = Field(
        default=None,
        description="RabbitMQ management API, for `gateway topology check` and `gateway accounts`; "
        "unset: http(s)://<the AMQP host>:15672 (15671 with amqps) with the AMQP credentials",
    )
    accounts_file: Path | None = Field(default=None, description="accounts as JSON or TOML")
    accounts: str | None = Field(default=None, description="accounts as one JSON list (containers)")
    retry_schedule_s: Annotated[list[float], NoDecode] = Field(
        default=[1, 5, 30, 120, 600, 1800],
        description="delay before retry 1, 2, ...; the last repeats (a JSON list, or comma-separated: 1,5,30)",
    )
    max_attempts: int = Field(default=7, ge=1, description="provider attempts before `failed`")
    wait_grace_s: float = Field(
        default=60.0,
        ge=0,
        description="a copy waits for another worker's claim on its id for the claim lease plus this long (the "
        "store's recovery window: a failover, a slow provider call) before it fails as `waits_exhausted`",
    )
    store_recovery_s: float | None = Field(
        default=None,
        ge=0,
        description="after the state store comes back empty, new claims are reconciled with the provider for this "
        "long; unset: twice the longest retry delay plus the claim lease",
    )
    poison_deliveries: int = Field(
        default=5, ge=2, description="deliveries that crashed the handler before a `poison` dead letter"
    )
    claim_lease_s: float = Field(
        default=60.0, gt=0, description="a send claim older than this is presumed dead and reconciled"
    )
    account_pause_s: float = Field(default=60.0, gt=0, description="pause after an account-level error")
    fair_admission: bool = Field(
        default=True,
        description="while the event loop is saturated, limit the batches in flight across the process and "
        "share them fairly by account, in messages (an account behind the busiest one, or an urgent lane with "
        "nothing in flight, never waits); off: each lane is bounded only by its own in-flight limit",
    )
    drain_timeout_s: float = Field(default=20.0, gt=0, description="SIGTERM: time to finish in-flight work")
    publish_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="one confirmed publish (outcome, dead letter, retry copy), ack or nack; past it the "
        "request is requeued and the publishing channel replaced (or the consumer's channel closed)",
    )
    http: HttpOptions = HttpOptions()
    webhook: WebhookOptions = WebhookOptions()
    log_format: Literal["json", "console", "auto"] = Field(
        default="auto", description="`json`, `console`, or `auto` (console on a terminal, JSON otherwise)"
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    sandbox_port: int = Field(default=8580, ge=1, le=65535, description="port of `run --sandbox`")
    provider_proxy_from_env: bool = Field(
        default=False, description="reach the providers through HTTPS_PROXY / HTTP_PROXY, honouring NO_PROXY"
    )
    dlr: DlrOptions = DlrOptions()
    failover: FailoverOptions = FailoverOptions()

    @property
    def recovery_s(self) -> float:
        """`store_recovery_s`, or what it must cover, twice over: a copy parked for the longest retry
        delay, plus the claim lease its attempt held (twice: such a copy may be parked once more by
        a wait before it is consumed)."""
        if self.store_recovery_s is not None:
            return self.store_recovery_s
        return 2 * (max(self.retry_schedule_s, default=0.0) + self.claim_lease_s)

    @property
    def send(self) -> SendOptions:
        return SendOptions(
            claim_lease_s=self.claim_lease_s,
            wait_grace_s=self.wait_grace_s,
            store_recovery_s=self.recovery_s,
            retry_schedule_s=tuple(self.retry_schedule_s),
            max_attempts=self.max_attempts,
            dlr=self.dlr,
        )

    @property
    def worker(self) -> WorkerOptions:
        return WorkerOptions(
            account_pause_s=self.account_pause_s,
            poison_deliveries=self.poison_deliveries,
            publish_timeout_s=self.publish_timeout_s,
            dlr_enabled=self.dlr.enabled,
        )

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        _check_url(value.get_secret_value(), AMQP_SCHEMES, "amqp://user:password@host:5672/vhost")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        url = _check_url(value.get_secret_value(), REDIS_SCHEMES, "redis://[:password@]host:6379/0")
        if url.scheme.endswith("+sentinel") and not url.path.strip("/"):
            raise ValueError("a Sentinel URL names the service after the hosts: redis+sentinel://host:26379/<service>")
        return value

    @field_validator("management_url")
    @classmethod
    def _management_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _check_url(value.get_secret_value(), ("http", "https"), "http://user:password@host:15672")
        return value

    @field_validator("retry_schedule_s", mode="before")
    @classmethod
    def _schedule_text(cls, value: Any) -> Any:
        """From the environment: a JSON list (`[1, 5, 30]`) or comma-separated seconds (`1,5,30`)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    raise ValueError("not a JSON list of seconds") from None
            return [part.strip() for part in text.split(",")]
        return value

    @field_validator("retry_schedule_s")
    @classmethod
    def _schedule(cls, value: list[float]) -> list[float]:
        if not value or any(v <= 0 for v in value):
            raise ValueError("must be a non-empty list of positive seconds")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    def load_accounts(self) -> list[Account]:
        raw: list[Any] = []
        if self.accounts_file is not None:
            raw.extend(_read_accounts_file(self.accounts_file))
        if self.accounts:
            try:
                doc = json.loads(self.accounts)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"GATEWAY_ACCOUNTS is not JSON: {exc}") from None
            raw.extend(_account_list(doc, "GATEWAY_ACCOUNTS"))
        return parse_accounts(raw)


def _check_url(text: str, schemes: tuple[str, ...], example: str) -> SplitResult:
    """The URL's parts, or a ValueError that says what is wrong in words that never repeat the URL
    (it may hold a password)."""
    url = urlsplit(text.strip())
    if "://" not in text:
        raise ValueError(f"not a URL: expected the form {example}")
    if url.scheme not in schemes:
        raise ValueError(f"the scheme must be one of {', '.join(s + '://' for s in schemes)}, not {url.scheme!r}")
    if url.scheme != "unix" and not url.netloc.rpartition("@")[2]:
        raise ValueError(f"the URL names no host: expected the form {example}")
    try:
        url.port  # noqa: B018 - parsing the port raises for one that is not a number
    except ValueError:
        if "," not in url.netloc:  # a Sentinel URL lists several host:port pairs
            raise ValueError(f"the port is not a number 0-65535: expected the form {example}") from None
    return url


def _read_accounts_file(path: Path) -> list[Any]:
    if path.suffix.lower() not in ACCOUNT_FILE_KINDS:
        raise ConfigError(
            f"GATEWAY_ACCOUNTS_FILE {path}: accounts files are JSON (.json) or TOML (.toml), not {path.suffix or 'no'}"
            " extension; the keys are the same in both"
        )
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"accounts_file {path}: {exc.strerror}") from None
    try:
        doc: Any = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"accounts_file {path}: {exc}") from None
    return _account_list(doc, str(path))


def _account_list(doc: Any, where: str) -> list[Any]:
    if isinstance(doc, dict) and "accounts" in doc:
        doc = doc["accounts"]
    if not isinstance(doc, list):
        raise ConfigError(f"{where}: expected a list of accounts (or an object with 'accounts')")
    return doc


def parse_accounts(raw: list[Any]) -> list[Account]:
    accounts: list[Account] = []
    for index, item in enumerate(raw):
        label = item.get("name", f"#{index}") if isinstance(item, dict) else f"#{index}"
        try:
            accounts.append(Account.model_validate(item))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'account'}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"account {label}: {problems}") from None
    counts = Counter(a.name for a in accounts)
    dupes = sorted(n for n, k in counts.items() if k > 1)
    if dupes:
        raise ConfigError(f"account name(s) defined twice: {', '.join(dupes)}")
    for a in accounts:
        unknown = [n for n in (*a.failover_to, *a.route_by_country.values()) if n not in counts]
        if unknown:
            raise ConfigError(
                f"account {a.name}: routes to account(s) not configured: {', '.join(sorted(set(unknown)))}"
            )
        if a.name in a.failover_to:
            raise ConfigError(f"account {a.name}: failover_to names the account itself")
        if len(set(a.failover_to)) != len(a.failover_to):
            raise ConfigError(f"account {a.name}: failover_to names an account twice")
    return accounts


def sandbox_account(port: int) -> Account:
    """The embedded default: one SerwerSMS account talking to the built-in sandbox."""
    return Account(
        name=SANDBOX_ACCOUNT,
        provider="serwersms",
        base_url=f"http://127.0.0.1:{port}",
        token=SecretStr("sandbox-token"),
        sender="Gateway",
        rate_per_s=100,
        burst=100,
    )


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{env_name(_setting_of(err['loc']))}: {err['msg'].removeprefix('Value error, ')}" for err in exc.errors()
        )
        raise ConfigError(problems) from None
    except SettingsError as exc:  # a value pydantic-settings could not decode (JSON for a list field)
        raise ConfigError(str(exc).split(" [")[0]) from None


def _setting_of(loc: tuple[int | str, ...]) -> str:
    head = str(loc[0]) if loc else "settings"
    return f"{head}.{loc[1]}" if head in GROUPS and len(loc) > 1 else head


def _known_variables() -> set[str]:
    known = {f"GATEWAY_{name.upper()}" for name in Settings.model_fields if name not in GROUPS}
    known |= {env_name(f"{group}.{name}") for group, model in GROUPS.items() for name in model.model_fields}
    return known


def unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """`GATEWAY_*` variables that name no setting (a misspelling is otherwise silently ignored);
    flat spellings of grouped settings and retired settings are reported by `renamed_variables`."""
    known = _known_variables()
    env = os.environ if environ is None else environ
    flat = {f"GATEWAY_{name.upper()}" for name in FLAT_NAMES}
    return sorted(
        k
        for k in env
        if k.upper().startswith("GATEWAY_") and k.upper() not in known | flat and k.upper() not in RETIRED
    )


def renamed_variables(environ: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(variable, what to do instead) for each flat spelling of a grouped setting and each retired
    setting in the environment."""
    env = os.environ if environ is None else environ
    found: list[tuple[str, str]] = []
    for variable in sorted(env):
        upper = variable.upper()
        flat = upper.removeprefix("GATEWAY_").lower()
        if upper.startswith("GATEWAY_") and flat in FLAT_NAMES:
            found.append((variable, f"read, but its name is now {env_name(flat)}"))
        elif upper in RETIRED:
            found.append((variable, f"ignored: {RETIRED[upper]}"))
    return found
