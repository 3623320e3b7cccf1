"""The on-robot agent: serves the wire protocol (PROTOCOL.md), keeps the A/B model slots, runs
canary episodes before it promotes a model, and reports timings and returns.

Leans on `device_agents.protocol` (frames), `device_agents.link` (TCP listener, pyserial URLs),
`device_agents.signing` (sha256 + Ed25519), `device_agents.slots` (atomic A/B slots),
`device_agents.runtime` (the TFLite interpreter) and `device_agents.control_loop`.

One conversation at a time, one request -> one reply (a RUN that asks for its record gets the
reply and the record's remaining frames, `replies`). The agent reads with its own persistent
`FrameReader` rather than `read_message`, so that bytes after a bad frame are never lost and a
frame that stalls half-way (a truncated frame) is given up after `stall_s` without a reply
timeout tearing a slow, legitimate serial frame. Every fault in handling a message becomes a
NACK (the request was wrong) or an ERROR (the agent hit a fault); none ends the process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from device_agents import __version__
from device_agents.errors import DeviceError, ModelError
from device_agents.link import Link, LinkError, listen, open_link
from device_agents.protocol import (
    MAX_PAYLOAD,
    VERSION,
    BadPrefixCRC,
    FrameReader,
    Message,
    MsgType,
    ProtocolError,
)
from device_agents.robots import Robot, parse_spec
from device_agents.signing import KeySource, verify_artifact, verify_manifest
from device_agents.slots import SLOTS, SlotError, SlotStore

if TYPE_CHECKING:
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
RECORD_ENCODING = "zlib-json"  # how a RUN's record travels (PROTOCOL.md, "The record")
POLL_S = 0.25  # read timeout of the serve loop (how often it looks at the stop flag)
_NACK_BUDGET = 50  # protocol-error NACKs per second at most (garbage must not flood the link)


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


class _Transfer:
    def __init__(self, manifest: dict, signature: str | None, size: int, sha256: str, canary: dict[str, Any]):
        self.manifest = manifest
        self.signature = signature
        self.size = size
        self.sha256 = sha256
        self.canary = canary
        self.data = bytearray()
        self.started = time.monotonic()


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
    ):
        if not isinstance(max_model_bytes, int) or max_model_bytes < 1:
            raise DeviceError(f"max_model_bytes {max_model_bytes!r} is not a positive integer")
        self.slots = SlotStore(state_dir, trusted_keys)
        self.robot_spec = robot_spec
        self._spec = parse_spec(robot_spec)  # a bad spec fails at start-up, not at the first deploy
        self.fast = fast
        self.agent_id = agent_id or "agent"
        self.device = device
        self.max_model_bytes = max_model_bytes
        self.stall_s = stall_s
        self.started = time.monotonic()
        self.stop_event = threading.Event()
        self._robot: Robot | None = None
        self._policies: dict[str, TFLitePolicy] = {}  # by sha256
        self._transfer: _Transfer | None = None
        self.last_deploy: dict[str, Any] | None = None
        self._more: list[Message] = []  # frames that follow the reply being sent (a record)
        self.slots.recover()

    # --- resources -------------------------------------------------------------------------
    def robot(self) -> Robot:
        if self._robot is None:
            self._robot = self._spec.make(self.fast)
        return self._robot

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

    def close(self) -> None:
        if self._robot is not None:
            self._robot.close()
            self._robot = None

    # --- messages --------------------------------------------------------------------------
    def replies(self, msg: Message) -> list[Message]:
        """Every frame answering one request: the reply, then the record frames of a RUN that
        asked for one (PROTOCOL.md, "The record")."""
        first = self.handle(msg)
        more, self._more = self._more, []
        return [first, *more]

    def handle(self, msg: Message) -> Message:
        """The reply to one request; never raises for bad input. Frames that must follow it
        (`replies`) are left in `_more`."""
        self._more = []
        handler = self._HANDLERS.get(msg.type)
        try:
            if handler is None:
                raise Refused("unexpected", f"{msg.type.name} is not a request an agent takes")
            msg.require()
            return handler(self, msg)
        except Refused as e:
            return msg.reply(MsgType.NACK, {"reason": e.reason, "detail": e.detail, **e.extra})
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

    def _hello(self, msg: Message) -> Message:
        return msg.reply(
            MsgType.HELLO,
            {
                "role": "agent",
                "protocol": VERSION,
                "agent": self.agent_id,
                "version": __version__,
                "slots": list(SLOTS),
                "active": self.slots.active,
                "device": self.device,
                "robot": self.robot_spec,
                "max_model_bytes": self.max_model_bytes,
            },
        )

    def _status(self, msg: Message) -> Message:
        status = self.slots.status()
        transfer = None
        if self._transfer is not None:
            transfer = {
                "size": self._transfer.size,
                "received": len(self._transfer.data),
                "sha256": self._transfer.sha256,
            }
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
                "fast": self.fast,
                "transfer": transfer,
                "runtime": runtime,
                "last_deploy": self.last_deploy,
            },
        )

    def _ping(self, msg: Message) -> Message:
        return msg.reply(MsgType.PONG, msg.header)

    def _deploy_begin(self, msg: Message) -> Message:
        self._transfer = None  # a new BEGIN abandons any open transfer
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
        verdict = verify_manifest(manifest, signature, self.slots.keys)
        if not verdict.ok:
            raise Refused(verdict.reason, verdict.detail)
        self._transfer = _Transfer(manifest, signature, size, sha.lower(), canary)
        return msg.reply(MsgType.ACK, {"next_offset": 0, "slot": self.slots.standby()})

    @staticmethod
    def _canary(raw: Any) -> dict[str, Any]:
        if raw is None:
            return dict(DEFAULT_CANARY)
        if not isinstance(raw, dict):
            raise Refused(
                "bad header",
                "canary must be an object {episodes, seed, min_return, max_miss_rate, max_steps}",
            )
        nested = raw.get("thresholds")
        if nested is not None and not isinstance(nested, dict):
            raise Refused("bad header", "canary.thresholds must be an object")
        raw = {**(nested or {}), **raw}  # flat keys win over the nested `thresholds` object
        return {
            "episodes": _int(raw, "episodes", 0, DEFAULT_CANARY["episodes"]),
            "seed": _int(raw, "seed", 0, 0),
            "min_return": _number(raw, "min_return"),
            "max_miss_rate": _number(raw, "max_miss_rate"),
            "max_steps": _int(raw, "max_steps", 1, None),
            "max_p99_ms": _number(raw, "max_p99_ms"),
        }

    def _deploy_chunk(self, msg: Message) -> Message:
        t = self._transfer
        if t is None:
            raise Refused("no transfer", "DEPLOY_CHUNK without an open DEPLOY_BEGIN")
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

    def _deploy_end(self, msg: Message) -> Message:
        t, self._transfer = self._transfer, None
        if t is None:
            raise Refused("no transfer", "DEPLOY_END without an open DEPLOY_BEGIN")
        if len(t.data) != t.size:
            self._transfer = t  # the host may still send the missing chunks
            raise Refused("size", f"received {len(t.data)} of {t.size} bytes", next_offset=len(t.data))
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
            self.last_deploy = dict(result, promoted=False, failures=failures)
            return msg.reply(
                MsgType.NACK,
                {"reason": "canary", "detail": "; ".join(failures), **result, "active": self.slots.active},
            )
        self.slots.commit(slot)
        self.last_deploy = dict(result, promoted=True)
        return msg.reply(MsgType.ACK, {**result, "active": self.slots.active})

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
        try:
            return run_episodes(
                policy,
                self.robot(),
                episodes,
                seed,
                max_steps,
                s["history"],
                self.fast,
                control_hz=s["control_hz"],
                history_pad=s["history_pad"],
                action_output=s["action_output"],
                slot=slot,
                sha256=sha256,
                record=record,
            )
        except DeviceError:
            self.close()  # a robot that failed mid-episode is rebuilt for the next request
            raise

    @staticmethod
    def _judge(report: dict[str, Any], thresholds: dict[str, Any]) -> list[str]:
        failures = []
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

    def _run_request(self, msg: Message) -> Message:
        h = msg.header
        episodes = _int(h, "episodes", 1)
        seed = _int(h, "seed", 0)
        max_steps = _int(h, "max_steps", 1, None)
        thresholds = h.get("thresholds") or {}
        if not isinstance(thresholds, dict):
            raise Refused("bad header", "thresholds must be an object")
        thresholds = {k: _number(thresholds, k) for k in ("min_return", "max_miss_rate", "max_p99_ms")}
        record = h.get("record", False)
        if not isinstance(record, bool):
            raise Refused("bad header", f"record={record!r} is not true or false")
        slot = self._pick_slot(h)
        policy, manifest = self._slot_policy(slot)
        report = self._run(policy, manifest, episodes, seed, max_steps, slot, manifest.get("sha256"), record)
        failures = self._judge(report, thresholds)
        header = {
            **report,
            "passed": not failures,
            "failures": failures,
            "agent": self.agent_id,
            "device": self.device,
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
        self._more = [
            msg.reply(MsgType.REPORT, {"record_part": i, "record_frames": len(parts)}, part)
            for i, part in enumerate(parts[1:], 1)
        ]
        return msg.reply(MsgType.REPORT, header, parts[0])

    @staticmethod
    def _record_parts(record: dict[str, Any]) -> list[bytes]:
        """The record on the wire: zlib of its compact UTF-8 JSON, cut into payload-sized parts."""
        data = zlib.compress(json.dumps(record, separators=(",", ":")).encode("utf-8"), 6)
        return [data[i : i + MAX_PAYLOAD] for i in range(0, len(data), MAX_PAYLOAD)] or [b""]

    def _bench(self, msg: Message) -> Message:
        from device_agents.bench import bench_model

        h = msg.header
        runs = _int(h, "runs", 1)
        warmup = _int(h, "warmup", 0, 50)
        if runs > 100_000 or warmup > 10_000:
            raise Refused("bad header", f"runs {runs} / warmup {warmup} over 100000 / 10000")
        if "size" in h:
            # An inline probe model (latency calibration): timed, never stored, slots untouched.
            # It must fit one frame; bigger models are benchmarked after a deploy, by slot.
            size, sha = _int(h, "size", 1), h.get("sha256")
            if size != len(msg.payload):
                raise Refused("mismatch", f"size {size} but {len(msg.payload)} payload bytes")
            if sha != hashlib.sha256(msg.payload).hexdigest():
                raise Refused("mismatch", "sha256 of the inline model does not match")
            result = self._robot_timing(bench_model(bytes(msg.payload), runs=runs, warmup=warmup))
            return msg.reply(
                MsgType.REPORT,
                {"bench": result, "slot": None, "sha256": sha, "agent": self.agent_id, "device": self.device},
            )
        slot = self._pick_slot(h)
        info = self.slots.inspect(slot)
        if not info.ok:
            raise Refused("no policy", f"slot {slot} holds no verified policy")
        result = self._robot_timing(bench_model(info.model_path.read_bytes(), runs=runs, warmup=warmup))
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
        return {
            **result,
            "host_step_us": host,
            "step_us": {k: robot.compute_time(v / 1e6) * 1e6 for k, v in host.items()},
        }

    def _rollback(self, msg: Message) -> Message:
        try:
            slot = self.slots.rollback()
        except SlotError as e:
            raise Refused("no previous", str(e)) from e
        return msg.reply(MsgType.ACK, {"active": slot, "sha256": self.slots.state.get("active_sha256")})

    _HANDLERS: ClassVar[dict[MsgType, Callable[[Agent, Message], Message]]] = {
        MsgType.HELLO: _hello,
        MsgType.STATUS: _status,
        MsgType.PING: _ping,
        MsgType.DEPLOY_BEGIN: _deploy_begin,
        MsgType.DEPLOY_CHUNK: _deploy_chunk,
        MsgType.DEPLOY_END: _deploy_end,
        MsgType.RUN: _run_request,
        MsgType.BENCH: _bench,
        MsgType.ROLLBACK: _rollback,
    }

    # --- serving ---------------------------------------------------------------------------
    def serve_link(self, link: Link) -> None:
        """Answer requests on one link until it closes (or `stop_event` is set)."""
        reader = FrameReader()
        stream = link.stream
        last_rx = time.monotonic()
        budget, budget_t = _NACK_BUDGET, time.monotonic()
        while not self.stop_event.is_set():
            stream.timeout = POLL_S
            try:
                data = stream.read(reader.needed())
            except (LinkError, OSError) as e:
                log.info("link closed: %s", e)
                return
            now = time.monotonic()
            if data:
                last_rx = now
                events = reader.events(data)
            elif reader.buffered and now - last_rx > self.stall_s:
                # a frame stalled half-way: give it up by one byte and rescan what is held
                reader.skip_byte()
                last_rx = now
                events = reader.events()
            else:
                continue
            for ev in events:
                if isinstance(ev, Message):
                    replies = self.replies(ev)
                else:
                    if now - budget_t >= 1.0:
                        budget, budget_t = _NACK_BUDGET, now
                    if budget <= 0 or isinstance(ev, BadPrefixCRC):
                        continue  # resync noise, or a flood: drop without a reply
                    budget -= 1
                    replies = [Message(MsgType.NACK, {"reason": ev.reason, "detail": str(ev)[:200]})]
                try:
                    for reply in replies:
                        link.send(reply)
                except (LinkError, OSError) as e:
                    log.info("cannot reply (%s); dropping the link", e)
                    return

    def serve(
        self,
        listen_url: str | None = None,
        link_url: str | None = None,
        ready: Callable[[str], None] | None = None,
    ) -> None:
        """Serve a TCP listener (one host at a time) or a link URL (reopened when it drops)."""
        if listen_url is not None and link_url is None:
            self._serve_listener(listen_url, ready)
        elif link_url is not None and listen_url is None:
            self._serve_link_url(link_url, ready)
        else:
            raise DeviceError(
                "serve needs exactly one of listen_url (tcp://HOST:PORT) or "
                "link_url (serial device or pyserial URL)"
            )

    def _serve_listener(self, listen_url: str, ready: Callable[[str], None] | None) -> None:
        with listen(listen_url) as listener:
            if ready:
                ready(f"listening on {listener.url}")
            while not self.stop_event.is_set():
                try:
                    link = listener.accept(timeout_s=POLL_S)
                except LinkError:
                    continue
                with link:
                    self.serve_link(link)
                self._transfer = None  # a deploy cut off with the link is abandoned

    def _serve_link_url(self, link_url: str, ready: Callable[[str], None] | None) -> None:
        announced = False
        while not self.stop_event.is_set():
            try:
                link = open_link(link_url)
            except LinkError as e:
                log.warning("cannot open %s (%s); retrying", link_url, e)
                self.stop_event.wait(1.0)
                continue
            if not announced and ready:
                ready(f"serving on {link_url}")
                announced = True
            with link:
                self.serve_link(link)
            self._transfer = None
            self.stop_event.wait(0.2)
