"""The Helm chart: rendered with Helm's own SDK, linted, and validated against Kubernetes' schemas."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from gateway import contract as c
from gateway.config import GROUPS, Settings, env_name, parse_accounts, renamed_variables, unknown_variables
from testkit import ROOT

pytestmark = pytest.mark.chart

CHART = ROOT / "helm" / "sms-gateway"
KUBE_VERSION = kubernetes_validate.latest_version()
CRDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "keda-off": {"autoscaling": {"keda": {"enabled": False}}},
    "keda-sum": {"amqp": {"managementSecretKey": "management-url"}, "autoscaling": {"keda": {"triggers": "sum"}}},
    "no-autoscaling-sqlite": {
        "autoscaling": {"enabled": False},
        "replicaCount": 1,
        "state": {"existingSecret": "", "persistence": {"enabled": True, "size": "2Gi"}},
    },
    "hardened": {
        "networkPolicy": {"enabled": True, "ingressFrom": [{"namespaceSelector": {"matchLabels": {"team": "edge"}}}]},
        "extraVolumes": [{"name": "ca", "configMap": {"name": "corporate-ca"}}],
        "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/gateway/ca", "readOnly": True}],
        "extraEnvFrom": [{"secretRef": {"name": "gateway-extra"}}],
    },
    "created-secret": {"credentials": {"existingSecret": "", "create": True, "stringData": {"otp-token": "dev-only"}}},
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
        "grafanaDashboard": {"enabled": True},
    },
    "webhooks": {
        "ingress": {"enabled": True, "host": "sms.example.com", "tlsSecret": "sms-tls"},
        "accounts": [
            {
                "name": "kz",
                "provider": "mobizon",
                "base_url": "https://api.mobizon.kz",
                "api_key": "file:/etc/gateway/secrets/kz-key",
                "webhook_secret": "file:/etc/gateway/secrets/kz-hook",
            }
        ],
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm_python.Chart.load(str(CHART)) as chart:
        out = chart.render(values=values, name="sms", namespace="messaging")
    docs = []
    for path, text in out.items():
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(params=sorted(VALUE_SETS), ids=sorted(VALUE_SETS))
def manifests(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(VALUE_SETS[request.param])


def test_lint_is_clean() -> None:
    for values in VALUE_SETS.values():
        report = helm_python.lint(str(CHART), values, strict=True)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert problems == [], problems
        assert report["errors"] == []


def test_every_manifest_is_valid_kubernetes(manifests: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = manifests
    assert docs
    for doc in docs:
        if doc["kind"] in CRDS:
            continue  # custom resources: checked by the tests below
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_deployment_is_locked_down_and_drains(manifests: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = manifests
    (deploy,) = by_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"]
    env = effective_env(docs)
    assert pod["terminationGracePeriodSeconds"] > float(env["GATEWAY_DRAIN_TIMEOUT_S"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(env["GATEWAY_STATE_PATH"]).parent) in mounts  # writable under a read-only root


def effective_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Every variable the chart gives the container: envFrom ConfigMaps plus env (secret refs as markers)."""
    (deploy,) = by_kind(docs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    configmaps = {d["metadata"]["name"]: d["data"] for d in by_kind(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" not in source:
            continue  # extraEnvFrom: the operator's own sources
        data = configmaps[source["configMapRef"]["name"]]
        env.update({k: v for k, v in data.items() if k.isupper()})
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "<from secret>")
    return env


def test_every_variable_the_chart_sets_is_a_gateway_setting(
    manifests: tuple[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, docs = manifests
    env = effective_env(docs)
    gateway_vars = {k for k in env if k.startswith("GATEWAY_")}
    assert unknown_variables(env) == []
    assert renamed_variables(env) == []  # the chart uses today's names
    assert {"GATEWAY_AMQP_URL", "GATEWAY_ACCOUNTS_FILE", "GATEWAY_STATE_PATH", "GATEWAY_HTTP__HOST"} <= gateway_vars
    assert env["GATEWAY_HTTP__HOST"] == "0.0.0.0"  # noqa: S104 - probes come from outside the container
    assert ("GATEWAY_REDIS_URL" in env) is (name != "no-autoscaling-sqlite")
    # The values parse exactly as the gateway parses its environment.
    for key in list(os.environ):
        if key.startswith("GATEWAY_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("GATEWAY_") and value != "<from secret>":
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.http.port == 8080
    assert settings.retry_schedule_s == [1, 5, 30, 120, 600, 1800]


def test_accounts_file_is_valid_and_holds_no_secret(manifests: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = manifests
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if "accounts.json" in d["data"]]
    accounts = json.loads(cm["data"]["accounts.json"])["accounts"]
    secrets = ("token", "password", "api_key", "webhook_secret")
    for account in accounts:
        for key in secrets:
            assert key not in account or account[key].startswith(("file:/etc/gateway/secrets/", "env:"))
    # The references resolve in the pod; here they are stood in for, the rest parses as the gateway does.
    parsed = parse_accounts([{**a, **{k: "resolved" for k in secrets if k in a}} for a in accounts])
    assert [a.name for a in parsed] == [a["name"] for a in VALUE_SETS[name].get("accounts", [{"name": "otp"}])]


def test_credentials_never_rendered_unless_asked() -> None:
    assert by_kind(render({}), "Secret") == []
    (secret,) = by_kind(render(VALUE_SETS["created-secret"]), "Secret")
    assert secret["stringData"] == {"otp-token": "dev-only"}


def test_keda_scales_on_every_lane_of_every_account() -> None:
    values = {"accounts": [{"name": n, "provider": "serwersms", "base_url": "https://x.test"} for n in ("otp", "bulk")]}
    docs = render(values)
    (scaled,) = by_kind(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    (deploy,) = by_kind(docs, "Deployment")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    triggers = scaled["spec"]["triggers"]
    assert [t["metadata"]["queueName"] for t in triggers] == [
        "sms.send.otp.urgent",
        "sms.send.otp",
        "sms.send.otp.bulk",
        "sms.send.bulk.urgent",
        "sms.send.bulk",
        "sms.send.bulk.bulk",
    ]
    assert len({t["name"] for t in triggers}) == 6  # KEDA wants each trigger's name unique
    assert all(t["type"] == "rabbitmq" and t["metadata"]["mode"] == "QueueLength" for t in triggers)
    assert all(t["metadata"]["hostFromEnv"] == "GATEWAY_AMQP_URL" for t in triggers)
    assert "replicas" not in deploy["spec"]
    assert by_kind(docs, "HorizontalPodAutoscaler") == []


def test_many_accounts_scale_on_one_summed_trigger_over_the_management_api() -> None:
    accounts = [{"name": f"brand{i}", "provider": "serwersms", "base_url": "https://x.test"} for i in range(300)]
    docs = render({**VALUE_SETS["keda-sum"], "accounts": accounts})
    ((trigger,),) = [d["spec"]["triggers"] for d in by_kind(docs, "ScaledObject")]
    meta = trigger["metadata"]
    assert trigger["type"] == "rabbitmq"
    assert meta["protocol"] == "http"
    assert meta["useRegex"] == "true"
    assert meta["operation"] == "sum"
    assert meta["hostFromEnv"] == "GATEWAY_MANAGEMENT_URL"
    pattern = re.compile(meta["queueName"])
    lanes = [c.account_queue(a["name"], lane) for a in accounts for lane in c.LANES]
    assert all(pattern.search(q) for q in lanes)
    assert not [q for q in (c.DEAD_QUEUE, c.OPTOUT_QUEUE, c.retry_queue(1000)) if pattern.search(q)]
    (deploy,) = by_kind(docs, "Deployment")
    env = {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    wanted = {"name": "sms-gateway-amqp", "key": "management-url"}
    assert env["GATEWAY_MANAGEMENT_URL"]["valueFrom"]["secretKeyRef"] == wanted


def test_the_summed_trigger_without_a_management_url_is_refused() -> None:
    with pytest.raises(Exception, match="managementSecretKey"):
        render({"autoscaling": {"keda": {"triggers": "sum"}}})


def test_plain_hpa_when_keda_is_off() -> None:
    docs = render(VALUE_SETS["keda-off"])
    assert by_kind(docs, "ScaledObject") == []
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] == 10


def test_monitoring_resources() -> None:
    docs = render(VALUE_SETS["monitoring"])
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    (rule,) = by_kind(docs, "PrometheusRule")
    alerts = {r["alert"]: r["expr"] for r in rule["spec"]["groups"][0]["rules"]}
    assert set(alerts) == {
        "SmsGatewayAccountPaused",
        "SmsGatewayDeadLettersGrowing",
        "SmsGatewayErrorRate",
        "SmsGatewayNoConsumers",
        "SmsGatewayBacklog",
        "SmsGatewayRequestsWaiting",
        "SmsGatewayUrgentRequestsWaiting",
        "SmsGatewayBudgetNearlySpent",
        "SmsGatewayVelocityBlocked",
        "SmsGatewayRouteOpen",
        "SmsGatewayRouteDrained",
    }
    assert "sms_velocity_blocked_total" in alerts["SmsGatewayVelocityBlocked"]
    assert 'state!="closed"' in alerts["SmsGatewayRouteOpen"]
    assert "sms_route_drained" in alerts["SmsGatewayRouteDrained"]
    route_open = next(r for r in rule["spec"]["groups"][0]["rules"] if r["alert"] == "SmsGatewayRouteOpen")
    assert route_open["for"] == "5m"
    assert "sms_account_paused" in alerts["SmsGatewayAccountPaused"]
    assert "sms_budget_used_parts" in alerts["SmsGatewayBudgetNearlySpent"]
    assert ">= 0.8" in alerts["SmsGatewayBudgetNearlySpent"]
    assert "sms_consumer_live" in alerts["SmsGatewayNoConsumers"]
    assert "rabbitmq_queue_messages_ready" in alerts["SmsGatewayBacklog"]
    assert "sms_queue_wait_seconds_bucket" in alerts["SmsGatewayRequestsWaiting"]
    # Per lane: an urgent request waiting 30 s pages; a bulk one has two hours.
    urgent = next(r for r in rule["spec"]["groups"][0]["rules"] if r["alert"] == "SmsGatewayUrgentRequestsWaiting")
    assert 'lane="urgent"' in urgent["expr"]
    assert "> 30" in urgent["expr"]
    assert urgent["labels"]["severity"] == "critical"
    assert 'lane="bulk"' in alerts["SmsGatewayRequestsWaiting"]
    assert "> 7200" in alerts["SmsGatewayRequestsWaiting"]
    dashboard = next(d for d in by_kind(docs, "ConfigMap") if "sms-gateway.json" in d.get("data", {}))
    panels = json.loads(dashboard["data"]["sms-gateway.json"])["panels"]
    exprs = " ".join(p["targets"][0]["expr"] for p in panels)
    from gateway.obs import metrics

    for metric in (
        "sms_outcomes_total",
        "sms_provider_request_seconds",
        "sms_dead_letters_total",
        "sms_account_paused",
    ):
        assert metric in exprs
    registered = {m.name for m in metrics.REGISTRY.collect()}
    assert {"sms_outcomes", "sms_account_paused", "sms_in_flight", "sms_consumer_live", "sms_queue_wait_seconds"} <= (
        registered
    )


def test_several_replicas_on_the_embedded_sqlite_state_are_refused() -> None:
    for values in (
        {"state": {"existingSecret": ""}},  # autoscaling on by default
        {"state": {"existingSecret": ""}, "autoscaling": {"enabled": False}, "replicaCount": 2},
    ):
        with helm_python.Chart.load(str(CHART)) as chart, pytest.raises(Exception, match="SQLite") as err:
            chart.render(values=values, name="sms")
        assert "state.existingSecret" in str(err.value)
        assert "replicaCount: 1" in str(err.value)


def test_one_replica_on_sqlite_keeps_its_file_on_a_claim_and_is_recreated() -> None:
    docs = render(VALUE_SETS["no-autoscaling-sqlite"])
    (claim,) = by_kind(docs, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    (deploy,) = by_kind(docs, "Deployment")
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (redis_deploy,) = by_kind(render({}), "Deployment")
    assert redis_deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    assert by_kind(render({}), "PersistentVolumeClaim") == []


def test_network_policy_extra_volumes_and_the_startup_probe() -> None:
    docs = render(VALUE_SETS["hardened"])
    (policy,) = by_kind(docs, "NetworkPolicy")
    ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 5672, 5671, 6379, 443} <= ports
    assert policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"] == {"team": "edge"}
    (deploy,) = by_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {"name": "ca", "mountPath": "/etc/gateway/ca", "readOnly": True} in container["volumeMounts"]
    assert {"name": "ca", "configMap": {"name": "corporate-ca"}} in pod["volumes"]
    assert {"secretRef": {"name": "gateway-extra"}} in container["envFrom"]
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_the_ingress_exposes_only_the_webhook_path() -> None:
    docs = render(VALUE_SETS["webhooks"])
    (ingress,) = by_kind(docs, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "sms.example.com"
    assert [p["path"] for p in rule["http"]["paths"]] == ["/dlr/"]
    assert ingress["spec"]["tls"][0]["secretName"] == "sms-tls"
    assert by_kind(render(VALUE_SETS["defaults"]), "Ingress") == []


def test_schema_rejects_bad_values() -> None:
    with helm_python.Chart.load(str(CHART)) as chart, pytest.raises(helm_python.HelmValuesError):
        chart.render(values={"accounts": [{"name": "x", "provider": "sms", "base_url": "https://x"}]}, name="sms")
    with helm_python.Chart.load(str(CHART)) as chart, pytest.raises(helm_python.HelmValuesError):
        chart.render(
            values={"accounts": [{"name": "x", "provider": "serwersms", "base_url": "https://x", "token": "plain"}]}
        )
    account = {"name": "x", "provider": "mobizon", "base_url": "https://x", "webhook_secret": "plain-secret"}
    with helm_python.Chart.load(str(CHART)) as chart, pytest.raises(helm_python.HelmValuesError):
        chart.render(values={"accounts": [account]})
    routed = {"name": "x", "provider": "mobizon", "base_url": "https://x", "route_by_country": {"Poland": "y"}}
    with helm_python.Chart.load(str(CHART)) as chart, pytest.raises(helm_python.HelmValuesError):
        chart.render(values={"accounts": [routed]})


def test_failover_settings_reach_the_gateway() -> None:
    accounts = [
        {
            "name": "a",
            "provider": "serwersms",
            "base_url": "https://x",
            "failover_to": ["b"],
            "route_by_country": {"UA": "b"},
        },
        {"name": "b", "provider": "mobizon", "base_url": "https://y"},
    ]
    docs = render({"accounts": accounts, "config": {"failover": {"openSeconds": 30}}})
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if "GATEWAY_FAILOVER__OPEN_S" in d.get("data", {})]
    assert cm["data"]["GATEWAY_FAILOVER__OPEN_S"] == "30"
    assert cm["data"]["GATEWAY_FAILOVER__FAILURES"] == "5"


def test_every_value_is_documented() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    schema = json.loads((CHART / "values.schema.json").read_text())
    for key in schema["properties"]:
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:"))
        above = at - 1
        while above >= 0 and lines[above].startswith("#    "):
            above -= 1  # a comment continued over several lines
        assert lines[above].startswith("# --"), f"{key} has no comment"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])


def test_dockerfile_is_clean_under_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") >= 2  # multi-stage
    assert "USER 10001" in text or "USER ${UID}" in text


def test_the_image_is_labelled_with_the_package_version() -> None:
    import re
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG VERSION=(.+)$", dockerfile, re.MULTILINE)[1] == version  # type: ignore[index]
    assert 'org.opencontainers.image.version="${VERSION}"' in dockerfile
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


# Set by the chart itself (Secrets, mounts, the HTTP port value) or meaningless in a pod.
CHART_OWNED = {
    "GATEWAY_AMQP_URL",
    "GATEWAY_REDIS_URL",
    "GATEWAY_MANAGEMENT_URL",
    "GATEWAY_ACCOUNTS",
    "GATEWAY_ACCOUNTS_FILE",
    "GATEWAY_STATE_PATH",
    "GATEWAY_HTTP__HOST",
    "GATEWAY_HTTP__PORT",
    "GATEWAY_SANDBOX_PORT",
    "GATEWAY_STORE_RECOVERY_S",  # unset by default: derived from the retry schedule
}


def test_the_chart_config_covers_every_setting_with_the_gateway_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    env = effective_env(render({}))
    every = {env_name(name) for name in Settings.model_fields if name not in GROUPS}
    every |= {env_name(f"{group}.{name}") for group, model in GROUPS.items() for name in model.model_fields}
    assert every - CHART_OWNED - set(env) == set()  # a setting the chart's config cannot set
    for key in list(os.environ):
        if key.startswith("GATEWAY_"):
            monkeypatch.delenv(key)
    defaults = Settings().model_dump(mode="json")
    for key, value in env.items():
        if key.startswith("GATEWAY_") and key not in CHART_OWNED:
            monkeypatch.setenv(key, value)
    charted = Settings().model_dump(mode="json")
    differ = {k for k in defaults if defaults[k] != charted[k]}
    assert differ == {"log_format"}, differ  # only JSON logs, chosen for the cluster
    recovery = render({"config": {"storeRecoverySeconds": 900}})
    assert effective_env(recovery)["GATEWAY_STORE_RECOVERY_S"] == "900"


def test_the_network_policy_lets_out_an_account_base_url_port() -> None:
    account = {"name": "own", "provider": "serwersms", "base_url": "https://sms.example.com:8443", "token": "file:/x"}
    docs = render({"networkPolicy": {"enabled": True}, "accounts": [account]})
    (policy,) = by_kind(docs, "NetworkPolicy")
    ports = [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"] if p["protocol"] == "TCP"]
    assert 8443 in ports
    assert 6380 in ports  # Redis over TLS, as in docs/kubernetes.md
    assert len(ports) == len(set(ports))


def test_the_kubernetes_steps_in_the_docs_render_and_fit_together() -> None:
    """docs/kubernetes.md, read as a user follows it: its values file renders into valid
    manifests, the Secrets it creates are the ones the pods read, each credential an account
    references is a key of the credentials Secret, and the deployment it names exists."""
    import re

    page = (ROOT / "docs" / "kubernetes.md").read_text()
    values = yaml.safe_load(re.search(r"`values-prod.yaml`:\n\n\s*```yaml\n(.*?)```", page, re.S).group(1))  # type: ignore[union-attr]
    docs = render(values)
    for doc in docs:
        if doc["kind"] not in CRDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    created = dict(re.findall(r"create secret generic (\S+) \\\n((?:.*\\\n)*.*)", page))
    (deploy,) = by_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    read = {e["valueFrom"]["secretKeyRef"]["name"] for e in pod["containers"][0]["env"] if "valueFrom" in e}
    read |= {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert read <= set(created), read - set(created)
    keys = set(re.findall(r"--from-literal=([\w-]+)=", created["sms-gateway-credentials"]))
    referenced = {
        str(value).removeprefix("file:/etc/gateway/secrets/")
        for account in values["accounts"]
        for value in account.values()
        if str(value).startswith("file:/etc/gateway/secrets/")
    }
    assert referenced == keys
    (install,) = re.findall(r"helm install (\S+) ", page)
    assert f"deploy/{deploy['metadata']['name']}" in page
    assert install == "sms"
