"""The HTTP API over loopback: contract-valid answers, and bad input never a 500.

Real sockets and real time: every test carries a ``fail_after``.
"""

from __future__ import annotations

import io
import re
import tarfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from sledagent import VmmState
from sledagent._api import build_app
from sledagent._server import serve_api
from sledagent.testing import (
    AgentHarness,
    FakeHost,
    LocalHost,
    RetryOverloaded,
    ensure_body_json,
    fast_config,
    open_fake_agent,
)

from .conftest import Contract


@attrs.define
class Api:
    client: httpx.AsyncClient
    harness: AgentHarness
    contract: Contract

    async def call(self, method: str, template: str, status: int, **kw: Any) -> httpx.Response:
        """Send a request to ``template`` (formatted with ``path=``), check the status and
        validate the body against the contract's declared response."""
        path = template.format(**kw.pop("path", {}))
        response = await self.client.request(method, path, **kw)
        assert response.status_code == status, (method, path, response.status_code, response.text)
        if method.lower() in self.contract.document["paths"].get(template, {}):
            ctype = response.headers.get("content-type", "")
            body = response.json() if ctype.startswith("application/json") else response.content
            if ctype.startswith("application/json") or status >= 400 or not response.content:
                self.contract.validate_response(method, template, status, body or None)
        if status >= 400:
            err = response.json()
            assert set(err) >= {"message", "request_id", "error_code"}
            assert err["request_id"] == response.headers["x-request-id"]
        return response


async def open_api(host: FakeHost | LocalHost, contract: Contract, token: str | None = None) -> Any:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def cm() -> AsyncIterator[Api]:
        async with open_fake_agent(fast_config(), host) as harness, trio.open_nursery() as nursery:
            stop = trio.Event()
            binds = await nursery.start(
                lambda task_status: serve_api(
                    build_app(harness.agent, token=token),
                    listen="127.0.0.1:0",
                    shutdown=stop,
                    task_status=task_status,
                )
            )
            # As a well-behaved client: a read shed on a loaded machine is asked again.
            transport = RetryOverloaded()
            async with httpx.AsyncClient(base_url=binds[0], timeout=10, transport=transport) as c:
                yield Api(c, harness, contract)
            stop.set()

    return cm()


VMM = "/vmms/{propolis_id}"
STATE = "/vmms/{propolis_id}/state"


async def test_a_vmm_lifecycle_over_http_matches_the_contract(
    sled_agent_contract: Contract,
) -> None:
    fakes = FakeHost()
    fakes.nexus.latency_s = 0.3  # keep the halted-but-unacknowledged window visible
    with trio.fail_after(30):
        async with await open_api(fakes, sled_agent_contract) as api:
            pid = str(uuid.uuid4())
            body = ensure_body_json()
            r = await api.call("PUT", VMM, 200, path={"propolis_id": pid}, json=body)
            assert r.json()["vmm_state"]["state"] == "starting"
            again = await api.call("PUT", VMM, 200, path={"propolis_id": pid}, json=body)
            assert again.json() == r.json()  # idempotent
            other = ensure_body_json()
            await api.call("PUT", VMM, 409, path={"propolis_id": pid}, json=other)
            r = await api.call(
                "PUT", STATE, 200, path={"propolis_id": pid}, json={"state": {"type": "running"}}
            )
            assert r.json()["updated_runtime"] is not None
            entry = api.harness.agent.manager.registry.get(uuid.UUID(pid))
            await entry.wait_until(lambda e: e.state.vmm_state.state is VmmState.RUNNING)
            r = await api.call("GET", STATE, 200, path={"propolis_id": pid})
            assert r.json()["vmm_state"]["state"] == "running"
            fakes.propolis[uuid.UUID(pid)].halt()
            await entry.wait_until(lambda e: e.state.vmm_state.state is VmmState.DESTROYED)
            r = await api.call("GET", STATE, 200, path={"propolis_id": pid})
            assert r.json()["vmm_state"]["state"] == "destroyed"
            r = await api.call(
                "PUT", STATE, 410, path={"propolis_id": pid}, json={"state": {"type": "running"}}
            )
            assert r.json()["error_code"] == "NO_SUCH_INSTANCE"
            await fakes.nexus.wait_for(uuid.UUID(pid), VmmState.DESTROYED)
            await api.harness.agent.notifier.wait_idle()  # Nexus's answer reached the agent
            r = await api.call("GET", STATE, 404, path={"propolis_id": pid})
            assert r.json()["error_code"] == "NO_SUCH_INSTANCE"
            r = await api.call("DELETE", VMM, 200, path={"propolis_id": pid})
            assert r.json() == {"updated_runtime": None}


async def test_unregister_over_http_destroys_the_vmm(sled_agent_contract: Contract) -> None:
    with trio.fail_after(30):
        async with await open_api(FakeHost(), sled_agent_contract) as api:
            pid = str(uuid.uuid4())
            await api.call("PUT", VMM, 200, path={"propolis_id": pid}, json=ensure_body_json())
            r = await api.call("DELETE", VMM, 200, path={"propolis_id": pid})
            assert r.json()["updated_runtime"]["vmm_state"]["state"] == "destroyed"


BAD: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("GET", "/vmms/not-a-uuid/state", {}, 400, "propolis_id"),
    ("PUT", "/vmms/not-a-uuid", {"json": {}}, 400, "propolis_id"),
    (
        "PUT",
        f"/vmms/{uuid.uuid4()}/state",
        {"json": {"state": {"type": "paused"}}},
        400,
        "$.state.type",
    ),
    (
        "PUT",
        f"/vmms/{uuid.uuid4()}/state",
        {"json": {"state": {"type": "migration_target"}}},
        400,
        "value",
    ),
    (
        "PUT",
        f"/vmms/{uuid.uuid4()}/state",
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        400,
        "malformed",
    ),
    (
        "PUT",
        f"/vmms/{uuid.uuid4()}/state",
        {"content": b"state=running", "headers": {"content-type": "text/plain"}},
        415,
        "application/json",
    ),
    (
        "PUT",
        f"/vmms/{uuid.uuid4()}",
        {
            "content": b"[" + b"1," * 600_000 + b"1]",
            "headers": {"content-type": "application/json"},
        },
        413,
        "bytes",
    ),
    ("PUT", f"/vmms/{uuid.uuid4()}", {"json": {"instance_id": "x"}}, 400, "instance_id"),
    (
        "PUT",
        f"/vmms/{uuid.uuid4()}",
        {"json": ensure_body_json(propolis_addr="")},
        400,
        "propolis_addr",
    ),
    (
        "PUT",
        f"/vmms/{uuid.uuid4()}",
        {"json": ensure_body_json(propolis_addr="127.0.0.1:99999")},
        400,
        "propolis_addr",
    ),
    (
        "PUT",
        f"/vmms/{uuid.uuid4()}",
        {"json": ensure_body_json(propolis_addr="http://127.0.0.1:12400")},
        400,
        "propolis_addr",
    ),
    (
        "PUT",
        f"/vmms/{uuid.uuid4()}",
        {"json": ensure_body_json(propolis_addr="propolis.local:12400")},
        400,
        "propolis_addr",
    ),
    ("GET", "/zones/bundles/..%2F..%2Fetc", {}, 404, ""),
    ("GET", "/zones/bundles/%2E%2E", {}, 400, "zone_name"),
    ("GET", "/zones/bundles/nul%00", {}, 400, "zone_name"),
    ("GET", "/zones/bundles/oxz_a..b", {}, 400, "zone_name"),
    ("GET", "/zones/bundles/oxz_x/not-a-uuid", {}, 400, "bundle_id"),
    ("DELETE", f"/zones/bundles/not..a..zone/{uuid.uuid4()}", {}, 400, "zone_name"),
    ("GET", f"/zones/bundles/oxz_propolis-server_x/{uuid.uuid4()}", {}, 404, "no bundle"),
    ("PUT", "/zones/bundle-cleanup/context", {"json": {"storage_limit": 90}}, 400, "storage_limit"),
    (
        "PUT",
        "/zones/bundle-cleanup/context",
        {"json": {"priority": ["time", "time"]}},
        400,
        "priority",
    ),
    (
        "PUT",
        "/zones/bundle-cleanup/context",
        {"json": {"period": {"secs": 1, "nanos": 0}}},
        400,
        "period",
    ),
    ("POST", "/zones/bundles/oxz_propolis-server_nope", {}, 404, "no live zone"),
    ("GET", "/no/such/route", {}, 404, ""),
    ("PATCH", "/zones", {}, 405, ""),
]


async def test_bad_input_of_every_kind_gets_its_status_and_error_body(
    sled_agent_contract: Contract,
) -> None:
    with trio.fail_after(30):
        async with await open_api(FakeHost(), sled_agent_contract) as api:
            for method, path, kw, status, needle in BAD:
                r = await api.client.request(method, path, **kw)
                assert r.status_code == status, (method, path, r.status_code, r.text)
                err = r.json()
                sled_agent_contract.validate("Error", err)
                assert needle in err["message"], (path, err)


async def test_a_zone_name_that_names_no_zone_is_not_found_rather_than_refused(
    sled_agent_contract: Contract,
) -> None:
    # The contract's zone_name is any string: an unknown one has no bundles (as omicron).
    with trio.fail_after(30):
        async with await open_api(FakeHost(), sled_agent_contract) as api:
            for name in ("0", "é", "oxz_nope", "a b"):
                r = await api.client.get(f"/zones/bundles/{name}")
                assert (r.status_code, r.json()) == (200, []), name
                r = await api.client.get(f"/zones/bundles/{name}/{uuid.uuid4()}")
                assert r.status_code == 404 and "no bundle" in r.json()["message"], name
                r = await api.client.post(f"/zones/bundles/{name}")
                assert r.status_code == 404 and "no live zone" in r.json()["message"], name


async def test_a_wrong_method_is_405_naming_every_method_of_the_path(
    sled_agent_contract: Contract,
) -> None:
    with trio.fail_after(30):
        async with await open_api(FakeHost(), sled_agent_contract) as api:
            r = await api.client.request("TRACE", f"/zones/bundles/oxz_x/{uuid.uuid4()}")
            assert r.status_code == 405
            assert r.headers["allow"] == "DELETE, GET, HEAD"
            sled_agent_contract.validate("Error", r.json())
            r = await api.client.request("PATCH", "/metrics")
            assert (r.status_code, r.headers["allow"]) == (405, "GET, HEAD")


async def test_a_bearer_token_protects_the_api(sled_agent_contract: Contract) -> None:
    with trio.fail_after(30):
        async with await open_api(FakeHost(), sled_agent_contract, token="s3cret") as api:
            r = await api.client.get("/zones")
            assert r.status_code == 401 and r.json()["error_code"] == "UNAUTHORIZED"
            r = await api.client.get("/zones", headers={"authorization": "Bearer wrong"})
            assert r.status_code == 401
            r = await api.client.get("/zones", headers={"authorization": "Bearer s3cret"})
            assert r.status_code == 200


async def test_bundles_over_http_list_download_and_delete(
    tmp_path: Path, sled_agent_contract: Contract
) -> None:
    local = LocalHost.at(tmp_path, log_rate_bps=0, seed_log_bytes=256 << 10, quota_bytes=10 << 30)
    with trio.fail_after(60):
        async with await open_api(local, sled_agent_contract) as api:
            pid = await api.harness.start_vmm()
            zone = f"oxz_propolis-server_{pid}"
            r = await api.call("GET", "/zones", 200)
            assert r.json() == [zone]
            r = await api.call("POST", "/zones/bundles/{zone_name}", 202, path={"zone_name": zone})
            job_id = r.json()["job_id"]
            while (await api.client.get(f"/zones/bundle-jobs/{job_id}")).json()["state"] != "done":  # noqa: ASYNC110 (polling over HTTP, as a client would)
                await trio.sleep(0.02)
            local.propolis[pid].halt()
            await local.nexus.wait_for(pid, VmmState.DESTROYED)
            await api.harness.agent.drain()
            r = await api.call("GET", "/zones/bundles", 200, params={"filter": zone[:20]})
            listed = {b["cause"]: b for b in r.json()}
            assert set(listed) == {"other", "terminated_instance"}
            r = await api.call("GET", "/zones/bundles/{zone_name}", 200, path={"zone_name": zone})
            assert len(r.json()) == 2
            stored = {b.metadata.cause.value: b for b in await local.store.list_zone(zone)}
            size = {cause: b.size for cause, b in stored.items()}
            bundle_id = listed["terminated_instance"]["id"]["bundle_id"]
            path = {"zone_name": zone, "bundle_id": bundle_id}
            r = await api.call("GET", "/zones/bundles/{zone_name}/{bundle_id}", 200, path=path)
            assert r.headers["content-type"] == "application/gzip"
            on_disk = stored["terminated_instance"].paths[0]
            assert r.content == Path(on_disk).read_bytes()  # the bundle, byte for byte
            with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
                assert tar.getnames()[0] == "metadata.toml"
            debug = str(tmp_path / "debug0")
            r = await api.call("GET", "/zones/bundle-cleanup/utilization", 200)
            assert r.json() == {
                debug: {"bytes_available": (10 << 30) // 4, "bytes_used": sum(size.values()),
                        "dataset_quota": 10 << 30},
            }  # fmt: skip
            r = await api.call("GET", "/zones/bundle-cleanup/context", 200)
            assert r.json()["storage_limit"] == 25
            await api.call("PUT", "/zones/bundle-cleanup/context", 204, json={"storage_limit": 10})
            r = await api.call("GET", "/zones/bundle-cleanup/context", 200)
            assert r.json()["storage_limit"] == 10
            r = await api.call("POST", "/zones/bundle-cleanup", 200)
            assert r.json() == {debug: {"bundles": 0, "bytes": 0}}  # room for both
            # The dataset's quota shrinks: 10 % of it holds only the halted VMM's bundle.
            local.store.quota_bytes = size["terminated_instance"] * 10
            r = await api.call("POST", "/zones/bundle-cleanup", 200)
            # Cause first (omicron's default priority): the explicit bundle goes.
            assert r.json() == {debug: {"bundles": 1, "bytes": size["other"]}}
            r = await api.call("GET", "/zones/bundles/{zone_name}", 200, path={"zone_name": zone})
            assert [b["cause"] for b in r.json()] == ["terminated_instance"]
            assert not Path(stored["other"].paths[0]).exists()
            await api.call("DELETE", "/zones/bundles/{zone_name}/{bundle_id}", 204, path=path)
            await api.call("DELETE", "/zones/bundles/{zone_name}/{bundle_id}", 404, path=path)
            assert not Path(on_disk).exists()
            r = await api.call("GET", "/zones/cleanup", 200)
            assert r.json() == []


async def test_a_bundle_download_never_serves_a_file_outside_the_debug_directories(
    tmp_path: Path, sled_agent_contract: Contract
) -> None:
    from sledagent import BundleInfo, TarArchiver

    from .test_archive import make_job

    local = LocalHost.at(tmp_path / "host", log_rate_bps=0, seed_log_bytes=64 << 10)
    debug = tmp_path / "host" / "debug0"
    elsewhere = tmp_path / "elsewhere"

    async def bundle_elsewhere(zone: str) -> BundleInfo:
        """A real bundle of ``zone``, written outside the debug directory."""
        (tmp_path / zone).mkdir()
        job = make_job(tmp_path / zone)
        meta = attrs.evolve(job.metadata, id=attrs.evolve(job.metadata.id, zone_name=zone))
        return await TarArchiver([elsewhere]).write(attrs.evolve(job, metadata=meta))

    with trio.fail_after(60):
        async with await open_api(local, sled_agent_contract) as api:
            # Paths the index holds that resolve outside the debug directory: a bundle
            # file that is a symlink, a zone directory that is one, a path elsewhere.
            planted = []
            for i, how in enumerate(("file link", "directory link", "outside")):
                zone = f"oxz_propolis-server_0c0c0c0c-0000-4000-8000-00000000000{i}"
                info = await bundle_elsewhere(zone)
                real = Path(info.paths[0])
                if how == "file link":
                    (debug / zone).mkdir(parents=True)
                    (debug / zone / real.name).symlink_to(real)
                    path = debug / zone / real.name
                elif how == "directory link":
                    (debug / zone).symlink_to(real.parent)
                    path = debug / zone / real.name
                else:
                    path = real
                await local.store.add(attrs.evolve(info, paths=(str(path),)))
                planted.append((zone, info.bundle_id, real.read_bytes()))
            for zone, bundle_id, data in planted:
                r = await api.client.get(f"/zones/bundles/{zone}/{bundle_id}")
                assert r.status_code == 404, (zone, r.status_code)
                message = r.json()["message"]
                assert "no bundle" in message or "no whole bundle" in message, message
                assert data not in r.content
            # A bundle that is inside is served: the refusal is the path's, not the route's.
            pid = await api.harness.start_vmm()
            zone = f"oxz_propolis-server_{pid}"
            job = api.harness.agent.jobs.create(zone)
            while job.bundle is None:
                assert job.error is None
                await trio.sleep(0.01)
            r = await api.client.get(f"/zones/bundles/{zone}/{job.bundle.id.bundle_id}")
            assert r.status_code == 200 and r.content[:2] == b"\x1f\x8b"  # gzip
            await api.harness.agent.manager.unregister(pid)
            await api.harness.agent.drain()


async def test_metrics_are_served_without_the_token_and_count_what_happened(
    sled_agent_contract: Contract,
) -> None:
    fakes = FakeHost()
    with trio.fail_after(30):
        async with await open_api(fakes, sled_agent_contract, token="t") as api:
            pid = await api.harness.start_vmm()
            fakes.propolis[pid].halt()
            await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
            await api.harness.agent.drain()
            r = await api.client.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            text = r.text
    assert 'sledagent_bundle_slots{kind="total",phase="collect"} 8.0' in text
    assert "sledagent_bundles_created_total 1.0" in text
    assert "sledagent_reaper_reaped_total 1.0" in text
    assert 'sledagent_vmms{phase="active"} 0.0' in text
    assert 'sledagent_halt_to_publish_seconds_bucket{le="+Inf"} 1.0' in text
    busy = re.search(r"^sledagent_bundle_archive_busy_seconds_total (\S+)$", text, re.M)
    assert busy is not None and float(busy.group(1)) > 0  # phase 2 took slot time
    assert re.search(r"^sledagent_bundle_archive_input_bytes_total [1-9]", text, re.M)


async def test_migration_target_is_refused_with_400_when_it_cannot_be_one(
    sled_agent_contract: Contract,
) -> None:
    """A source address that is not a socket address (omicron's ``SocketAddr``), or a
    VMM registered without a ``migration_id``: 400 naming what is wrong, nothing made."""
    with trio.fail_after(30):
        async with await open_api(FakeHost(), sled_agent_contract) as api:
            target, plain = str(uuid.uuid4()), str(uuid.uuid4())
            body = ensure_body_json(migration_id=uuid.uuid4())
            await api.call("PUT", VMM, 200, path={"propolis_id": target}, json=body)
            await api.call("PUT", VMM, 200, path={"propolis_id": plain}, json=ensure_body_json())
            state = "/vmms/{propolis_id}/state"
            for pid, addr, named in (
                (target, "propolis.example:12400", "src_propolis_addr"),
                (plain, "127.0.0.1:12400", "migration_id"),
            ):
                body = {"state": {"type": "migration_target", "value": {"src_propolis_addr": addr}}}
                r = await api.call("PUT", state, 400, path={"propolis_id": pid}, json=body)
                assert r.json()["error_code"] == "INVALID_REQUEST" and named in r.json()["message"]
            r = await api.call("GET", state, 200, path={"propolis_id": target})
            assert r.json()["migration_in"]["state"] == "pending"  # untouched


async def test_every_503_says_when_to_retry() -> None:
    """Not only shed reads: a full host (as a VMM still being taken back, a stopping
    agent). Nexus's client (and ``RetryOverloaded``) waits ``Retry-After`` and asks again
    instead of hammering (RFC 9110 10.2.3)."""
    with trio.fail_after(30):
        async with (
            open_fake_agent(fast_config(max_zones=1)) as harness,
            trio.open_nursery() as nursery,
        ):
            stop = trio.Event()
            urls = await nursery.start(
                lambda task_status: serve_api(
                    build_app(harness.agent),
                    listen="127.0.0.1:0",
                    shutdown=stop,
                    announce=False,
                    task_status=task_status,
                )
            )
            async with httpx.AsyncClient(base_url=urls[0], timeout=10) as client:
                first = await client.put(f"/vmms/{uuid.uuid4()}", json=ensure_body_json())
                assert first.status_code == 200, first.text
                r = await client.put(f"/vmms/{uuid.uuid4()}", json=ensure_body_json())
            assert r.status_code == 503
            assert r.json()["error_code"] == "INSUFFICIENT_CAPACITY"
            assert r.headers["retry-after"] == "1"
            stop.set()


def test_every_request_id_is_a_random_version_4_uuid_in_its_usual_form() -> None:
    import uuid as uuidlib

    from sledagent._quick_reads import request_id

    ids = [request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for rid in ids:
        parsed = uuidlib.UUID(rid)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuidlib.RFC_4122, rid)
