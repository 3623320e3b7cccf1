"""`robonas replay`: run one trained trial (or its exported artifact) in its env, print its
returns, and optionally write a GIF of it. The work is `robonas.replay`; this is the command.

Mounted on the root app by `robonas.cli.app` with `app.command()(replay)`.
"""

from __future__ import annotations

import json

import typer

from robonas.cli.common import STORE_HELP, console, open_store


def replay(
    study: str = typer.Argument(..., help="Study name."),
    trial: int = typer.Option(..., "--trial", help="Trial id (see `robonas top`)."),
    artifact: str | None = typer.Option(
        None,
        "--artifact",
        help="Replay this exported artifact (policy.tflite + manifest.json) with the robot's TFLite "
        "runtime and the manifest's input normalisation, instead of the trial's torch policy.",
    ),
    episodes: int = typer.Option(3, "--episodes", help="Episodes to run (1 to 1000)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first episode; episode i runs seed + i."),
    video: str | None = typer.Option(
        None, "--video", help="Write an animated GIF of the run here (e.g. out.gif), from the first reset."
    ),
    video_frames: int = typer.Option(
        300, "--video-frames", help="At most this many frames in the GIF (the run's first ones)."
    ),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the returns (and the video) as JSON."),
) -> None:
    """Run a trained trial in its environment and print its return per episode, like rl-zoo3's enjoy.

    Deterministic actions, nominal dynamics, the study's env settings. With --artifact the
    exported model runs as the robot runs it, so the returns are the robot's in simulation.
    """
    from robonas.replay import replay as run_replay

    result = run_replay(
        open_store(store),
        study,
        trial,
        artifact=artifact,
        episodes=episodes,
        seed=seed,
        video=video,
        video_frames=video_frames,
    )
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    c = console()
    c.print(
        f"study {result.study} trial {result.trial}: {result.policy} policy on {result.env_id}", markup=False
    )
    for s, ret, n in zip(result.seeds, result.returns, result.lengths, strict=True):
        c.print(f"  seed {s}: return {ret:.2f} ({n} steps)", markup=False)
    c.print(
        f"  mean return {result.mean_return:.2f} ± {result.std_return:.2f} over {len(result.returns)} "
        f"episode{'s' if len(result.returns) != 1 else ''}",
        markup=False,
    )
    if result.video is not None:
        v = result.video
        c.print(f"  video {v.path}: {v.frames} frames, {v.frame_ms} ms each", markup=False)
