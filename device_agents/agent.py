"""The on-robot agent: answers the wire protocol (PROTOCOL.md), keeps the A/B model slots, runs
canary episodes before it promotes a model, and reports timings and returns. Serving the links
(threads, sessions, timeouts) lives in `device_agents.server`.

Leans on `device_agents.protocol` (frames), `device_agents.signing` (sha256 + Ed25519),
`device_agents.operators` (who may do what), `device_agents.sessions` (sessions and the lease),
`device_agents.slots` (atomic A/B slots, ordering, rejected policies), `device_agents.runtime`
(the TFLite interpreter) and `device_agents.control_loop`.

Safety rules this module enforces (issue 14; PROTOCOL.md "Operators" and "Safety"):
- every request that changes or moves the robot needs an authenticated operator holding the
  matching role (`REQUIRED_ROLE`); status, ping and hello do not;
- one controlling session at a time (`Lease`); STOP and status never wait for it;
- artifacts must be newer than the newest promoted one from their key (`SlotStore.order_verdict`),
  must match this robot (kind, observation and action sizes) and fit the size the signed
  manifest declares; the canary is at least this agent's own minimum;
- a policy that failed its canary is rejected and never runs without an explicit `force`;
- every run is bounded (episodes, steps), clips actions, applies the fallback on late steps and
  halts the robot when it ends, is stopped, or fails.
Every fault in handling a message becomes a NACK (the request was wrong) or an ERROR (the agent
hit a fault); none ends the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Union

from device_agents import __version__
from device_agents.errors import DeviceError, ModelError
from device_agents.protocol import MAX_PAYLOAD, VERSION, Message, MsgType, ProtocolError
from device_agents.robots import Robot, parse_spec
from device_agents.sessions import Busy, Lease, Session
from device_agents.signing import KeySource, verify_artifact, verify_manifest
from device_agents.slots import SLOTS, SlotError, SlotStore

if TYPE_CHECKING:
    from device_agents.link import Link
    from device_agents.operators import Operators
    from device_agents.runtime import TFLitePolicy  # imported when a model is first loaded

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_BYTES = 8 * 1024 * 1024
DEFAULT_CANARY = {
    "episodes": 1,
    "seed": 0,
    "min_return": None,
    "max_miss_rate": None,
    "max_steps": None,
    "max_p99_ms": None,
}
# The agent's own canary floor: a sender may ask for more episodes and stricter thresholds, never
# fewer or looser (PROTOCOL.md, DEPLOY_BEGIN).
DEFAULT_CANARY_POLICY = {"episodes": 1, "max_miss_rate": 0.1, "min_return": None}
DEFAULT_MAX_EPISODES = 1000  # per RUN
DEFAULT_MAX_STEPS = 100_000  # per episode, whatever the RUN asks (a robot that never says done)
FALLBACKS = ("hold", "safe")
RECORD_ENCODING = "zlib-json"  # how a RUN's record travels (PROTOCOL.md, "The record")
MAX_PROBES = 64  # BENCH probes a session may keep at once
MAX_PROBE_BYTES = 16 * 1024 * 1024  # and their bytes

# The role a request needs; a type not listed needs none (HELLO, STATUS, PING, AUTH). STOP needs
# any authenticated operator ("status" is every operator's role, but not an anonymous session's).
REQUIRED_ROLE: dict[MsgType, str] = {
    MsgType.DEPLOY_BEGIN: "deploy",
    MsgType.DEPLOY_CHUNK: "deploy",
    MsgType.DEPLOY_END: "deploy",
    MsgType.RUN: "run",
    MsgType.BENCH: "bench",
    MsgType.ROLLBACK: "rollback",
}
# Requests that may take long (they drive the robot or time a model): a server runs them in the
# session's worker thread so that STOP, STATUS and PING are still answered meanwhile.
LONG_REQUESTS = frozenset({MsgType.DEPLOY_END, MsgType.RUN, MsgType.BENCH})


class Refused(DeviceError):
    """A request the agent declines; becomes a NACK with `reason`."""

    def __init__(self, reason: str, detail: str = "", **extra: Any):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.extra = extra


def _int(header: dict, name: str, minimum: int = 0, default: Any = ...) -> Any:
    value = header.get(name, default)
    if value is ...:
        raise Refused("bad header", f"{name} is required")
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise Refused("bad header", f"{name}={value!r} is not an integer >= {minimum}")
    return value


def _number(header: dict, name: str) -> float | None:
    value = header.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise Refused("bad header", f"{name}={value!r} is not a number")
    return float(value)


def _flag(header: dict, name: str) -> bool:
    value = header.get(name, False)
    if not isinstance(value, bool):
        raise Refused("bad header", f"{name}={value!r} is not true or false")
    return value


# What a probe's result carries back to the host (the per-round detail stays on the robot).
_PROBE_KEYS = (
    "step_us",
    "invoke_us",
    "host_step_us",
    "median_us",
    "spread_us",
    "noise",
    "raw_noise",
    "drift",
    "rounds",
    "settled",
    "warmup_steps",
    "macs",
    "model_bytes",
    "runs",
)


def _compact(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in _PROBE_KEYS if k in result}


def _section(manifest: dict, name: str) -> dict[str, Any]:
    value = manifest.get(name)
    return value if isinstance(value, dict) else {}


def _strictest(sender: float | None, floor: float | None, pick: Callable[[float, float], float]) -> Any:
    if sender is None:
        return floor
    if floor is None:
        return sender
    return pick(sender, floor)


class _Transfer:
    def __init__(
        self,
        session: Session,
        manifest: dict,
        signature: str | None,
        size: int,
        sha256: str,
        canary: dict[str, Any],
        allow_downgrade: bool,
    ):
        self.session = session
        self.manifest = manifest
        self.signature = signature
        self.size = size
        self.sha256 = sha256
        self.canary = canary
        self.allow_downgrade = allow_downgrade
        self.data = bytearray()
        self.started = time.monotonic()


Replies = Union[Message, "list[Message]"]


class Agent:
    def __init__(
        self,
        state_dir: str | Path,
        trusted_keys: Iterable[KeySource],
        robot_spec: str,
        fast: bool = False,
        agent_id: str | None = None,
        device: str | None = None,
        max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
        stall_s: float = 2.0,
        *,
        operators: Operators | None = None,
        canary_policy: dict[str, Any] | None = None,
        max_episodes: int = DEFAULT_MAX_EPISODES,
        max_steps: int = DEFAULT_MAX_STEPS,
        fallback: str = "hold",
        kind: str | None = None,
        lease_idle_s: float = 10.0,
        watchdog_s: float | None = 0.5,
    ):
        if not isinstance(max_model_bytes, int) or max_model_bytes < 1:
            raise DeviceError(f"max_model_bytes {max_model_bytes!r} is not a positive integer")
        if fallback not in FALLBACKS:
            raise DeviceError(f"fallback {fallback!r} is not one of {', '.join(FALLBACKS)}")
        self.slots = SlotStore(state_dir, trusted_keys)
        self.robot_spec = robot_spec
        self._spec = parse_spec(robot_spec)  # a bad spec fails at start-up, not at the first deploy
        if fast and not self._spec.backend.simulated:
            raise DeviceError(f"--fast is for simulated robots; {robot_spec} keeps real time")
        self.fast = fast
        self.agent_id = agent_id or "agent"
        self.device = device
        self.max_model_bytes = max_model_bytes
        self.stall_s = stall_s
        self.operators = operators
        self.canary_policy = {**DEFAULT_CANARY_POLICY, **(canary_policy or {})}
        self.max_episodes = max_episodes
        self.max_steps = max_steps
        self.fallback = fallback
        self.kind_override = kind
        self.watchdog_s = watchdog_s
        self.started = time.monotonic()
        self.stop_event = threading.Event()  # the process is shutting down (SIGTERM)
        self.lease = Lease(idle_s=lease_idle_s)
        self._run_stop: threading.Event | None = None  # set by STOP: ends the run in progress
        self._robot: Robot | None = None
        self._robot_lock = threading.Lock()
        self._policies: dict[str, TFLitePolicy] = {}  # by sha256
        self._transfer: _Transfer | None = None
        self.last_deploy: dict[str, Any] | None = None
        self.last_stop: dict[str, Any] | None = None
        self.slots.recover()

    # --- resources -------------------------------------------------------------------------
    def robot(self) -> Robot:
        with self._robot_lock:
            if self._robot is None:
                self._robot = self._spec.make(self.fast)
            return self._robot

    def robot_kind(self) -> str | None:
        return self.kind_override or getattr(self.robot(), "kind", None)

    def _policy(self, model: bytes, sha256: str, manifest: dict) -> TFLitePolicy:
        if sha256 not in self._policies:
            from device_agents.runtime import TFLitePolicy

            self._policies.clear()  # at most the model in use is kept loaded
            # the per-feature normalisation is part of the signed manifest, fused into the
            # input quantisation by the runtime
            self._policies[sha256] = TFLitePolicy(
                bytes(model), input_normalisation=manifest.get("input_normalisation")
            )
        return self._policies[sha256]

    def _slot_policy(self, slot: str) -> tuple[TFLitePolicy, dict]:
        info = self.slots.inspect(slot)
        if not info.ok or info.manifest is None:
            raise Refused("no policy", f"slot {slot} holds no verified policy ({info.verdict.reason})")
        return (self._policy(info.model_path.read_bytes(), info.sha256 or "", info.manifest), info.manifest)

    def stop_run(self, reason: str = "stop") -> bool:
        """End the run in progress (if any) within one control period; True if one was running."""
        event = self._run_stop
        if event is None:
            return False
        self.last_stop = {"reason": reason, "at_uptime_s": time.monotonic() - self.started}
        event.set()
        return True

    def shutdown(self) -> None:
        """SIGTERM: stop the run in progress (the robot is halted) and stop serving."""
        self.stop_event.set()
        self.stop_run("shutdown")

    def close(self) -> None:
        with self._robot_lock:
            if self._robot is not None:
                self._robot.close()
                self._robot = None

    # --- messages --------------------------------------------------------------------------
    def replies(self, msg: Message, session: Session | None = None) -> list[Message]:
        """Every frame answering one request: the reply, then the record frames of a RUN that
        asked for one (PROTOCOL.md, "The record")."""
        out = self._dispatch(msg, session or Session.local())
        return out if isinstance(out, list) else [out]

    def handle(self, msg: Message, session: Session | None = None) -> Message:
        """The reply to one request (the first frame, see `replies`); never raises for bad
        input. Without a session the request comes from the robot's own console (every role)."""
        return self.replies(msg, session)[0]

    def _dispatch(self, msg: Message, session: Session) -> Replies:
        handler = self._HANDLERS.get(msg.type)
        try:
            if handler is None:
                raise Refused("unexpected", f"{msg.type.name} is not a request an agent takes")
            msg.require()
            self._authorise(msg, session)
            return handler(self, msg, session)
        except Refused as e:
            return msg.reply(MsgType.NACK, {"reason": e.reason, "detail": e.detail, **e.extra})
        except Busy as e:
            return msg.reply(
                MsgType.NACK, {"reason": "busy", "detail": str(e), "holder": e.holder, "what": e.what}
            )
        except ProtocolError as e:
            return msg.reply(MsgType.NACK, {"reason": e.reason, "detail": str(e)[:500]})
        except (SlotError, ModelError) as e:
            return msg.reply(MsgType.NACK, {"reason": "refused", "detail": str(e)[:500]})
        except DeviceError as e:
            return msg.reply(MsgType.ERROR, {"reason": "device", "detail": str(e)[:500]})
        except Exception as e:  # a bug or an OS fault: report it, keep serving
            log.exception("fault handling %s", msg.type.name)
            return msg.reply(
                MsgType.ERROR, {"reason": "internal", "detail": f"{type(e).__name__}: {e}"[:500]}
            )

    @staticmethod
    def _authorise(msg: Message, session: Session) -> None:
        if msg.type == MsgType.STOP and not session.authenticated:
            raise Refused("unauthenticated", "STOP needs an authenticated operator (AUTH first)")
        role = REQUIRED_ROLE.get(msg.type)
        if role is None or session.may(role):
            return
        if not session.authenticated:
            raise Refused(
                "unauthenticated",
                f"{msg.type.name} needs an operator with the {role!r} role; "
                "authenticate first (TLS client certificate, or AUTH on a plain link)",
            )
        raise Refused("forbidden", f"operator {session.who!r} lacks the {role!r} role for {msg.type.name}")

    def _hello(self, msg: Message, session: Session) -> Message:
        header: dict[str, Any] = {
            "role": "agent",
            "protocol": VERSION,
            "agent": self.agent_id,
            "version": __version__,
            "slots": list(SLOTS),
            "active": self.slots.active,
            "device": self.device,
            "robot": self.robot_spec,
            "max_model_bytes": self.max_model_bytes,
            "auth": {
                "transport": session.transport,
                "operator": session.operator.name if session.operator is not None else None,
                "roles": session.roles(),
            },
        }
        if not session.authenticated and session.transport != "tls":
            from device_agents.operators import new_challenge

            # a fresh challenge per HELLO; only the last one handed out can be answered, once
            session.challenge = new_challenge()
            header["challenge"] = session.challenge
        return msg.reply(MsgType.HELLO, header)

    def _auth(self, msg: Message, session: Session) -> Message:
        from device_agents.operators import AuthError, verify_challenge

        if session.transport == "tls":
            raise Refused("bad header", "a TLS session is authenticated by its client certificate")
        challenge, session.challenge = session.challenge, None  # one answer per challenge
        if challenge is None:
            raise Refused("bad challenge", "send HELLO first: it carries the challenge to sign")
        if self.operators is None:
            raise Refused("no operators", "this agent trusts no operator (start it with --operators)")
        try:
            op = verify_challenge(
                self.operators, self.agent_id, challenge, msg.header["key_id"], msg.header["signature"]
            )
        except AuthError as e:
            log.warning("AUTH refused on %s %s: %s", session.transport, session.peer, e)
            raise Refused(e.reason, str(e)) from e
        session.operator = op
        log.info("operator %s authenticated on %s %s", op.name, session.transport, session.peer)
        return msg.reply(MsgType.ACK, {"operator": op.name, "roles": session.roles()})

    def _status(self, msg: Message, session: Session) -> Message:
        status = self.slots.status()
        transfer = None
        t = self._transfer
        if t is not None:
            transfer = {"size": t.size, "received": len(t.data), "sha256": t.sha256, "by": t.session.who}
        runtime: dict[str, str | None]
        try:
            from device_agents.runtime import runtime_name, runtime_version

            runtime = {"name": runtime_name(), "version": runtime_version()}
        except DeviceError as e:
            runtime = {"name": None, "error": str(e)[:200]}
        active = status["active"]
        return msg.reply(
            MsgType.STATUS,
            {
                **status,
                "active_sha256": status["slots"][active]["sha256"] if active else None,
                "uptime_s": time.monotonic() - self.started,
                "agent": self.agent_id,
                "version": __version__,
                "device": self.device,
                "robot": self.robot_spec,
                "robot_check": self._robot_check(),
                "fast": self.fast,
                "transfer": transfer,
                "runtime": runtime,
                "last_deploy": self.last_deploy,
                "lease": self.lease.describe(),
                "running": self._run_stop is not None,
                "last_stop": self.last_stop,
                "canary_policy": self.canary_policy,
                "limits": {"max_episodes": self.max_episodes, "max_steps": self.max_steps},
                "fallback": self.fallback,
                "you": {"operator": session.who, "roles": session.roles()},
            },
        )

    def _robot_check(self) -> dict:
        """Whether the robot itself answers, not only this agent: {"ok": True/False/None,
        "detail": ...}. A robot that fails is closed, so the next use opens it afresh (a serial
        device plugged back in). Not checked while a run drives it (None)."""
        if self._run_stop is not None:
            return {"ok": None, "detail": "a run is driving the robot: not checked"}
        try:
            self.robot().check()
        except Exception as e:  # noqa: BLE001  (whatever the robot raised is the answer)
            with self._robot_lock:
                robot, self._robot = self._robot, None
            if robot is not None:
                with contextlib.suppress(Exception):
                    robot.close()
            return {"ok": False, "detail": f"{type(e).__name__}: {e}"[:300]}
        return {"ok": True, "detail": self.robot_spec}

    def _ping(self, msg: Message, session: Session) -> Message:
        return msg.reply(MsgType.PONG, msg.header)

    def _stop(self, msg: Message, session: Session) -> Message:
        stopped = self.stop_run(f"STOP from {session.who}")
        log.warning("STOP from %s (%s)", session.who, "run stopped" if stopped else "nothing running")
        return msg.reply(MsgType.ACK, {"stopped": stopped, "lease": self.lease.describe()})

    # --- deploy ----------------------------------------------------------------------------
    def _drop_transfer(self) -> None:
        self._transfer = None

    def _deploy_begin(self, msg: Message, session: Session) -> Message:
        h = msg.header
        manifest, signature = h["manifest"], h["signature"]
        if not isinstance(manifest, dict):
            raise Refused("bad manifest", "manifest must be a JSON object")
        if signature is not None and not isinstance(signature, str):
            raise Refused("bad header", "signature must be a base64 string or null")
        size = _int(h, "size", 1)
        if size > self.max_model_bytes:
            raise Refused(
                "size",
                f"model of {size} bytes exceeds this agent's limit of {self.max_model_bytes} bytes",
                max_model_bytes=self.max_model_bytes,
            )
        sha = h["sha256"]
        if not isinstance(sha, str) or sha.lower() != str(manifest.get("sha256", "")).lower():
            raise Refused(
                "sha256 mismatch", f"sha256 {sha!r} differs from the manifest's {manifest.get('sha256')!r}"
            )
        canary = self._canary(h.get("canary"))
        allow_downgrade = _flag(h, "allow_downgrade")
        if allow_downgrade and not session.may("rollback"):
            raise Refused("forbidden", f"operator {session.who!r} lacks the 'rollback' role to downgrade")
        verdict = verify_manifest(manifest, signature, self.slots.keys)
        if not verdict.ok:
            raise Refused(verdict.reason, verdict.detail)
        declared = manifest.get("model_size")
        if declared is not None and declared != size:
            raise Refused("size", f"transfer of {size} bytes, the signed manifest says {declared!r}")
        if not allow_downgrade:
            ok, reason, detail = self.slots.order_verdict(manifest, verdict.key_id or "")
            if not ok:
                raise Refused(reason, detail)
        self._check_manifest_fits(manifest)
        # the lease: an open transfer holds the robot until it ends or idles past lease.idle_s
        self.lease.acquire(session, "deploy", expiring=True)
        self.lease.on_expire = self._drop_transfer
        self._transfer = _Transfer(session, manifest, signature, size, sha.lower(), canary, allow_downgrade)
        return msg.reply(MsgType.ACK, {"next_offset": 0, "slot": self.slots.standby(), "canary": canary})

    def _canary(self, raw: Any) -> dict[str, Any]:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise Refused(
                "bad header",
                "canary must be an object {episodes, seed, min_return, max_miss_rate, max_steps}",
            )
        nested = raw.get("thresholds")
        if nested is not None and not isinstance(nested, dict):
            raise Refused("bad header", "canary.thresholds must be an object")
        raw = {**(nested or {}), **raw}  # flat keys win over the nested `thresholds` object
        floor = self.canary_policy
        episodes = _int(raw, "episodes", 0, DEFAULT_CANARY["episodes"])
        max_steps = _int(raw, "max_steps", 1, None)
        return {
            # the sender may ask for more and for stricter, never for less than this agent's floor
            "episodes": max(episodes, int(floor["episodes"])),
            "seed": _int(raw, "seed", 0, 0),
            "min_return": _strictest(_number(raw, "min_return"), floor.get("min_return"), max),
            "max_miss_rate": _strictest(_number(raw, "max_miss_rate"), floor.get("max_miss_rate"), min),
            "max_steps": min(max_steps or self.max_steps, self.max_steps),
            "max_p99_ms": _number(raw, "max_p99_ms"),
        }

    def _owned_transfer(self, session: Session, what: str) -> _Transfer:
        t = self._transfer
        if t is None or t.session is not session or not self.lease.holds(session):
            raise Refused("no transfer", f"{what} without an open DEPLOY_BEGIN of this session")
        return t

    def _deploy_chunk(self, msg: Message, session: Session) -> Message:
        t = self._owned_transfer(session, "DEPLOY_CHUNK")
        self.lease.touch(session)
        offset = _int(msg.header, "offset", 0)
        if offset != len(t.data):
            raise Refused("offset", f"chunk at {offset}, expected {len(t.data)}", next_offset=len(t.data))
        if offset + len(msg.payload) > t.size:
            raise Refused(
                "size",
                f"chunk ends at {offset + len(msg.payload)}, past the declared size {t.size}",
                next_offset=len(t.data),
            )
        t.data += msg.payload
        return msg.reply(MsgType.ACK, {"next_offset": len(t.data)})

    def _deploy_end(self, msg: Message, session: Session) -> Message:
        t = self._owned_transfer(session, "DEPLOY_END")
        if len(t.data) != t.size:
            self.lease.touch(session)  # the host may still send the missing chunks
            raise Refused("size", f"received {len(t.data)} of {t.size} bytes", next_offset=len(t.data))
        self._transfer = None
        # from here the canary drives the robot: the lease no longer expires while it runs
        self.lease.acquire(session, "canary")
        try:
            return self._finish_deploy(msg, t)
        finally:
            self.lease.release(session)

    def _finish_deploy(self, msg: Message, t: _Transfer) -> Message:
        model = bytes(t.data)
        verdict = verify_artifact(t.manifest, t.signature, model, self.slots.keys)
        if not verdict.ok:
            raise Refused(verdict.reason, verdict.detail)
        try:
            policy = self._policy(model, t.sha256, t.manifest)
        except ModelError as e:
            raise Refused("bad model", str(e)[:300]) from e
        self._check_fits(policy, t.manifest)
        transfer_s = time.monotonic() - t.started
        slot = self.slots.write_standby(model, t.manifest, t.signature)
        report = None
        failures: list[str] = []
        if t.canary["episodes"] > 0:
            report = self._run(
                policy,
                t.manifest,
                t.canary["episodes"],
                t.canary["seed"],
                t.canary["max_steps"],
                slot,
                t.sha256,
            )
            failures = self._judge(report, t.canary)
        result = {
            "slot": slot,
            "sha256": t.sha256,
            "canary": report,
            "transfer_s": transfer_s,
            "canary_thresholds": t.canary,
        }
        if failures:
            self.slots.mark_rejected(slot, "; ".join(failures))
            self.last_deploy = dict(result, promoted=False, failures=failures)
            return msg.reply(
                MsgType.NACK,
                {"reason": "canary", "detail": "; ".join(failures), **result, "active": self.slots.active},
            )
        self.slots.commit(slot, allow_downgrade=t.allow_downgrade)
        self.last_deploy = dict(result, promoted=True)
        return msg.reply(MsgType.ACK, {**result, "active": self.slots.active})

    def _check_manifest_fits(self, manifest: dict) -> None:
        """Refuse, before any byte is sent, an artifact made for another robot: its env (the
        robot's kind) and the observation and action sizes its signed manifest declares."""
        robot = self.robot()
        kind = self.robot_kind()
        env_id = manifest.get("env_id")
        if kind is None:
            raise Refused(
                "mismatch",
                f"this agent does not know what robot {self.robot_spec} is; start it with --kind ENV_ID "
                "(or have the MCU announce kind= in its hello)",
            )
        if env_id != kind:
            raise Refused("mismatch", f"artifact is for {env_id!r}; this robot is {kind!r}")
        obs = _section(manifest, "observation")
        frame = obs.get("frame_shape")
        if isinstance(frame, list) and all(isinstance(v, int) for v in frame):
            n = 1
            for v in frame:
                n *= v
            if n != robot.observation_size:
                raise Refused(
                    "mismatch",
                    f"artifact observes {n} values a frame; this robot gives {robot.observation_size}",
                )
        action = _section(manifest, "action")
        shape = action.get("shape")
        if (
            action.get("output") != "index"
            and isinstance(shape, list)
            and all(isinstance(v, int) for v in shape)
        ):
            n = 1
            for v in shape:
                n *= v
            if n != robot.action_size:
                raise Refused(
                    "mismatch", f"artifact acts with {n} values; this robot takes {robot.action_size}"
                )

    def _check_fits(self, policy: TFLitePolicy, manifest: dict) -> None:
        from device_agents.control_loop import policy_settings

        robot = self.robot()
        s = policy_settings(manifest)
        in_size = int(policy.input.size)
        want = robot.observation_size * s["history"]
        if in_size != want:
            raise Refused(
                "mismatch",
                f"model input has {in_size} values; the robot observes "
                f"{robot.observation_size} x history {s['history']} = {want}",
            )
        out_size = int(policy.output.size)
        want_out = 1 if s["action_output"] == "index" else robot.action_size
        if out_size != want_out:
            raise Refused("mismatch", f"model output has {out_size} values; the robot takes {want_out}")

    # --- running ---------------------------------------------------------------------------
    @staticmethod
    def _action_limits(manifest: dict) -> tuple[Any, Any]:
        """The manifest's action limits (the index range for a discrete policy), or Nones."""
        action = _section(manifest, "action")
        if action.get("output") == "index":
            n = action.get("n")
            return ([0], [n - 1]) if isinstance(n, int) and n >= 1 else ([0], None)
        low, high = action.get("low"), action.get("high")
        return (low if isinstance(low, list) else None, high if isinstance(high, list) else None)

    def _run(
        self,
        policy: TFLitePolicy,
        manifest: dict,
        episodes: int,
        seed: int,
        max_steps: int | None,
        slot: str | None,
        sha256: str | None,
        record: bool = False,
    ) -> dict[str, Any]:
        from device_agents.control_loop import policy_settings, run_episodes

        s = policy_settings(manifest)
        low, high = self._action_limits(manifest)
        stop = threading.Event()
        if self.stop_event.is_set():
            stop.set()
        self._run_stop = stop
        try:
            return run_episodes(
                policy,
                self.robot(),
                episodes,
                seed,
                min(max_steps or self.max_steps, self.max_steps),
                s["history"],
                self.fast,
                control_hz=s["control_hz"],
                history_pad=s["history_pad"],
                action_output=s["action_output"],
                slot=slot,
                sha256=sha256,
                record=record,
                stop=stop,
                action_low=low,
                action_high=high,
                fallback=self.fallback,
                watchdog_s=self.watchdog_s,
            )
        except DeviceError:
            self.close()  # a robot that failed mid-episode is rebuilt for the next request
            raise
        finally:
            self._run_stop = None

    @staticmethod
    def _judge(report: dict[str, Any], thresholds: dict[str, Any]) -> list[str]:
        failures = []
        if report.get("stopped"):
            failures.append(f"stopped: {report['stopped']}")
        if report["nonfinite_actions"]:
            failures.append(f"{report['nonfinite_actions']} NaN/inf actions")
        max_miss = thresholds.get("max_miss_rate")
        if max_miss is not None and report["miss_rate"] > max_miss:
            failures.append(f"deadline miss rate {report['miss_rate']:.3f} > {max_miss}")
        min_ret = thresholds.get("min_return")
        if min_ret is not None and report["mean_return"] is not None and report["mean_return"] < min_ret:
            failures.append(f"mean return {report['mean_return']:.4g} < {min_ret}")
        max_p99 = thresholds.get("max_p99_ms")
        if max_p99 is not None and report["timings_ms"]["p99"] > max_p99:
            failures.append(f"p99 latency {report['timings_ms']['p99']:.3f} ms > {max_p99}")
        return failures

    def _pick_slot(self, header: dict) -> str:
        slot = header.get("slot", "active")
        if slot == "active":
            if self.slots.active is None:
                raise Refused("no policy", "this agent has no active policy; deploy one first")
            return self.slots.active
        if slot not in SLOTS:
            raise Refused("bad header", f"slot {slot!r} is not one of active, {', '.join(SLOTS)}")
        return slot

    def _run_request(self, msg: Message, session: Session) -> Replies:
        h = msg.header
        episodes = _int(h, "episodes", 1)
        if episodes > self.max_episodes:
            raise Refused(
                "bad header", f"episodes={episodes} is over this agent's limit of {self.max_episodes}"
            )
        seed = _int(h, "seed", 0)
        max_steps = _int(h, "max_steps", 1, None)
        if max_steps is not None and max_steps > self.max_steps:
            raise Refused(
                "bad header", f"max_steps={max_steps} is over this agent's limit of {self.max_steps}"
            )
        thresholds = h.get("thresholds") or {}
        if not isinstance(thresholds, dict):
            raise Refused("bad header", "thresholds must be an object")
        thresholds = {k: _number(thresholds, k) for k in ("min_return", "max_miss_rate", "max_p99_ms")}
        record = _flag(h, "record")
        force = _flag(h, "force")
        if force and not session.may("deploy"):
            raise Refused("forbidden", f"operator {session.who!r} lacks the 'deploy' role to force a run")
        slot = self._pick_slot(h)
        try:
            self.slots.runnable(slot, force)
        except SlotError as e:
            raise Refused("rejected", str(e)) from e
        policy, manifest = self._slot_policy(slot)
        self.lease.acquire(session, "run")
        try:
            report = self._run(
                policy, manifest, episodes, seed, max_steps, slot, manifest.get("sha256"), record
            )
        finally:
            self.lease.release(session)
        failures = self._judge(report, thresholds)
        header = {
            **report,
            "passed": not failures,
            "failures": failures,
            "agent": self.agent_id,
            "device": self.device,
            "operator": session.who,
        }
        if not record:
            return msg.reply(MsgType.REPORT, header)
        parts = self._record_parts(header.pop("record"))
        header["record_wire"] = {
            "encoding": RECORD_ENCODING,
            "size": sum(len(p) for p in parts),
            "sha256": hashlib.sha256(b"".join(parts)).hexdigest(),
            "frames": len(parts),
        }
        more = [
            msg.reply(MsgType.REPORT, {"record_part": i, "record_frames": len(parts)}, part)
            for i, part in enumerate(parts[1:], 1)
        ]
        return [msg.reply(MsgType.REPORT, header, parts[0]), *more]

    @staticmethod
    def _record_parts(record: dict[str, Any]) -> list[bytes]:
        """The record on the wire: zlib of its compact UTF-8 JSON, cut into payload-sized parts."""
        data = zlib.compress(json.dumps(record, separators=(",", ":")).encode("utf-8"), 6)
        return [data[i : i + MAX_PAYLOAD] for i in range(0, len(data), MAX_PAYLOAD)] or [b""]

    def _bench(self, msg: Message, session: Session) -> Message:
        from device_agents.bench import bench_model

        h = msg.header
        runs = _int(h, "runs", 1)
        warmup = _int(h, "warmup", 0, 50)
        if runs > 100_000 or warmup > 10_000:
            raise Refused("bad header", f"runs {runs} / warmup {warmup} over 100000 / 10000")
        if _flag(h, "clear"):
            session.probes.clear()
            return msg.reply(MsgType.ACK, {"probes": 0})
        if _flag(h, "keep"):
            return self._keep_probe(msg, session)
        if "probes" in h:
            return self._bench_probes(msg, session)
        self.lease.acquire(session, "bench")
        try:
            if "size" in h:
                # An inline probe model (latency calibration): timed, never stored, slots
                # untouched; only an operator with the bench role may send one. It must fit one
                # frame; bigger models are benchmarked after a deploy, by slot.
                sha = self._inline_model(msg)
                result = self._robot_timing(bench_model(bytes(msg.payload), runs=runs, warmup=warmup))
                return msg.reply(
                    MsgType.REPORT,
                    {
                        "bench": result,
                        "slot": None,
                        "sha256": sha,
                        "agent": self.agent_id,
                        "device": self.device,
                    },
                )
            slot = self._pick_slot(h)
            info = self.slots.inspect(slot)
            if not info.ok:
                raise Refused("no policy", f"slot {slot} holds no verified policy")
            result = self._robot_timing(bench_model(info.model_path.read_bytes(), runs=runs, warmup=warmup))
        finally:
            self.lease.release(session)
        return msg.reply(
            MsgType.REPORT,
            {
                "bench": result,
                "slot": slot,
                "sha256": info.sha256,
                "agent": self.agent_id,
                "device": self.device,
            },
        )

    @staticmethod
    def _inline_model(msg: Message) -> str:
        size, sha = _int(msg.header, "size", 1), msg.header.get("sha256")
        if size != len(msg.payload):
            raise Refused("mismatch", f"size {size} but {len(msg.payload)} payload bytes")
        if sha != hashlib.sha256(msg.payload).hexdigest():
            raise Refused("mismatch", "sha256 of the inline model does not match")
        return str(sha)

    def _keep_probe(self, msg: Message, session: Session) -> Message:
        """BENCH `keep`: hold an inline probe model for a later interleaved BENCH `probes` of the
        same session (PROTOCOL.md, BENCH). Bounded per session; dropped with the session."""
        sha = self._inline_model(msg)
        kept = sum(len(m) for m in session.probes.values())
        if sha not in session.probes and (
            len(session.probes) >= MAX_PROBES or kept + len(msg.payload) > MAX_PROBE_BYTES
        ):
            raise Refused(
                "size", f"this session already holds {len(session.probes)} probes ({kept} bytes); clear them"
            )
        session.probes[sha] = bytes(msg.payload)
        return msg.reply(MsgType.ACK, {"kept": sha, "probes": len(session.probes)})

    def _bench_probes(self, msg: Message, session: Session) -> Message:
        """BENCH `probes`: the kept probes measured together, in interleaved rounds
        (device_agents.timing), each with its noise figure, and the overall noise verdict."""
        from device_agents.bench import bench_models, overall_verdict

        h = msg.header
        wanted = h.get("probes")
        if not isinstance(wanted, list) or not wanted or not all(isinstance(x, str) for x in wanted):
            raise Refused("bad header", "probes must be a non-empty list of kept sha256s")
        missing = [x for x in wanted if x not in session.probes]
        if missing:
            raise Refused(
                "no probe", f"{len(missing)} probe(s) not kept in this session: {missing[0][:12]}..."
            )
        rounds = _int(h, "rounds", 1, 15)
        per_round = _int(h, "per_round", 1, 40)
        if rounds * per_round * len(wanted) > 400_000:
            raise Refused(
                "bad header", f"{rounds} rounds x {per_round} steps x {len(wanted)} probes is too long"
            )
        self.lease.acquire(session, "bench")
        try:
            results = bench_models(
                {sha: session.probes[sha] for sha in wanted}, rounds=rounds, per_round=per_round
            )
        finally:
            self.lease.release(session)
        timed = {sha: _compact(self._robot_timing(r)) for sha, r in results.items()}
        # the results travel as the payload (JSON): 64 probes' figures outgrow a 16 KiB header
        body = json.dumps(timed, separators=(",", ":"), allow_nan=False).encode("utf-8")
        if len(body) > MAX_PAYLOAD:
            raise Refused(
                "size", f"results of {len(wanted)} probes are {len(body)} bytes; bench fewer at once"
            )
        header = {
            "probes_wire": "json",
            "noise_verdict": overall_verdict(results),
            "agent": self.agent_id,
            "device": self.device,
        }
        return msg.reply(MsgType.REPORT, header, body)

    def _robot_timing(self, result: dict[str, Any]) -> dict[str, Any]:
        """BENCH on a sim twin reports its emulated computer's step time, as RUN does (the
        mapping is increasing, so it carries every percentile); `host_step_us` keeps this
        machine's. A physical robot runs the agent itself: its figures are already the answer,
        and BENCH does not open its port."""
        if not self._spec.backend.simulated:
            return result
        robot = self.robot()
        robot.bind_policy(SimpleNamespace(macs=result.get("macs")))  # all bind_policy reads
        host = result["step_us"]
        out = {
            **result,
            "host_step_us": host,
            "step_us": {k: robot.compute_time(v / 1e6) * 1e6 for k, v in host.items()},
        }
        median, spread = result.get("median_us", host.get("p50")), result.get("spread_us")
        if isinstance(median, (int, float)) and isinstance(spread, (int, float)) and median > 0:
            # the emulated computer's spread: the same rounds seen through its (increasing) clock
            lo, hi = robot.compute_time(median / 1e6) * 1e6, robot.compute_time((median + spread) / 1e6) * 1e6
            # (the relative noise stays the host's: it is the measurement's, not the mapping's)
            out.update(host_median_us=median, host_spread_us=spread, median_us=lo, spread_us=hi - lo)
        return out

    def _rollback(self, msg: Message, session: Session) -> Message:
        self.lease.acquire(session, "rollback")
        try:
            slot = self.slots.rollback()
        except SlotError as e:
            raise Refused("no previous", str(e)) from e
        finally:
            self.lease.release(session)
        return msg.reply(MsgType.ACK, {"active": slot, "sha256": self.slots.state.get("active_sha256")})

    _HANDLERS: ClassVar[dict[MsgType, Callable[[Agent, Message, Session], Replies]]] = {
        MsgType.HELLO: _hello,
        MsgType.AUTH: _auth,
        MsgType.STATUS: _status,
        MsgType.PING: _ping,
        MsgType.STOP: _stop,
        MsgType.DEPLOY_BEGIN: _deploy_begin,
        MsgType.DEPLOY_CHUNK: _deploy_chunk,
        MsgType.DEPLOY_END: _deploy_end,
        MsgType.RUN: _run_request,
        MsgType.BENCH: _bench,
        MsgType.ROLLBACK: _rollback,
    }

    # --- serving (device_agents.server) -----------------------------------------------------
    def serve_link(self, link: Link, session: Session | None = None) -> None:
        """Answer requests on one link until it closes (or `stop_event` is set)."""
        from device_agents.server import serve_session

        serve_session(self, link, session or Session("serial", "link", link))

    def serve(
        self,
        listen_url: str | None = None,
        link_url: str | None = None,
        ready: Callable[[str], None] | None = None,
        tls: Any = None,
        max_sessions: int = 8,
    ) -> None:
        """Serve a TCP/TLS listener (many sessions) or a link URL (reopened when it drops)."""
        from device_agents.server import serve_link_url, serve_listener

        if listen_url is not None and link_url is None:
            serve_listener(self, listen_url, ready, tls=tls, max_sessions=max_sessions)
        elif link_url is not None and listen_url is None:
            serve_link_url(self, link_url, ready)
        else:
            raise DeviceError(
                "serve needs exactly one of listen_url (tls://HOST:PORT, or tcp://127.0.0.1:PORT) or "
                "link_url (serial device or pyserial URL)"
            )
