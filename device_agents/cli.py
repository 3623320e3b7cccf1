"""`robonas-agent` / `python -m device_agents`: the robot's command line.

Standard library `argparse` only at import time, so `--help` starts fast on a small robot;
each subcommand imports what it needs (numpy, the interpreter) when it runs. A subcommand is a
pair registered in `COMMANDS`: a function that adds its arguments to a subparser and a function
that runs it and returns an exit code. The agent's `serve`/`run` commands slot in the same way.
A `DeviceError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

PROG = "robonas-agent"


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --- bench -------------------------------------------------------------------------------------
def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "file", nargs="+", help="the .tflite model(s) or artifact directories; several are timed interleaved"
    )
    p.add_argument("--runs", type=int, default=1000, help="measured steps per model (default 1000)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: from --runs)")
    p.add_argument(
        "--per-round", type=int, default=None, help="steps per model per round (default: from --runs, 40)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=50,
        help="least warm-up steps; the warm-up goes on until the timings settle (default 50)",
    )
    p.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 3 when the timings are too noisy to trust (default: warn, exit 0)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON instead of a table: the result object for one file, "
        "{models: {file: result}, noise_verdict} for several",
    )


def _format_bench(r: dict[str, Any]) -> str:
    lines = [
        f"model      {r['model']} ({r['model_bytes']} bytes)",
        f"runtime    {r['runtime']} {r['runtime_version']}, {r['threads']} thread(s)",
        f"input      {r['input_dtype']} {tuple(r['input_shape'])}   "
        f"output {r['output_dtype']} {tuple(r['output_shape'])}",
        f"init       {r['init_us'] / 1000:.2f} ms   first inference {r['first_us']:.1f} us   "
        f"warm-up mean {r['warmup_mean_us']:.1f} us ({r['warmup_steps']} runs)",
        f"{'latency (us)':<16}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}{'mean':>9}   ({r['runs']} runs)",
    ]
    for label, key in (("invoke", "invoke_us"), ("step (q+inv+dq)", "step_us")):
        s = r[key]
        lines.append(f"{label:<16}" + "".join(f"{s[k]:>9.1f}" for k in ("p50", "p90", "p99", "max", "mean")))
    settled = "settled" if r["settled"] else "NOT settled"
    lines.append(
        f"noise      {r['noise'] * 100:.1f}% (IQR {r['spread_us']:.2f} us of {r['rounds']} round medians, "
        f"{r['per_round']} steps each), {settled} after {r['warmup_steps']} warm-up steps"
    )
    verdict = r["noise_verdict"]
    if not verdict["ok"]:
        lines.append(f"WARNING    {verdict['message']}")
    return "\n".join(lines)


def _bench_run(args: argparse.Namespace) -> int:
    from device_agents.bench import bench_models, overall_verdict, split_runs
    from device_agents.errors import DeviceError

    files = [str(f) for f in args.file]
    twice = sorted({f for f in files if files.count(f) > 1})
    if twice:
        raise DeviceError(f"file {twice[0]!r} given twice: each model is timed once")
    rounds, per_round = split_runs(args.runs, args.rounds, args.per_round)
    results = bench_models({f: f for f in files}, rounds, per_round, threads=args.threads, warmup=args.warmup)
    verdict = overall_verdict(results)
    if args.json:
        out: dict[str, Any] = (
            results[files[0]] if len(files) == 1 else {"models": results, "noise_verdict": verdict}
        )
        print(json.dumps(out, sort_keys=True))
    else:
        print("\n\n".join(_format_bench(r) for r in results.values()))
        if len(files) > 1:
            print(f"\n{'overall' if verdict['ok'] else 'WARNING'}    {verdict['message']}")
    return 3 if args.strict and verdict["refuse"] else 0  # 3: measured, but too noisy to trust


# --- serve / run ---------------------------------------------------------------------------------
def _agent_arguments(p: argparse.ArgumentParser) -> None:
    from device_agents.robots import SPEC_FORMS  # the back-end table (standard library only)

    p.add_argument("--state", required=True, help="state directory (A/B slots, state.json)")
    p.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="PUBKEY",
        help="trusted Ed25519 public key file or directory of *.pub (repeatable)",
    )
    p.add_argument(
        "--robot",
        required=True,
        metavar="BACKEND",
        help="robot back end: " + " or ".join(SPEC_FORMS),
    )
    p.add_argument(
        "--fast", action="store_true", help="do not sleep between control ticks (simulated robots only)"
    )
    p.add_argument(
        "--kind",
        default=None,
        metavar="ENV_ID",
        help="what robot this is, as artifacts name it in their env_id (default: what the back end "
        "says: a sim twin's env, a serial MCU's kind= in its hello); artifacts for another kind are refused",
    )
    p.add_argument(
        "--fallback",
        choices=("hold", "safe"),
        default="hold",
        help="what a control tick whose inference missed its deadline applies: the previous action "
        "(hold, default) or the robot's safe action",
    )
    p.add_argument(
        "--reality-profiles",
        metavar="PATH",
        action="append",
        default=[],
        help="a TOML file (or folder of them) of your own reality profiles for sim:PROFILE robots; "
        f"repeatable; added to ${REALITY_PROFILES_ENV}",
    )


# The variable `sim.reality` reads (named here, not imported: the robot side never imports sim).
REALITY_PROFILES_ENV = "ROBONAS_REALITY_PROFILES"


def _use_reality_profiles(paths: list[str]) -> None:
    """Put the user's reality profile files where the sim twin's `sim.reality` looks for them."""
    import os

    if paths:
        current = os.environ.get(REALITY_PROFILES_ENV)
        os.environ[REALITY_PROFILES_ENV] = os.pathsep.join([*paths, *([current] if current else [])])


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    _agent_arguments(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--listen",
        metavar="URL",
        help="tls://HOST:PORT (client certificates; needs --tls-*), or tcp://127.0.0.1:PORT on loopback "
        "only (operators authenticate with AUTH); port 0 picks a free one",
    )
    where.add_argument(
        "--link", metavar="URL", help="serial device path or pyserial URL (operators authenticate with AUTH)"
    )
    p.add_argument(
        "--operators",
        metavar="FILE",
        default=None,
        help="JSON file of trusted operators and their roles (`robonas keys trust` writes it); "
        "without it nobody may deploy, run, bench or roll back",
    )
    p.add_argument(
        "--tls-cert", metavar="PEM", default=None, help="this agent's certificate (robonas keys agent)"
    )
    p.add_argument("--tls-key", metavar="PEM", default=None, help="this agent's private key")
    p.add_argument(
        "--tls-ca", metavar="PEM", default=None, help="the fleet CA that signs operator certificates"
    )
    p.add_argument(
        "--max-sessions", type=int, default=8, help="sessions served at once (default 8); more are closed"
    )
    p.add_argument(
        "--canary-episodes",
        type=int,
        default=1,
        help="fewest canary episodes before a model is promoted, whatever the sender asks (default 1)",
    )
    p.add_argument(
        "--canary-max-miss-rate",
        type=float,
        default=0.1,
        help="highest deadline-miss rate a canary may show, whatever the sender asks (default 0.1)",
    )
    p.add_argument(
        "--canary-min-return",
        type=float,
        default=None,
        help="lowest mean canary return, whatever the sender asks (default: none)",
    )
    p.add_argument("--id", default=None, help="agent name reported to the host")
    p.add_argument("--device", default=None, help="device profile name reported to the host")
    p.add_argument(
        "--max-model-bytes",
        type=int,
        default=None,
        help="refuse larger models at DEPLOY_BEGIN (default 8 MiB)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log to stderr")


def _trusted(args: argparse.Namespace) -> list[Ed25519PublicKey]:
    from device_agents.signing import load_public_keys

    keys: list[Ed25519PublicKey] = []
    for source in args.trust:
        keys.extend(load_public_keys(source))
    return keys


def _serve_run(args: argparse.Namespace) -> int:
    import logging
    import signal

    from device_agents.agent import DEFAULT_MAX_MODEL_BYTES, Agent
    from device_agents.errors import DeviceError

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    _use_reality_profiles(args.reality_profiles)
    operators = None
    if args.operators:
        from device_agents.operators import Operators

        operators = Operators.from_file(args.operators)
    no_operators = (
        None
        if operators is not None
        else f"{PROG}: warning: no --operators file: this agent answers status only; nobody may "
        "deploy, run, bench or roll back (robonas keys trust writes the file)"
    )

    def ready(line: str) -> None:
        print(line, flush=True)
        if no_operators:  # said once serving, so a start-up error stays the one line
            print(no_operators, file=sys.stderr, flush=True)

    tls = None
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if any(given):
        if not all(given):
            raise DeviceError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
        from device_agents.tls import server_context

        tls = server_context(args.tls_cert, args.tls_key, args.tls_ca)
    if args.max_sessions < 1 or args.canary_episodes < 1:
        raise DeviceError("--max-sessions and --canary-episodes must be at least 1")
    agent = Agent(
        args.state,
        _trusted(args),
        args.robot,
        fast=args.fast,
        agent_id=args.id,
        device=args.device,
        max_model_bytes=args.max_model_bytes or DEFAULT_MAX_MODEL_BYTES,
        operators=operators,
        canary_policy={
            "episodes": args.canary_episodes,
            "max_miss_rate": args.canary_max_miss_rate,
            "min_return": args.canary_min_return,
        },
        fallback=args.fallback,
        kind=args.kind,
    )
    # SIGTERM: the run in progress ends within one control period with the robot halted, then
    # the agent stops serving and exits
    signal.signal(signal.SIGTERM, lambda *_: agent.shutdown())
    try:
        agent.serve(
            listen_url=args.listen,
            link_url=args.link,
            ready=ready,
            tls=tls,
            max_sessions=args.max_sessions,
        )
    finally:
        agent.close()
    return 0


def _run_arguments(p: argparse.ArgumentParser) -> None:
    _agent_arguments(p)
    p.add_argument("--episodes", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--slot", default="active", help="active, a or b")


def _run_run(args: argparse.Namespace) -> int:
    import signal

    from device_agents.agent import Agent
    from device_agents.protocol import Message, MsgType

    _use_reality_profiles(args.reality_profiles)
    agent = Agent(
        args.state, _trusted(args), args.robot, fast=args.fast, fallback=args.fallback, kind=args.kind
    )
    signal.signal(signal.SIGTERM, lambda *_: agent.shutdown())
    try:
        header = {"episodes": args.episodes, "seed": args.seed, "slot": args.slot}
        if args.max_steps is not None:
            header["max_steps"] = args.max_steps
        reply = agent.handle(Message(MsgType.RUN, header))
    finally:
        agent.close()
    print(json.dumps(reply.header, sort_keys=True))
    return 0 if reply.type == MsgType.REPORT else 2


# --- install-service -----------------------------------------------------------------------------
def _install_service_arguments(p: argparse.ArgumentParser) -> None:
    from device_agents import service  # standard library only at import time

    _serve_arguments(p)  # the unit runs `serve` with these, so they are declared exactly as there
    service.add_arguments(p)


def _install_service_run(args: argparse.Namespace) -> int:
    from device_agents.service import install

    return install(args)


COMMANDS: dict[str, Command] = {
    "bench": Command("time a .tflite policy on this machine", _bench_arguments, _bench_run),
    "serve": Command(
        "serve the robonas protocol: deploys, canaries, runs, reports", _serve_arguments, _serve_run
    ),
    "run": Command("run episodes of the active policy here and print the report", _run_arguments, _run_run),
    "install-service": Command(
        "check a serve command and write it as a systemd unit (prints the systemctl steps, runs none)",
        _install_service_arguments,
        _install_service_run,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="robonas agent: runs on the robot")
    from device_agents import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from device_agents.errors import DeviceError

    try:
        return COMMANDS[args.command].run(args)
    except DeviceError as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
