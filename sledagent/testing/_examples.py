"""Valid example bodies, as Nexus would send them (validated against the contract)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from typing import Any

from .._codec import convert
from .._wire import InstanceEnsureBody


def ensure_body_json(
    instance_id: uuid.UUID | None = None,
    *,
    nic_ids: Iterable[uuid.UUID] = (),
    propolis_addr: str = "127.0.0.1:0",
    migration_id: uuid.UUID | None = None,
    gen: int = 1,
) -> dict[str, Any]:
    """A complete ``InstanceEnsureBody`` as JSON-compatible data."""
    instance_id = instance_id or uuid.uuid4()
    nics = [
        {
            "id": str(nic_id),
            "ip_config": {
                "type": "v4",
                "value": {"ip": f"172.30.0.{5 + i}", "subnet": "172.30.0.0/22", "transit_ips": []},
            },
            "kind": {"type": "instance", "id": str(instance_id)},
            "mac": f"a8:40:25:f0:00:{i:02x}",
            "name": f"net{i}",
            "primary": i == 0,
            "slot": i,
            "vni": 1000,
        }
        for i, nic_id in enumerate(nic_ids)
    ]
    return {
        "instance_id": str(instance_id),
        "local_config": {
            "attached_subnets": [],
            "delegated_zvols": [],
            "dhcp_config": {"dns_servers": [], "search_domains": [], "host_domain": None},
            "external_ips": {"v4": None, "v6": None},
            "firewall_rules": [],
            "hostname": "guest",
            "multicast_groups": [],
            "nics": nics,
        },
        "metadata": {"project_id": str(uuid.uuid4()), "silo_id": str(uuid.uuid4())},
        "migration_id": None if migration_id is None else str(migration_id),
        "propolis_addr": propolis_addr,
        "vmm_runtime": {
            "gen": gen,
            "state": "starting",
            "time_updated": dt.datetime.now(dt.UTC).isoformat(),
        },
        "vmm_spec": {
            "board": {
                "chipset": {"type": "i440_fx", "value": {"enable_pcie": False}},
                "cpus": 2,
                "memory_mb": 1024,
            },
            "components": {},
        },
    }


def ensure_body(
    instance_id: uuid.UUID | None = None,
    *,
    nic_ids: Iterable[uuid.UUID] = (),
    propolis_addr: str = "127.0.0.1:0",
    migration_id: uuid.UUID | None = None,
    gen: int = 1,
) -> InstanceEnsureBody:
    """A complete ``InstanceEnsureBody`` model."""
    return convert(
        ensure_body_json(
            instance_id,
            nic_ids=nic_ids,
            propolis_addr=propolis_addr,
            migration_id=migration_id,
            gen=gen,
        ),
        InstanceEnsureBody,
    )
