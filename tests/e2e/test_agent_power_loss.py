"""SIGKILL the agent at random points of a deploy; after a restart it always has a complete,
verified policy (the old one or the new one), never a partial file."""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time

import pytest

from device_agents.protocol import LinkError, ProtocolError
from device_agents.signing import generate_keypair, load_private_key, sign_manifest
from device_agents.slots import SlotStore
from tests.device_agents.test_agent import (
    EASY,
    AgentProcess,
    deploy,
    manifest_for,
    status,
    test_models,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
RUNS = 24


def test_sigkill_during_deploy_always_leaves_a_verified_policy(tmp_path):
    pytest.importorskip("sim")
    priv, pub = generate_keypair(tmp_path / "keys")
    key = load_private_key(priv)
    models = test_models()
    arts = []
    for name in ("good", "good2"):
        m = manifest_for(models[name])
        arts.append((models[name], m, sign_manifest(m, key)))
    known = {a[1]["sha256"] for a in arts}
    state = tmp_path / "state"
    canary = dict(EASY, episodes=1, max_steps=20)

    agent = AgentProcess(state, pub)
    with agent.link() as link:
        assert deploy(link, *arts[0], canary).type.name == "ACK"
    agent.stop()

    rng = random.Random(1234)
    outcomes = {"old": 0, "new": 0}
    t_start = time.monotonic()
    for _run in range(RUNS):
        agent = AgentProcess(state, pub)
        with agent.link(timeout_s=10) as link:
            st = status(link)
            current = st["active_sha256"]
            target = arts[1] if current == arts[0][1]["sha256"] else arts[0]
            delay = rng.uniform(0.0, 0.25)
            killer = threading.Timer(delay, agent.proc.send_signal, args=(signal.SIGKILL,))
            killer.start()
            with contextlib.suppress(LinkError, ProtocolError, AssertionError):  # the agent died under us
                deploy(link, *target, canary, chunk_size=256)
            killer.join()
        agent.proc.wait(10)
        # restart: the state must hold a complete, verified policy
        agent = AgentProcess(state, pub)
        try:
            with agent.link(timeout_s=10) as link:
                st = status(link)
        finally:
            agent.stop()
        active = st["active"]
        assert active in ("a", "b"), st
        assert st["slots"][active]["verified"], st
        assert st["active_sha256"] in known
        outcomes["new" if st["active_sha256"] == target[1]["sha256"] else "old"] += 1
        # and the files on disk agree, independently of the agent
        info = SlotStore(state, [pub]).inspect(active)
        assert info.ok and info.model_path.stat().st_size == info.manifest["model_size"]
    print(f"{RUNS} kills in {time.monotonic() - t_start:.1f} s: {outcomes}")
