"""Pure rules of live migration, as the agent plays them: no I/O, no clock of its own.

Every sled agent is both a migration source and a target (omicron
``sled-agent/src/instance.rs``, ``common/instance.rs``; Nexus's ``instance_migrate`` and
``instance_update`` sagas read both sides' reports):

- the target is registered with ``migration_id`` (its ``migration_in`` starts ``pending``
  at generation 1, the record Nexus made) and put in ``migration_target
  {src_propolis_addr}``: its Propolis is created with ``init: MigrationTarget`` and pulls
  the VM from the source's Propolis;
- each side then reports its own ``MigrationRuntimeState`` with its own generation
  (``_vmm_state``: an observed record starts at generation 2, ahead of Nexus's);
- a halted VMM fails any migration still active on it.

What a stop or an unregister does during a migration, and why (omicron's behaviour with
its source), is in docs/design.md ("Live migration"); the rules are here:
``unregister_state`` and ``migration_target_init``. ``migration_pending`` is what the
source deadline (``migration_source_timeout_s``) watches: a target whose Propolis never
reported the migration under way has not heard from its source.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ._errors import BadRequest
from ._wire import (
    InstanceEnsureBody,
    InstanceMigrationTargetParams,
    MigrationState,
    SledVmmState,
    VmmState,
)


def migration_target_init(
    body: InstanceEnsureBody, params: InstanceMigrationTargetParams
) -> dict[str, Any]:
    """The ``init`` of the target's ``PUT /instance`` (propolis-server contract,
    ``InstanceInitializationMethod::MigrationTarget``).

    The migration id is the one the VMM was registered with (omicron reads it back from
    ``migration_in``; #6073). A VMM registered without one cannot be a target: omicron
    fails the VMM here (``Error::Migration``); we refuse the request with a 400 and leave
    the VMM as it was, as nothing was created yet."""
    if body.migration_id is None:
        raise BadRequest(
            "`migration_target` needs the VMM to be registered with a `migration_id` "
            "(PUT /vmms/{propolis_id} with `migration_id` set)"
        )
    socket_addr(params.src_propolis_addr, "value.src_propolis_addr")
    return {
        "method": "MigrationTarget",
        "value": {
            "migration_id": str(body.migration_id),
            "replace_components": {},
            "src_addr": params.src_propolis_addr,
        },
    }


def socket_addr(text: str, field: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``ip:port`` or ``[ipv6]:port``, as omicron's ``SocketAddr`` (no host names);
    ``BadRequest`` naming ``field`` otherwise."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        want_v6 = True
    else:
        want_v6 = False
    try:
        ip = ipaddress.ip_address(host) if sep else None
        number = int(port)
    except ValueError:
        ip, number = None, -1
    if ip is None or not 0 <= number <= 65535 or (ip.version == 6) != want_v6:
        raise BadRequest(
            f"`{field}` must be a socket address (`ip:port` or `[ipv6]:port`), not {text!r}"
        )
    return ip, number


def spec_init(body: InstanceEnsureBody) -> dict[str, Any]:
    """The ``init`` of a new VM's ``PUT /instance`` (``Spec``)."""
    return {"method": "Spec", "value": {"spec": body.vmm_spec}}


def migration_active(state: SledVmmState) -> bool:
    """A migration in or out of this VMM has not ended."""
    return any(
        m is not None and not m.state.is_terminal for m in (state.migration_in, state.migration_out)
    )


def migration_pending(state: SledVmmState) -> bool:
    """A migration target whose Propolis has not reported the migration under way: it
    has not heard from its source yet (Propolis reports ``Sync`` only once connected to
    the source and agreed on a protocol: ``migrate/destination.rs``)."""
    m = state.migration_in
    return m is not None and m.state is MigrationState.PENDING


def unregister_state(state: SledVmmState) -> VmmState:
    """The state an unregistered VMM ends in.

    During a migration (either side) it is ``failed``, as omicron's
    ``fail_vmm_and_terminate`` (``handle_termination_request``, since omicron #7928): the
    VMM did not stop cleanly, and the migration it was part of fails with it (generation
    + 1 on that side). Otherwise ``destroyed``, this agent's rule for an unregister
    (docs/design.md, "Phases of a VMM")."""
    return VmmState.FAILED if migration_active(state) else VmmState.DESTROYED
