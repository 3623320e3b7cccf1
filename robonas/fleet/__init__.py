"""The host end of deployment: fleet inventory, agent sessions, rollouts and stored reports.

`inventory` reads `launch/fleet.toml`; `client.AgentClient` talks to one agent over one link
(`device_agents.link`); `deploy.rollout` pushes an artifact to canaries first, then the rest;
`reports` writes devices, deployments and device reports to the run store. Importing the
package pulls in only the protocol codec and the inventory reader (no SQLAlchemy, no torch).
"""

from __future__ import annotations

from robonas.fleet.client import AgentClient, AgentRefused, Canary, FleetError, LinkFailure
from robonas.fleet.inventory import AgentEntry, Inventory, load_inventory

__all__ = [
    "AgentClient",
    "AgentEntry",
    "AgentRefused",
    "Canary",
    "FleetError",
    "Inventory",
    "LinkFailure",
    "load_inventory",
]
