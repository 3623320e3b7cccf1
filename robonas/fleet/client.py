"""One host-side session with one robot agent over one link: hello, status, ping, deploy, run,
bench, rollback.

Leans on `device_agents.link` (pyserial's `serial_for_url` for serial ports, TCP, rfc2217 and
`loop://`) and `device_agents.protocol` (the frame codec the agent runs too), and on
`robonas.export.artifact.load_artifact` for reading an artifact directory. Nothing about framing is
done here; this module only sequences the messages of PROTOCOL.md and sizes timeouts.

Timeouts: every request waits the link's base timeout plus twice the wire time of the frames on
a serial line (`Link.frame_timeout_s`), so a 16 KiB chunk at 115200 baud gets ~2.8 s more than
over TCP. Requests that make the agent run episodes (the canary at DEPLOY_END, RUN) also get
`episode_timeout_s` per episode, and BENCH gets `bench_timeout_s` per thousand runs.

Failures come in two kinds, because a rollout treats them differently:
- `LinkFailure` (a `FleetError`): the link could not be opened, dropped, timed out or carried
  garbage. Nothing is known about the far end's state; the operation may be retried.
- a refusal: the agent answered NACK or ERROR. `deploy` returns it as a `DeployResult` with
  `ok=False` and the agent's reason; the other calls raise `AgentRefused` (a `FleetError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agents.errors import DeviceError
from device_agents.protocol import DEFAULT_CHUNK, MAX_FRAME, MAX_PAYLOAD, PREFIX_SIZE, Message, MsgType
from robonas.errors import ConfigError, RobonasError

if TYPE_CHECKING:
    from device_agents.link import Link
    from robonas.credentials import HostCredentials
    from robonas.fleet.inventory import AgentEntry

PROTOCOL_VERSION = 1
DEFAULT_EPISODE_TIMEOUT_S = 60.0  # one canary/run episode; a 1000-step episode at 20 Hz is 50 s
DEFAULT_BENCH_TIMEOUT_S = 10.0  # per thousand BENCH runs, beyond the base timeout
_HEADER_ALLOWANCE = 512  # bytes of JSON header that travel with a chunk and its ACK
_MAX_RESYNCS = 3  # NACK "offset" with next_offset: resume from there at most this often
RECORD_ENCODING = "zlib-json"  # device_agents.agent.RECORD_ENCODING
MAX_RECORD_BYTES = 64 * 1024 * 1024  # a record larger than this (on the wire or inflated) is refused
_MAX_STRAY = 8  # frames of another seq tolerated while a record's frames arrive

Progress = Callable[[int, int], None]


class FleetError(RobonasError):
    """A robot could not do what the host asked; the message names the agent and the step."""

    def __init__(self, message: str, agent: str = "", operation: str = ""):
        super().__init__(message)
        self.agent = agent
        self.operation = operation


class LinkFailure(FleetError):
    """The link to the agent failed (open, write, read, timeout, garbled frames): retryable."""


class AgentRefused(FleetError):
    """The agent answered NACK or ERROR; `reason` is its reason code, `header` the whole reply."""

    def __init__(self, message: str, agent: str, operation: str, reason: str, header: dict[str, Any]):
        super().__init__(message, agent, operation)
        self.reason = reason
        self.header = header


@dataclass(frozen=True)
class Canary:
    """What the agent must see in its canary episodes before it switches to a new model."""

    episodes: int = 3
    seed: int = 0
    min_return: float | None = None
    max_miss_rate: float | None = None
    max_steps: int | None = None  # cap on each canary episode's length (None: until done)

    def __post_init__(self) -> None:
        if isinstance(self.episodes, bool) or not isinstance(self.episodes, int) or self.episodes < 1:
            raise ConfigError(f"canary episodes: {self.episodes!r} must be an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"canary seed: {self.seed!r} must be an integer >= 0")
        if self.max_miss_rate is not None and not 0.0 <= self.max_miss_rate <= 1.0:
            raise ConfigError(f"canary max_miss_rate: {self.max_miss_rate!r} must lie in [0, 1]")
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise ConfigError(f"canary max_steps: {self.max_steps!r} must be an integer >= 1")

    def thresholds(self) -> dict[str, float]:
        out = {}
        if self.min_return is not None:
            out["min_return"] = float(self.min_return)
        if self.max_miss_rate is not None:
            out["max_miss_rate"] = float(self.max_miss_rate)
        return out

    def to_header(self) -> dict[str, Any]:
        # PROTOCOL.md: canary (episodes, seed, thresholds); the thresholds also go flat, for an
        # agent that reads them at the top level (receivers ignore fields they do not know).
        th = self.thresholds()
        out = {"episodes": self.episodes, "seed": self.seed, "thresholds": th, **th}
        if self.max_steps is not None:
            out["max_steps"] = self.max_steps
        return out


@dataclass
class DeployResult:
    """The outcome of one deploy: ok, or refused with the agent's reason (never a link failure)."""

    agent: str
    ok: bool
    sha256: str
    size: int
    reason: str = "ok"
    detail: str = ""
    step: str = "end"  # where it stopped: begin / chunk / end
    slot: str | None = None
    active: str | None = None
    canary: dict[str, Any] | None = None
    bytes_sent: int = 0
    transfer_s: float = 0.0
    total_s: float = 0.0
    reply: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_artifact(artifact_dir: str | Path) -> tuple[dict[str, Any], bytes, str | None]:
    """(manifest, model bytes, signature or None) of an artifact directory, checked."""
    from robonas.export.artifact import load_artifact

    return load_artifact(artifact_dir)


def fleet_credentials(inventory: Any) -> HostCredentials | None:
    """The operator credentials a fleet file names (`[credentials] keys`, `operator`), checked;
    None when it names none (the host may then only read status)."""
    ref = getattr(inventory, "credentials", None)
    if ref is None:
        return None
    from robonas.credentials import find_host_credentials

    return find_host_credentials(ref.keys, ref.operator)


class AgentClient:
    """A session with one agent. Opens its link on first use; `close()` (or `with`) ends it.

    `url` is any link URL `open_link` takes; `name` names the agent in every error message.
    After a LinkFailure the link is closed, and the next call opens a fresh one.
    """

    def __init__(
        self,
        url: str,
        timeout_s: float = 5.0,
        name: str | None = None,
        *,
        episode_timeout_s: float = DEFAULT_EPISODE_TIMEOUT_S,
        bench_timeout_s: float = DEFAULT_BENCH_TIMEOUT_S,
        credentials: HostCredentials | None = None,
        server_name: str | None = None,
    ):
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s: {timeout_s!r} must be a positive number of seconds")
        self.url = url
        self.name = name or url
        self.timeout_s = float(timeout_s)
        self.episode_timeout_s = float(episode_timeout_s)
        self.bench_timeout_s = float(bench_timeout_s)
        self.credentials = credentials
        self.server_name = server_name
        self._link: Link | None = None
        self.agent_hello: dict[str, Any] | None = None
        self.operator: str | None = None  # who the agent took us for, once authenticated
        self.last_noise_verdict: dict[str, Any] | None = None  # of the last bench_probes

    @classmethod
    def for_entry(cls, entry: AgentEntry, credentials: HostCredentials | None = None) -> AgentClient:
        """A client for one robot of a fleet inventory, with the fleet's operator credentials."""
        return cls(
            entry.link,
            entry.timeout_s,
            name=entry.name,
            credentials=credentials,
            server_name=getattr(entry, "server_name", None) or entry.name,
        )

    # ------------------------------------------------------------------ link handling
    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def baudrate(self) -> int | None:
        return None if self._link is None else self._link.baudrate

    def connect(self) -> Link:
        """Open the link if it is not open and authenticate: over `tls://` with the operator's
        client certificate; over a plain link (serial, loopback TCP) by signing the challenge of
        the agent's HELLO (AUTH). Without credentials the session may only read status."""
        if self._link is None:
            from device_agents.link import open_link

            tls = None
            if self.url.startswith("tls://"):
                if self.credentials is None:
                    raise LinkFailure(
                        f"agent {self.name}: {self.url} needs operator credentials (the fleet file's "
                        "[credentials] keys folder; `robonas keys ca` and `robonas keys operator` make them)",
                        self.name,
                        "connect",
                    )
                try:
                    tls = self.credentials.client_context()
                except DeviceError as e:
                    raise ConfigError(f"operator credentials: {e}") from e
            try:
                self._link = open_link(
                    self.url, timeout_s=self.timeout_s, tls=tls, server_name=self.server_name or self.name
                )
            except DeviceError as e:
                raise LinkFailure(
                    f"agent {self.name}: cannot open link {self.url}: {e}", self.name, "connect"
                ) from e
            if tls is None and self.credentials is not None:
                try:
                    self._authenticate()
                except BaseException:
                    self.close()
                    raise
        return self._link

    def _authenticate(self) -> None:
        """HELLO for a challenge, AUTH with it signed by the operator's key (PROTOCOL.md)."""
        from device_agents.operators import sign_challenge

        assert self.credentials is not None
        hello = self.hello()
        challenge = hello.get("challenge")
        if not isinstance(challenge, str):
            return  # already authenticated (or an agent that predates AUTH)
        answer = sign_challenge(self.credentials.private_key(), str(hello.get("agent", "")), challenge)
        reply = self._request("auth", MsgType.AUTH, answer)
        header = self._expect("auth", reply, MsgType.ACK)
        self.operator = header.get("operator")

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    def _request(
        self,
        operation: str,
        msg_type: MsgType,
        header: dict[str, Any] | None = None,
        payload: bytes = b"",
        extra_s: float = 0.0,
        wire_bytes: int = 0,
    ) -> Message:
        link = self.connect()
        n = PREFIX_SIZE + _HEADER_ALLOWANCE + len(payload) + wire_bytes
        timeout = link.frame_timeout_s(n) + extra_s
        try:
            return link.request(Message(msg_type, header or {}, payload), timeout_s=timeout)
        except DeviceError as e:  # LinkError, LinkTimeout, LinkClosed, ProtocolError
            self.close()
            raise LinkFailure(
                f"agent {self.name}: {operation} over {self.url} failed: {type(e).__name__}: {e}",
                self.name,
                operation,
            ) from e

    def _expect(self, operation: str, reply: Message, *types: MsgType) -> dict[str, Any]:
        if reply.type in types:
            return dict(reply.header)
        if reply.type in (MsgType.NACK, MsgType.ERROR):
            reason = str(reply.header.get("reason", "?"))
            detail = reply.header.get("detail")
            raise AgentRefused(
                f"agent {self.name}: {operation} refused ({reply.type.name}): {reason}"
                + (f" - {detail}" if detail else ""),
                self.name,
                operation,
                reason,
                dict(reply.header),
            )
        self.close()  # out of step with the agent: start the next call on a fresh link
        raise LinkFailure(
            f"agent {self.name}: {operation} got an unexpected {reply.type.name} "
            f"reply (expected {'/'.join(t.name for t in types)})",
            self.name,
            operation,
        )

    # ------------------------------------------------------------------ simple requests
    def hello(self) -> dict[str, Any]:
        """HELLO: the agent's id, software version, slots and active slot."""
        reply = self._request("hello", MsgType.HELLO, {"role": "host", "protocol": PROTOCOL_VERSION})
        header = self._expect("hello", reply, MsgType.HELLO)
        if header.get("protocol") not in (None, PROTOCOL_VERSION):
            raise AgentRefused(
                f"agent {self.name}: speaks protocol {header.get('protocol')!r}, "
                f"this host speaks {PROTOCOL_VERSION}",
                self.name,
                "hello",
                "bad version",
                header,
            )
        self.agent_hello = header
        return header

    def status(self) -> dict[str, Any]:
        """STATUS: active slot, {slot: manifest summary}, uptime."""
        return self._expect("status", self._request("status", MsgType.STATUS), MsgType.STATUS)

    def ping(self, **echo: Any) -> float:
        """PING/PONG round trip in seconds (checks that the echo came back intact)."""
        t0 = time.perf_counter()
        header = self._expect("ping", self._request("ping", MsgType.PING, echo), MsgType.PONG)
        rtt = time.perf_counter() - t0
        for k, v in echo.items():
            if header.get(k) != v:
                raise LinkFailure(
                    f"agent {self.name}: PONG echoed {k}={header.get(k)!r}, sent {v!r}", self.name, "ping"
                )
        return rtt

    def rollback(self) -> dict[str, Any]:
        """ROLLBACK to the other slot; the ACK header (with `active`)."""
        return self._expect("rollback", self._request("rollback", MsgType.ROLLBACK), MsgType.ACK)

    def stop(self, reason: str = "operator") -> dict[str, Any]:
        """STOP: the agent ends the run in progress within one control period and halts the
        robot; the ACK says whether a run was stopped. Any authenticated operator may stop."""
        return self._expect("stop", self._request("stop", MsgType.STOP, {"reason": reason}), MsgType.ACK)

    def run(
        self,
        episodes: int,
        seed: int = 0,
        thresholds: dict[str, float] | None = None,
        slot: str | None = None,
        max_steps: int | None = None,
        record: bool = False,
        force: bool = False,
    ) -> dict[str, Any]:
        """RUN episodes on the active (or named) slot; the REPORT header (timings, returns).

        `force=True` runs a slot whose policy failed its canary (needs the deploy role).
        Ctrl-C while the robot runs sends STOP on the same link before giving up.

        `record=True` asks the agent for its record of the run (the last few episodes, step by
        step): the report then carries `"record"`, the encoded record
        (`device_agents.trajectory.decode` reads it), or None from an agent too old to record.
        """
        if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
            raise ConfigError(f"episodes: {episodes!r} must be an integer >= 1")
        header: dict[str, Any] = {"episodes": episodes, "seed": int(seed)}
        if thresholds:
            header["thresholds"] = dict(thresholds)
        if slot is not None:
            header["slot"] = slot
        if max_steps is not None:
            header["max_steps"] = int(max_steps)
        if record:
            header["record"] = True
        if force:
            header["force"] = True
        try:
            reply = self._request(
                "run",
                MsgType.RUN,
                header,
                extra_s=episodes * self.episode_timeout_s,
                wire_bytes=MAX_PAYLOAD if record else 0,  # the record's first part rides on the reply
            )
        except KeyboardInterrupt:
            self._stop_on_interrupt()
            raise
        report = self._expect("run", reply, MsgType.REPORT, MsgType.ACK)
        if record:
            wire = report.pop("record_wire", None)
            report["record"] = None if wire is None else self._receive_record(reply, wire)
        return report

    def _stop_on_interrupt(self) -> None:
        """The user pressed Ctrl-C while the robot runs: tell the agent to stop it (best effort;
        the run's own reply, when it comes, is dropped as stale)."""
        if self._link is None:
            return
        try:
            self.stop("interrupted on the host")
        except FleetError:
            pass
        finally:
            self.close()

    def _receive_record(self, first: Message, wire: Any) -> dict[str, Any]:
        """The record a REPORT announced in `record_wire`: its payload, then the frames that
        follow with the same seq, checked (size, sha256, parts in order) and decoded."""
        from device_agents.trajectory import decode

        def bad(why: str) -> LinkFailure:
            self.close()  # whatever is left of the record must not meet the next request
            return LinkFailure(f"agent {self.name}: run record {why}", self.name, "run")

        if not isinstance(wire, dict) or wire.get("encoding") != RECORD_ENCODING:
            raise bad(f"announced as {wire!r}; this host reads encoding {RECORD_ENCODING!r}")
        size, frames, sha = wire.get("size"), wire.get("frames"), wire.get("sha256")
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or not 0 <= size <= MAX_RECORD_BYTES
            or not isinstance(frames, int)
            or frames != max(1, -(-size // MAX_PAYLOAD))
            or not isinstance(sha, str)
        ):
            raise bad(f"announced with size {size!r}, frames {frames!r}, sha256 {sha!r}")
        data = bytearray(first.payload)
        link = self.connect()
        part, stray = 1, 0
        while part < frames:
            try:
                msg = link.receive(link.frame_timeout_s(MAX_FRAME))
            except DeviceError as e:
                self.close()
                raise LinkFailure(
                    f"agent {self.name}: run record frame {part} of {frames} over {self.url} failed: "
                    f"{type(e).__name__}: {e}",
                    self.name,
                    "run",
                ) from e
            if msg.seq != first.seq:
                stray += 1
                if stray > _MAX_STRAY:
                    raise bad(f"frame {part} of {frames} did not come; other frames did")
                continue
            if msg.type != MsgType.REPORT or msg.header.get("record_part") != part:
                raise bad(f"frame {part} of {frames} came as {msg.type.name} {msg.header!r:.200}")
            data += msg.payload
            part += 1
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise bad(f"of {len(data)} bytes does not match its announced size {size} and sha256")
        try:
            inflater = zlib.decompressobj()
            text = inflater.decompress(bytes(data), MAX_RECORD_BYTES + 1)
            if len(text) > MAX_RECORD_BYTES or not inflater.eof:
                raise bad(f"inflates past {MAX_RECORD_BYTES} bytes or is cut short")
            record = json.loads(text.decode("utf-8"))
            decode(record)  # well formed, arrays included: what is stored can be read back
        except (zlib.error, UnicodeDecodeError, ValueError, DeviceError) as e:
            raise bad(f"does not decode: {e}") from e
        return dict(record)

    def bench(self, slot: str = "active", runs: int = 1000) -> dict[str, Any]:
        """BENCH the model in a slot ("a", "b" or "active"); the REPORT header."""
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
            raise ConfigError(f"bench runs: {runs!r} must be an integer >= 1")
        reply = self._request(
            "bench",
            MsgType.BENCH,
            {"runs": runs, "slot": slot},
            extra_s=self.bench_timeout_s * (1 + runs / 1000),
        )
        return self._expect("bench", reply, MsgType.REPORT, MsgType.ACK)

    def bench_model(self, model: bytes, runs: int = 1000) -> dict[str, Any]:
        """BENCH a model sent inline (one frame, at most MAX_PAYLOAD bytes); slots untouched."""
        if len(model) > MAX_PAYLOAD:
            raise ConfigError(
                f"bench_model: {len(model)} bytes is over the inline limit of "
                f"{MAX_PAYLOAD}; deploy it and bench the slot instead"
            )
        header = {"runs": runs, "size": len(model), "sha256": hashlib.sha256(model).hexdigest()}
        reply = self._request(
            "bench", MsgType.BENCH, header, payload=model, extra_s=self.bench_timeout_s * (1 + runs / 1000)
        )
        return self._expect("bench", reply, MsgType.REPORT)

    def bench_probes(
        self, models: Sequence[bytes], rounds: int = 15, per_round: int = 40
    ) -> list[dict[str, Any]]:
        """Time several models on the agent together, in interleaved rounds (PROTOCOL.md, BENCH
        `keep` / `probes`), so drift on the robot's computer hits every model alike; one result
        per model, in order (the keys of BENCH's `bench`, with `noise` and `sha256`). The overall
        noise verdict is left in `last_noise_verdict`. An agent that predates `keep` is asked
        one model at a time instead (no interleaving; `last_noise_verdict` then says so)."""
        if not models:
            return []
        for m in models:
            if len(m) > MAX_PAYLOAD:
                raise ConfigError(
                    f"bench_probes: a {len(m)}-byte model is over the inline limit of {MAX_PAYLOAD}"
                )
        shas = [hashlib.sha256(m).hexdigest() for m in models]
        legacy = False
        sent: set[str] = set()
        for model, sha in zip(models, shas, strict=True):
            if sha in sent:
                continue
            sent.add(sha)
            header = {"runs": 1, "size": len(model), "sha256": sha, "keep": True}
            reply = self._request(
                "bench keep", MsgType.BENCH, header, payload=model, extra_s=self.bench_timeout_s
            )
            if reply.type == MsgType.REPORT:  # an older agent timed it instead of keeping it
                legacy = True
                break
            self._expect("bench keep", reply, MsgType.ACK)
        if legacy:
            results = []
            for model, sha in zip(models, shas, strict=True):
                bench = self.bench_model(model, runs=rounds * per_round)["bench"]
                results.append({**bench, "sha256": sha})
            self.last_noise_verdict = {
                "ok": True,
                "refuse": False,
                "worst": float("nan"),
                "message": "the agent predates interleaved BENCH: models timed one after another, no noise",
            }
            return results
        steps = rounds * per_round * len(set(shas))
        try:
            reply = self._request(
                "bench probes",
                MsgType.BENCH,
                {
                    "runs": rounds * per_round,
                    "probes": list(dict.fromkeys(shas)),
                    "rounds": rounds,
                    "per_round": per_round,
                },
                extra_s=self.bench_timeout_s * (2 + steps / 1000),
            )
            header = self._expect("bench probes", reply, MsgType.REPORT)
        finally:
            with contextlib.suppress(FleetError):
                self._request("bench clear", MsgType.BENCH, {"runs": 1, "clear": True})
        try:
            timed = json.loads(reply.payload.decode("utf-8")) if header.get("probes_wire") == "json" else {}
        except (UnicodeDecodeError, ValueError) as e:
            raise LinkFailure(
                f"agent {self.name}: bench probes payload unreadable: {e}", self.name, "bench"
            ) from e
        missing = [s for s in shas if s not in timed]
        if missing:
            raise LinkFailure(
                f"agent {self.name}: bench probes came back without {len(missing)} of them",
                self.name,
                "bench",
            )
        verdict = header.get("noise_verdict")
        self.last_noise_verdict = dict(verdict) if isinstance(verdict, dict) else {}
        return [{**timed[s], "sha256": s} for s in shas]

    # ------------------------------------------------------------------ deploy
    def deploy(
        self,
        artifact_dir: str | Path,
        canary: Canary | dict[str, Any] | None = None,
        progress: Progress | None = None,
        *,
        signature: str | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        manifest: dict[str, Any] | None = None,
        allow_downgrade: bool = False,
    ) -> DeployResult:
        """Push an artifact: DEPLOY_BEGIN, chunks, DEPLOY_END (the agent's canary runs there).

        `signature` overrides the artifact's `manifest.sig` (e.g. signed at deploy time), and
        `manifest` its manifest (re-stamped with a fresh sequence when signed at deploy time).
        `allow_downgrade` asks the agent to accept an artifact older than its newest one (an
        explicit roll back; the operator needs the rollback role).
        `progress(bytes_sent, total)` is called after every acknowledged chunk.
        Returns a DeployResult (ok, or refused with the agent's reason); raises LinkFailure if
        the link fails anywhere, leaving the agent on its previous model.
        """
        if isinstance(canary, dict):
            canary = Canary(**canary)
        canary = canary or Canary()
        if not 0 < chunk_size <= MAX_PAYLOAD:
            raise ConfigError(f"chunk_size: {chunk_size} must lie in 1..{MAX_PAYLOAD}")
        file_manifest, model, file_sig = read_artifact(artifact_dir)
        manifest = manifest if manifest is not None else file_manifest
        signature = signature if signature is not None else file_sig
        size, sha = len(model), hashlib.sha256(model).hexdigest()
        result = DeployResult(agent=self.name, ok=False, sha256=sha, size=size)
        t0 = time.perf_counter()

        def refused(step: str, header: dict[str, Any], msg_type: MsgType) -> DeployResult:
            result.step = step
            result.reason = str(header.get("reason", "?"))
            if msg_type == MsgType.ERROR:
                result.reason = f"agent error: {result.reason}"
            result.detail = str(header.get("detail", ""))
            result.canary = header.get("canary")
            result.reply = dict(header)
            result.total_s = time.perf_counter() - t0
            return result

        begin = {
            "manifest": manifest,
            "signature": signature,
            "size": size,
            "sha256": sha,
            "chunk_size": chunk_size,
            "canary": canary.to_header(),
        }
        if allow_downgrade:
            begin["allow_downgrade"] = True
        reply = self._request("deploy begin", MsgType.DEPLOY_BEGIN, begin, wire_bytes=len(str(manifest)))
        if reply.type in (MsgType.NACK, MsgType.ERROR):
            return refused("begin", reply.header, reply.type)
        header = self._expect("deploy begin", reply, MsgType.ACK)
        # the agent may ask for more canary episodes than we did (its own floor): wait for those
        agreed = header.get("canary")
        episodes = canary.episodes
        if isinstance(agreed, dict) and isinstance(agreed.get("episodes"), int):
            episodes = max(episodes, agreed["episodes"])
        offset = int(header.get("next_offset", 0))
        resyncs = 0
        while offset < size:
            chunk = model[offset : offset + chunk_size]
            reply = self._request("deploy chunk", MsgType.DEPLOY_CHUNK, {"offset": offset}, chunk)
            if (
                reply.type == MsgType.NACK
                and reply.header.get("reason") == "offset"
                and isinstance(reply.header.get("next_offset"), int)
                and resyncs < _MAX_RESYNCS
            ):
                resyncs += 1  # the agent holds a different count: carry on from its offset
                offset = reply.header["next_offset"]
                continue
            if reply.type in (MsgType.NACK, MsgType.ERROR):
                return refused("chunk", reply.header, reply.type)
            header = self._expect("deploy chunk", reply, MsgType.ACK)
            offset = int(header.get("next_offset", offset + len(chunk)))
            result.bytes_sent = min(offset, size)
            if progress is not None:
                progress(result.bytes_sent, size)
        result.transfer_s = time.perf_counter() - t0
        reply = self._request("deploy end", MsgType.DEPLOY_END, {}, extra_s=episodes * self.episode_timeout_s)
        if reply.type in (MsgType.NACK, MsgType.ERROR):
            return refused("end", reply.header, reply.type)
        header = self._expect("deploy end", reply, MsgType.ACK)
        result.ok = True
        result.slot = header.get("slot")
        result.active = header.get("active")
        result.canary = header.get("canary")
        result.reply = header
        result.total_s = time.perf_counter() - t0
        return result


__all__ = [
    "AgentClient",
    "AgentRefused",
    "Canary",
    "DeployResult",
    "FleetError",
    "LinkFailure",
    "fleet_credentials",
    "read_artifact",
]
