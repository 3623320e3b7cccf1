"""robonas replay: a really trained cart-pole trial (a one-trial search, 2048 PPO steps) replayed
with its torch policy and with its int8 artifact through the robot's TFLite runtime; returns per
episode, the GIF, the parity figures reproduced, and one-line errors for bad input.

The command runs in-process through `robonas.cli.app.main` (what the console script runs), with
`replay` mounted on the root app the way app.py mounts it, so the exit codes and the one-line
errors are the real ones."""

from __future__ import annotations

import importlib
import itertools
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from robonas.cli.replay import replay as replay_command
from robonas.errors import ConfigError, RobonasError
from robonas.replay import replay
from robonas.store import Store

REPO = Path(__file__).resolve().parents[2]
STUDY = "replay-pole"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One complete trial of sim/CartPole-v0 with its weights, and its int8 artifact."""
    from robonas.config import parse_config
    from robonas.export.trial_export import export_trial
    from robonas.search.loop import Search, SearchPlan

    tmp = tmp_path_factory.mktemp("replay")
    url = f"sqlite:///{tmp / 'runs' / 'robonas.db'}"
    data = tomllib.loads((REPO / "launch" / "cartpole.toml").read_text())
    data["study"]["name"] = STUDY
    data["budget"].update(trials=1, steps_per_trial=2048, checkpoints=2, eval_episodes=2)
    data["space"].update(depths=[1], widths=[16], layer_norm=[False], residual=[False], shared_trunk=[False])
    data["seed_check"] = {"top": 0}
    data["device"]["latency_budget_ms"] = 5.0
    store = Store(url)
    summary = Search(SearchPlan.build(parse_config(data), STUDY), store, workers=1).run()
    assert summary.complete == 1
    study = store.get_study(STUDY)
    (trial,) = store.trials(study.id, status="complete")
    exported = export_trial(store, STUDY, trial.id, out_dir=tmp / "artifact")
    yield {"store": store, "url": url, "trial": trial, "artifact": exported, "tmp": tmp}
    store.close()


def _robonas(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `robonas ARGS` run in this process."""
    app = importlib.import_module("robonas.cli.app")  # the module (robonas.cli exports the Typer as `app`)
    if not any(c.callback is replay_command for c in app.app.registered_commands):
        app.app.command()(replay_command)  # as app.py mounts it
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        app.main(list(args))
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def test_replay_prints_returns_and_writes_a_moving_gif(trained, capsys) -> None:
    from PIL import Image

    gif = trained["tmp"] / "videos" / "pole.gif"
    code, out, err = _robonas(
        capsys, "replay", STUDY, "--trial", str(trained["trial"].id), "--episodes", "3", "--seed", "7",
        "--video", str(gif), "--store", trained["url"],
    )  # fmt: skip
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == f"study {STUDY} trial {trained['trial'].id}: torch policy on sim/CartPole-v0"
    episodes = [line.split() for line in lines if line.lstrip().startswith("seed ")]
    assert [int(e[1].rstrip(":")) for e in episodes] == [7, 8, 9]
    returns = [float(e[3]) for e in episodes]
    # cart-pole pays 1 a step: every return is its episode's length
    assert all(math.isfinite(r) and r >= 1 for r in returns)
    assert returns == [float(e[4].lstrip("(")) for e in episodes]
    assert f"mean return {np.mean(returns):.2f}" in out and "over 3 episodes" in out
    assert gif.is_file() and gif.stat().st_size > 0
    # 50 Hz: every step is a frame (20 ms), plus one per reset, up to the default cap of 300
    captured = min(300, int(sum(returns)) + 3)
    assert f"video {gif}: {captured} frames, 20 ms each" in out
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames > 1 and im.size == (320, 240)
        frames = []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
    # the pole swings and the rail slides under the camera that follows the cart
    assert sum(not np.array_equal(a, b) for a, b in itertools.pairwise(frames)) >= len(frames) // 2
    assert not np.array_equal(frames[0], frames[-1])
    # Pillow merges identical consecutive frames (a pole at rest for a step); most differ
    assert captured // 2 <= len(frames) <= captured


def test_replay_reproduces_the_parity_figures_of_torch_and_the_int8_artifact(trained) -> None:
    """Replayed on the export's parity seeds, the torch policy and the artifact run through the
    robot's runtime earn exactly the returns the export's parity check measured."""
    store, trial, exported = trained["store"], trained["trial"], trained["artifact"]
    parity = exported.manifest["parity"]
    first, n = parity["seeds"][0], parity["episodes"]
    torch_run = replay(store, STUDY, trial.id, episodes=n, seed=first)
    tflite_run = replay(store, STUDY, trial.id, artifact=exported.path, episodes=n, seed=first)
    assert torch_run.policy == "torch" and tflite_run.policy == "tflite-int8"
    assert tflite_run.artifact == str(exported.path)
    assert torch_run.seeds == tflite_run.seeds == tuple(range(first, first + n))
    assert torch_run.mean_return == pytest.approx(parity["torch_return"])
    assert tflite_run.mean_return == pytest.approx(parity["tflite_return"])
    assert torch_run.video is None and len(tflite_run.returns) == n


def test_replay_of_the_artifact_from_the_command_line_as_json(trained, capsys) -> None:
    gif = trained["tmp"] / "artifact.gif"
    code, out, err = _robonas(
        capsys, "replay", STUDY, "--trial", str(trained["trial"].id), "--artifact",
        str(trained["artifact"].path), "--episodes", "2", "--video", str(gif), "--video-frames", "5",
        "--store", trained["url"], "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["policy"] == "tflite-int8" and report["episodes"] == 2 and report["seeds"] == [0, 1]
    assert len(report["returns"]) == 2 and all(math.isfinite(r) for r in report["returns"])
    assert report["returns"] == [float(n) for n in report["lengths"]]
    assert report["video"]["frames"] == 5 and report["video"]["path"] == str(gif)
    from PIL import Image

    with Image.open(gif) as im:
        assert 1 < im.n_frames <= 5


def test_bad_input_is_one_line_and_exit_2(trained, capsys) -> None:
    store, trial, url = trained["store"], trained["trial"], trained["url"]
    bare = store.add_trial(store.get_study(STUDY).id, 50, trial.arch, status="pending")
    other = store.create_study("other-study", store.get_study(STUDY).config)
    cases = {
        ("nope", "--trial", str(trial.id)): "unknown study 'nope'",
        (STUDY, "--trial", "9999"): "trial 9999: unknown trial id 9999",
        (STUDY, "--trial", str(bare.id)): f"trial {bare.id} has no weights artifact",
        ("other-study", "--trial", str(trial.id)): f"trial {trial.id} belongs to another study",
        (STUDY, "--trial", str(trial.id), "--episodes", "0"): "episodes: 0 is not valid",
        (STUDY, "--trial", str(trial.id), "--episodes", "-2"): "episodes: -2 is not valid",
        (STUDY, "--trial", str(trial.id), "--seed", "-1"): "seed: -1 is not valid",
        (STUDY, "--trial", str(trial.id), "--video", "out.mp4"): "is not a .gif path",
        (STUDY, "--trial", str(trial.id), "--artifact", str(trained["tmp"] / "none")): "is not a directory",
        (STUDY, "--trial", str(bare.id), "--artifact", str(trained["artifact"].path)): (
            f"is trial {trial.id} of study '{STUDY}', not trial {bare.id}"
        ),
    }
    assert other.id != bare.study_id
    for args, message in cases.items():
        code, out, err = _robonas(capsys, "replay", *args, "--store", url)
        assert code == 2, (args, out, err)
        assert err.startswith("robonas: error: ") and err.count("\n") == 1, (args, err)
        assert message in err, (args, err)
        assert out == ""
    assert not Path("out.mp4").exists()


def test_replay_api_checks_its_numbers(trained) -> None:
    store, trial = trained["store"], trained["trial"]
    for kwargs, message in (
        ({"episodes": True}, "episodes: True"),
        ({"episodes": 1001}, "from 1 to 1000"),
        ({"video_frames": 0}, "video frames: 0"),
        ({"video": trained["tmp"]}, "is not a .gif path"),
    ):
        with pytest.raises(ConfigError, match=message):
            replay(store, STUDY, trial.id, **kwargs)
    with pytest.raises(RobonasError, match="is a directory"):
        (trained["tmp"] / "dir.gif").mkdir()
        replay(store, STUDY, trial.id, video=trained["tmp"] / "dir.gif")
