"""Property-based against a running gateway's HTTP port: any method, path, query and headers get
an answer below 500, and the endpoints keep working after."""

from __future__ import annotations

import asyncio
import string
import tempfile
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testkit import free_port, new_account_name
from tests.conftest import InProcess

pytestmark = pytest.mark.integration

methods = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
segment = st.text(alphabet=string.ascii_letters + string.digits + "-._~%:@!$&'()*+,;=", max_size=20)
paths = st.one_of(
    st.sampled_from(["/healthz", "/readyz", "/metrics", "/", "/dlr", "/dlr/mobizon/x"]),
    st.lists(segment, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)),
)
queries = st.dictionaries(segment, segment, max_size=3)
header_names = st.text(alphabet=string.ascii_letters + "-", min_size=1, max_size=20).filter(
    lambda h: h.lower() not in {"host", "content-length", "transfer-encoding", "connection", "expect"}
)
headers = st.dictionaries(header_names, st.text(alphabet=string.printable.strip(), max_size=40), max_size=3)
requests = st.tuples(methods, paths, queries, headers, st.binary(max_size=200))


async def _run(tmp: Path, batch: list[tuple[str, str, dict[str, str], dict[str, str], bytes]]) -> None:
    world = InProcess(tmp)
    await world.start_sandbox()
    port = free_port()
    try:
        await world.gateway([world.account(new_account_name("http"))], http_port=port)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for method, path, query, hdrs, body in batch:
                response = await client.request(method, path, params=query, headers=hdrs, content=body)
                assert response.status_code < 500, (method, path, response.status_code, response.text[:200])
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            assert b"sms_in_flight" in (await client.get("/metrics")).content
    finally:
        await world.close()


@given(st.lists(requests, min_size=10, max_size=25))
@settings(
    max_examples=3,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_any_http_request_gets_an_answer_below_500(
    services: None, batch: list[tuple[str, str, dict[str, str], dict[str, str], bytes]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_run(Path(tmp), batch))
