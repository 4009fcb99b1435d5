"""Re-adoption: an agent restart (kill -9, OOM, SIGTERM for an upgrade) costs no guest.

omicron's sled-agent forgets its Propolis zones when it restarts: Nexus marks every
instance Failed and the VMs are destroyed or leak (omicron #2646, #725, #6763). Here the
next start reconciles three sources and takes back what still runs:

- the journal (``_journal``): what the agent promised Nexus, registrations included;
- the zones on the host (``ZoneBackend.list_zones``): what exists;
- each VMM's Propolis: ``GET /instance`` (it must run this VMM's instance: another one
  at that address counts as ``NoInstance``), then ``GET /instance/state-monitor`` from
  generation 0: what runs.

``plan`` is the pure part: journal x zones -> what to do with each VMM and each zone.
``readopt`` is the per-VMM part, run by the VMM's own runner before it serves requests:
it asks Propolis and applies the rule. The whole table, with the reason for each row, is
in docs/design.md ("Restart: the reconciliation table"):

- journal says ended (terminal state): published again until Nexus answers; zone reaped;
- live, journaled by an older version (no registration): ``failed``; zone reaped;
- live, no zone: re-adopted as registered if its VM was never created, else ``failed``;
- live, zone, Propolis answers a live state: re-adopted (runner, monitor, stop grace,
  NICs); published only if the state differs from the journaled one (generation + 1);
- live, zone, Propolis answers Destroyed/Failed: that state; zone reaped;
- live, zone, ``NoInstance``: ``failed`` if the VM had been created or seen, else
  re-adopted with its zone (the next ``running`` creates the VM);
- live, zone, no answer within ``readopt_probe_s``: re-adopted; the monitor fails it
  after ``propolis_unreachable_s`` without an answer;
- a migration in or out journaled: Propolis's answer carries the migration; it is
  applied as any observation (each side's generation only moves forward), and a target
  still waiting for its source gets its ``migration_source_timeout_s`` again;
- no journal entry, zone: ``unexpected_zone``, bundled and torn down;
- the host rebooted since the journal was written (its boot id changed): no guest
  survived; every live VMM is ``failed`` at once and its zone reaped.

Reads are answered from the journal from the first moment (the registry is filled
before the API serves); a state change waits for its VMM's re-adoption (``adopted``)
for at most ``readopt_wait_s``, else 503. A VMM whose stop was asked for before the
restart resumes its stop grace where it was (wall clock).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import attrs
import structlog
import trio

from ._errors import PeerError, PropolisGone
from ._host import PropolisClient, Zone
from ._journal import JournaledVmm
from ._monitor import Seen
from ._wire import InstanceStateMonitorResponse, is_socket_addr, utcnow

if TYPE_CHECKING:
    from ._requests import Adoption
    from ._runner import InstanceRunner

log = structlog.get_logger("sledagent.readopt")


@attrs.frozen
class Plan:
    """What the start does with each journaled VMM and each zone on the host."""

    #: Live VMMs with their registration: a runner takes each back (its zone or None).
    readopt: tuple[tuple[JournaledVmm, Zone | None], ...] = ()
    #: VMMs that ended (or, journaled by an older version, cannot be taken back):
    #: held as halted until Nexus answers their terminal state; their zones reaped.
    ended: tuple[tuple[JournaledVmm, Zone | None], ...] = ()
    #: Zones no journaled VMM owns.
    unexpected: tuple[Zone, ...] = ()


def plan(
    journaled: dict[uuid.UUID, JournaledVmm], zones: list[Zone], *, host_rebooted: bool = False
) -> Plan:
    """Pair every journaled VMM with its zone, and find the zones nobody owns. After a
    host reboot no guest survived: every journaled VMM has ended (``failed``)."""
    by_id = {z.propolis_id: z for z in zones if z.propolis_id is not None}
    readopt, ended = [], []
    for pid, vmm in sorted(journaled.items()):
        zone = by_id.pop(pid, None)
        if zone is not None and vmm.registration is not None:
            # Where the zone's Propolis listens: the zone's own record (the local backend
            # notes where its Propolis was bound) or the address Nexus registered.
            # (A record an older version wrote may hold an address that is none.)
            recorded = zone.propolis_addr if is_socket_addr(zone.propolis_addr) else ""
            zone = attrs.evolve(
                zone,
                propolis_addr=recorded or vmm.registration.propolis_addr,
                nic_ids=zone.nic_ids or vmm.registration.nic_ids,
            )
        if host_rebooted or vmm.registration is None or vmm.state.vmm_state.state.is_halted:
            ended.append((vmm, zone))
        else:
            readopt.append((vmm, zone))
    unexpected = [z for z in zones if z.propolis_id is None or z.propolis_id in by_id]
    return Plan(tuple(readopt), tuple(ended), tuple(unexpected))


async def readopt(runner: InstanceRunner, adoption: Adoption) -> None:
    """Take one VMM back: ask its Propolis, then resume or end it (the table above).

    Runs in the runner's task before it serves; a ``terminate`` meanwhile (unregister)
    cancels the question and hands the zone to the reaper."""
    vmm, zone = adoption.vmm, adoption.zone
    config = runner.context.config
    bound = log.bind(propolis_id=str(vmm.propolis_id))
    created = vmm.ensured or vmm.seen_live
    runner.seen_live = vmm.seen_live
    if zone is None:
        if created:
            runner.gone("its zone vanished while the agent was down")
        # else: registered but never run; the first `running` installs the zone.
        return
    runner.context.nics.claim(zone.nic_ids, zone.name)
    client = runner.context.connector.client_for(zone)
    # A few at a time: a thousand questions answered in one scheduler batch would stall
    # the reads the API answers meanwhile (as a mass halt's monitor answers did).
    async with runner.context.readopt_limiter:
        if runner.halted:  # unregistered while waiting its turn
            return
        answer = await _ask(runner, client, zone, created, bound)
    if runner.halted or isinstance(answer, _Gone):
        return
    response = answer
    if response is not None and runner.observe(response) is Seen.HALTED:
        return  # it halted while the agent was down: ended and reaped as any halt
    runner.start_monitor(client, zone, gen=0 if response is None else response.gen + 1)
    if vmm.stop_requested_at is not None:
        waited = (utcnow() - vmm.stop_requested_at).total_seconds()
        runner.resume_stop_grace(config.stop_grace_s - waited)
    # A migration target still waiting for its source: the deadline starts over (the
    # journal does not keep when it began; at worst the wait doubles).
    runner.resume_source_deadline(config.migration_source_timeout_s)
    bound.debug(
        "vmm_readopted",
        zone_name=zone.name,
        state=runner.entry.state.vmm_state.state.value,
        gen=runner.entry.state.gen,
        answered=response is not None,
    )


class _Gone:
    """The question's outcome when the VMM ended, or has no VM to follow yet."""


_GONE = _Gone()


async def _ask(
    runner: InstanceRunner,
    client: PropolisClient,
    zone: Zone,
    created: bool,
    bound: structlog.typing.FilteringBoundLogger,
) -> InstanceStateMonitorResponse | _Gone | None:
    """Propolis's first answer about this VMM (``None``: none within the bound)."""
    config = runner.context.config
    response: InstanceStateMonitorResponse | None = None
    with runner.interruptible():
        try:
            with trio.fail_after(config.readopt_probe_s):
                # The VM at that address must be ours: an address reused by another
                # Propolis (a host rebuilt, a port taken by another zone) is not our guest.
                vm = (await client.instance()).instance
                if vm.properties.id != runner.entry.instance_id:
                    raise PropolisGone(
                        f"Propolis at {zone.propolis_addr} runs instance {vm.properties.id}, "
                        f"not {runner.entry.instance_id}",
                        code="NoInstance",
                    )
                response = await client.state_monitor(0)
        except PropolisGone as exc:
            if created:
                runner.gone(f"Propolis no longer has the VM: {exc}")
            else:  # the agent died between installing the zone and creating the VM
                bound.info("readopted_without_vm", zone_name=zone.name)
            return _GONE
        except (PeerError, trio.TooSlowError) as exc:
            # Maybe restarting: the monitor retries, and fails the VMM only after
            # ``propolis_unreachable_s`` without an answer.
            bound.warning("readopt_propolis_unanswered", error=str(exc) or "timed out")
    return response
