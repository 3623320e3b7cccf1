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
from typing import Callable, NamedTuple, Sequence

PROG = "robonas-agent"


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --- bench -------------------------------------------------------------------------------------
def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the .tflite model")
    p.add_argument("--runs", type=int, default=1000, help="measured steps (default 1000)")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured first steps (default 50)")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _format_bench(r: dict) -> str:
    lines = [
        f"model      {r['model']} ({r['model_bytes']} bytes)",
        f"runtime    {r['runtime']} {r['runtime_version']}, {r['threads']} thread(s)",
        f"input      {r['input_dtype']} {tuple(r['input_shape'])}   "
        f"output {r['output_dtype']} {tuple(r['output_shape'])}",
        f"init       {r['init_us'] / 1000:.2f} ms   first inference {r['first_us']:.1f} us   "
        f"warm-up mean {r['warmup_mean_us']:.1f} us ({r['warmup']} runs)",
        f"{'latency (us)':<16}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}{'mean':>9}   "
        f"({r['runs']} runs)",
    ]
    for label, key in (("invoke", "invoke_us"), ("step (q+inv+dq)", "step_us")):
        s = r[key]
        lines.append(
            f"{label:<16}" + "".join(f"{s[k]:>9.1f}" for k in ("p50", "p90", "p99", "max", "mean"))
        )
    return "\n".join(lines)


def _bench_run(args: argparse.Namespace) -> int:
    from device_agents.bench import bench_model

    result = bench_model(args.file, runs=args.runs, warmup=args.warmup, threads=args.threads)
    print(json.dumps(result, sort_keys=True) if args.json else _format_bench(result))
    return 0


COMMANDS: dict[str, Command] = {
    "bench": Command("time a .tflite policy on this machine", _bench_arguments, _bench_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="robonas agent: runs on the robot")
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
