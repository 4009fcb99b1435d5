"""Simulated peers on the real wire: a Propolis per VM, and a recording Nexus."""

from ._nexus import recording_nexus_app as recording_nexus_app
from ._propolis import sim_propolis_app as sim_propolis_app

__all__ = ["recording_nexus_app", "sim_propolis_app"]
