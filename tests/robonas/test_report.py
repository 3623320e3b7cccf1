"""The HTML study report: sections, inline figures, escaping, tag balance, empty studies."""

from __future__ import annotations

import base64
import itertools
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from robonas import plots
from robonas.errors import StoreError
from robonas.metrics import TrialMetrics
from robonas.report import SECTIONS, format_number, param_importances, render_report, write_report
from robonas.space import Layer, PolicyArch
from robonas.store import Store

EVIL = "<script>alert('x')</script>&"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "input", "link"}


class _Checker(HTMLParser):
    """Tag balance, plus the sections (id -> text and img srcs) the report is made of."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.sections: dict[str, dict[str, list[str]]] = {}
        self.scripts = 0
        self._current: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "section":
            self._current = a.get("id")
            self.sections[self._current] = {"text": [], "img": [], "h2": []}
        if tag == "img" and self._current:
            self.sections[self._current]["img"].append(a.get("src", ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag == "section":
            self._current = None

    def handle_data(self, data):
        if self._current:
            key = "h2" if self.stack and self.stack[-1] == "h2" else "text"
            self.sections[self._current][key].append(data)


def _parse(doc: str) -> _Checker:
    c = _Checker()
    c.feed(doc)
    c.close()
    assert c.errors == [], c.errors
    assert c.stack == [], f"unclosed tags {c.stack}"
    return c


def _config(name: str) -> dict:
    return {
        "search": {
            "study": {"name": name},
            "env": {"id": "sim/CartPole-v0"},
            "device": {"profile": "pi4-" + EVIL, "latency_budget_ms": 2.0},
            "objective": {"ranking": "mean"},
        },
        "fingerprint": "abc",
        "resolved": {"return_lo": 10.0, "return_hi": 500.0},
    }


def _arch(width: int) -> PolicyArch:
    return PolicyArch(obs_dim=4, act_dim=1, layers=(Layer(width, "tanh"), Layer(width, "relu")))


def _metrics(i: int, arch: PolicyArch) -> dict:
    asym = 100.0 + 40 * i
    return {
        "auc": 0.1 * (i + 1),
        "asymptotic_return": asym,
        "asymptotic_std": 5.0,
        "robustness_return": asym - 10,
        "random_return": 10.0,
        "env_steps": 2000,
        "wall_s": 3.0,
        "p50_ms": 0.2 + 0.3 * i,
        "p99_ms": 0.3 + 0.4 * i,
        "params": 100 * (i + 1),
        "macs": 90 * (i + 1),
        "bytes": 400 * (i + 1),
        "device": "pi4",
        "latency_share": 0.1,
        "gap_mean": 20.0,
        "gap_std": 8.0,
        "predicted_real_return": asym - 20 - (15 if i == 1 else 0),
        "predicted_real_std": 8.0,
        "objective": 0.1 + 0.15 * i,
        "objective_std": 0.02,
        "objective_lcb": 0.05 + 0.15 * i,
        "latency_model": "analytic v1",
        "gap_model": "heuristic",
    }


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    yield s
    s.close()


@pytest.fixture
def full_study(store: Store) -> Store:
    """Four complete trials with curves, a rejected and a failed one, deployments, reports, models."""
    study = store.create_study("full " + EVIL, _config("full"), status="complete")
    trials = []
    for i, width in enumerate((8, 16, 32, 64)):
        arch = _arch(width)
        t = store.add_trial(study.id, i, arch)
        curve = [(s, 20.0 + i * 10 + s / 100, 3.0) for s in (0, 500, 1000, 1500, 2000)]
        store.complete_trial(
            t.id, TrialMetrics.from_dict(_metrics(i, arch)), curve, wall_s=3.0, env_steps=2000
        )
        trials.append(t)
    big = _arch(512)
    rej = store.add_trial(study.id, 4, big)
    store.reject_trial(
        rej.id,
        "predicted p99 9.5 ms over the budget 2.0 ms",
        metrics=TrialMetrics(p50_ms=7.0, p99_ms=9.5, params=1, macs=1, bytes=1, device="pi4"),
    )
    failed = store.add_trial(study.id, 5, _arch(4))
    store.fail_trial(failed.id, "boom " + EVIL)

    art = store.add_artifact(trials[3].id, "tflite-int8", "/tmp/a.tflite", "ab" * 32)
    art2 = store.add_artifact(trials[2].id, "tflite-int8", "/tmp/b.tflite", "cd" * 32)
    store.add_device("robot-" + EVIL, "pi4")
    store.add_deployment(art2.id, "robot-" + EVIL, "rolled_back", {"reason": "canary " + EVIL})
    store.add_deployment(art.id, "robot-" + EVIL, "active", {"slot": "B"})
    store.add_deployment(art.id, "robot-2", "active")
    store.add_device_report("robot-" + EVIL, "canary", {"returns": [150.0, 160.0]}, artifact_id=art.id)
    store.add_device_report(
        "robot-" + EVIL,
        "run",
        {
            "returns": [170.0, 180.0, 190.0],
            "sha256": "ab" * 32,
            "timings_ms": {"p50": 0.5, "p90": 0.7, "p99": 0.9},
            "deadline_misses": 1,
        },
        artifact_id=art.id,
    )
    # Payload shapes the agent code may settle on: raw step samples, odd values, a bench.
    store.add_device_report(
        "robot-2",
        "run",
        {"returns": [150.0, "nan?", None], "timings_ms": {"p50": 0.5, "p90": 0.58, "p99": 0.598}},
        trial_id=trials[3].id,
    )
    store.add_device_report(
        "robot-2",
        "bench",
        {"invoke_us": {"p50": 450.0, "p99": 800.0}, "arch_id": trials[1].arch_id, "predicted_p50_ms": 0.5},
    )
    # A report about nothing of this study is left out.
    store.add_device_report("robot-elsewhere", "run", {"returns": [1.0]})

    store.add_model_version(
        "latency",
        {"scale": 1.0},
        {
            "mae_ms": 0.05,
            "n": 3,
            "holdout": [
                {"arch_id": "a", "predicted_ms": 0.3, "measured_ms": 0.35},
                {"arch_id": "b", "predicted_ms": 0.7, "measured_ms": 0.6},
                {"arch_id": "c", "predicted_ms": "bad", "measured_ms": 1.0},
            ],
        },
        device="pi4-" + EVIL,
    )  # the study's device
    # another device's latency model in the same store is not this study's
    store.add_model_version(
        "latency", {"scale": 2.0}, {"other_device_metric": 1.0, "holdout": []}, device="cortex-m7"
    )
    store.add_model_version(
        "gap",
        {"w": [0.1]},
        {
            "rmse": 12.0,
            "points": [
                {"trial_id": trials[3].id, "predicted": 200.0, "lo": 180.0, "hi": 220.0, "real": 180.0},
                {"trial_id": trials[2].id, "predicted": 180.0, "lo": 170.0, "hi": 195.0, "real": 185.0},
            ],
        },
        study_id=study.id,
    )
    return store


def test_full_report_has_every_section_with_figures(full_study: Store, tmp_path: Path):
    out = write_report(full_study, "full " + EVIL, tmp_path / "sub" / "report.html")
    doc = out.read_text(encoding="utf-8")
    c = _parse(doc)
    assert list(c.sections) == list(SECTIONS)
    assert all(s["h2"] for s in c.sections.values())
    for sid in ("learning-curves", "pareto", "latency-model", "gap-model"):
        srcs = c.sections[sid]["img"]
        assert len(srcs) == 1, sid
        assert srcs[0].startswith("data:image/png;base64,")
        assert base64.b64decode(srcs[0].split(",", 1)[1]).startswith(PNG_MAGIC)
    # self-contained: no scripts, no external references
    assert c.scripts == 0
    assert not re.search(r'(src|href)="(?!data:)', doc)
    assert "no measurements yet" not in doc and "no robot reports yet" not in doc

    summary = " ".join(c.sections["summary"]["text"])
    assert "sim/CartPole-v0" in summary and "complete 4" in summary and "rejected 1" in summary
    # best trial first: the widest arch has the highest objective
    best = _arch(64).describe()
    assert summary.index(best) < summary.index(_arch(8).describe())
    pareto = " ".join(c.sections["pareto"]["text"])
    assert "1 candidate(s) rejected" in pareto
    deploy = " ".join(c.sections["deployments"]["text"])
    assert "rolled_back" in deploy and "active" in deploy and "robot-2" in deploy
    assert "robot-elsewhere" not in doc
    assert "abababababab" in deploy  # short sha of the run report
    assert "profile pi4" in deploy  # the registered robot's profile
    assert "0.450" in deploy  # bench invoke p50 450 us shown in ms
    assert "0.598" in deploy  # p99 of the run report's timings_ms
    latency_text = " ".join(c.sections["latency-model"]["text"])
    assert "mae_ms" in latency_text
    assert "other_device_metric" not in latency_text and "cortex-m7" not in latency_text
    assert "rmse" in " ".join(c.sections["gap-model"]["text"])


def test_store_text_is_escaped(full_study: Store):
    doc = render_report(full_study, "full " + EVIL)
    assert "<script>" not in doc
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;" in doc
    # the parsed text gets the original back: escaped once, not twice
    c = _parse(doc)
    assert any(EVIL in t for t in c.sections["deployments"]["text"])


def test_pareto_dominated_trial_is_not_on_front(store: Store):
    study = store.create_study("dom", _config("dom"))
    ids = []
    for i, (ret, p99) in enumerate(((100.0, 1.0), (90.0, 1.5), (150.0, 1.2))):
        arch = _arch(8 * (i + 1))
        t = store.add_trial(study.id, i, arch)
        m = _metrics(i, arch) | {"predicted_real_return": ret, "p99_ms": p99}
        store.complete_trial(t.id, TrialMetrics.from_dict(m), [(0, 1.0, 0.0), (10, 2.0, 0.0)], 1.0, 10)
        ids.append(t.id)
    c = _parse(render_report(store, "dom"))
    front_table = " ".join(c.sections["pareto"]["text"])
    assert f"trial {ids[0]}" in front_table and f"trial {ids[2]}" in front_table
    assert f"trial {ids[1]}" not in front_table  # (90, 1.5) is dominated by (150, 1.2)


def test_empty_study_renders_with_placeholders(store: Store, tmp_path: Path):
    store.create_study("empty", {"search": {}, "resolved": {}})
    doc = write_report(store, "empty", tmp_path / "empty.html").read_text(encoding="utf-8")
    c = _parse(doc)
    assert list(c.sections) == list(SECTIONS)
    assert all(not s["img"] for s in c.sections.values())
    assert "no measurements yet" in " ".join(c.sections["latency-model"]["text"])
    assert "no robot reports yet" in " ".join(c.sections["gap-model"]["text"])
    assert "no learning curves yet" in " ".join(c.sections["learning-curves"]["text"])
    assert "no deployments yet" in " ".join(c.sections["deployments"]["text"])


def test_gap_falls_back_to_run_reports_and_latency_to_bench(store: Store):
    study = store.create_study("fallback", _config("fallback"))
    arch = _arch(16)
    t = store.add_trial(study.id, 0, arch)
    store.complete_trial(t.id, TrialMetrics.from_dict(_metrics(0, arch)), [(0, 1.0, 0.5)], 1.0, 10)
    store.add_device_report("r1", "run", {"returns": [70.0, 90.0]}, trial_id=t.id)
    store.add_device_report("r1", "bench", {"invoke_us": {"p50": 300.0}}, trial_id=t.id)
    c = _parse(render_report(store, "fallback"))
    assert len(c.sections["gap-model"]["img"]) == 1
    assert "run reports joined" in " ".join(c.sections["gap-model"]["text"])
    assert len(c.sections["latency-model"]["img"]) == 1


def test_unknown_study_is_a_store_error(store: Store, tmp_path: Path):
    with pytest.raises(StoreError, match="nope"):
        write_report(store, "nope", tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


def test_plots_return_png_bytes():
    figs = [
        plots.learning_curves_png({"a": [(0, 1.0, 0.1), (1, 2.0, 0.2)]}),
        plots.pareto_png([plots.ParetoPoint("t", 1.0, 2.0, True)], 3.0, [5.0]),
        plots.latency_scatter_png({"s": [(1.0, 1.1)]}),
        plots.gap_png([plots.GapPoint(1.0, 0.8, 0.5, None)]),
    ]
    assert all(f.startswith(PNG_MAGIC) and len(f) > 5000 for f in figs)


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_renders_in_headless_chromium(full_study: Store, tmp_path: Path):
    page = write_report(full_study, "full " + EVIL, tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,3000",
            page.resolve().as_uri(),
        ],
        check=False,
        capture_output=True,
        timeout=60,
    )
    assert shot.exists()
    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 50_000


# ----------------------------------------------------------------------------- a report that explains itself


def test_format_number_kinds():
    assert format_number(1234.56, "return") == "1,234.6"
    assert format_number(0.12345, "objective") == "0.123"
    assert format_number(0.4499, "ms") == "0.450"
    assert format_number(1234567, "count") == "1,234,567"
    assert format_number(2000.0, "count") == "2,000"
    assert format_number(None, "ms") == "" and format_number(float("nan"), "return") == ""
    assert format_number("text", "count") == "" and format_number(True, "count") == ""
    with pytest.raises(ValueError, match="unknown number kind"):
        format_number(1.0, "furlongs")


def test_every_figure_and_table_has_a_caption_defining_its_terms(full_study: Store):
    doc = render_report(full_study, "full " + EVIL)
    c = _parse(doc)
    for sid in ("summary", "learning-curves", "search-history", "importance", "pareto", "latency-model"):
        assert len(c.sections[sid]["img"]) == (0 if sid == "summary" else 1), sid
    # every figure and every table is followed directly by its caption
    figures_and_tables = re.findall(r"(?:<img [^>]*>|</table>)\s*(<p class=\"caption\">)?", doc)
    assert len(figures_and_tables) >= 12 and all(figures_and_tables), figures_and_tables
    summary = " ".join(c.sections["summary"]["text"])
    # the objective's definition with the (default) weights, and the predicted real return's
    assert "0.5 x normalised AUC + 0.5 x normalised predicted real return" in summary
    assert "(r - floor) / (target - floor)" in summary
    assert "asymptotic return minus the modelled sim-to-real gap" in summary
    assert "90% interval" in summary
    assert "pred. real" not in summary  # the old undefined abbreviation is gone
    # numbers: returns with one decimal, objectives with three, counts with separators
    assert "10.0 .. 500.0" in summary  # resolved floor .. target
    assert "0.550" in summary  # best objective 0.1 + 0.15 * 3
    assert "8,000" in summary  # env steps: 4 trials x 2000


def test_objective_weights_come_from_the_config(store: Store):
    config = _config("w")
    config["search"]["objective"] = {"ranking": "mean", "auc": 0.3, "real_return": 0.7}
    study = store.create_study("w", config)
    arch = _arch(8)
    t = store.add_trial(study.id, 0, arch)
    store.complete_trial(t.id, TrialMetrics.from_dict(_metrics(0, arch)), [(0, 1.0, 0.0)], 1.0, 10)
    summary = " ".join(_parse(render_report(store, "w")).sections["summary"]["text"])
    assert "0.3 x normalised AUC + 0.7 x normalised predicted real return," in summary


def test_learning_curves_get_the_target_and_floor(full_study: Store, monkeypatch):
    seen = {}
    real = plots.learning_curves_png

    def spy(curves, return_lo=None, return_hi=None):
        seen.update(lo=return_lo, hi=return_hi, n=len(curves))
        return real(curves, return_lo, return_hi)

    monkeypatch.setattr(plots, "learning_curves_png", spy)
    text = " ".join(_parse(render_report(full_study, "full " + EVIL)).sections["learning-curves"]["text"])
    assert seen == {"lo": 10.0, "hi": 500.0, "n": 4}
    assert "target (return_hi)" in text and "floor (return_lo)" in text


def test_search_history_is_best_so_far_over_time_and_steps(full_study: Store, monkeypatch):
    seen: list = []
    real = plots.search_history_png

    def spy(points):
        seen.extend(points)
        return real(points)

    monkeypatch.setattr(plots, "search_history_png", spy)
    c = _parse(render_report(full_study, "full " + EVIL))
    # the four complete trials, in finishing order, with cumulative env steps
    assert [p.env_steps for p in seen] == [2000, 4000, 6000, 8000]
    assert [round(p.objective, 3) for p in seen] == [0.1, 0.25, 0.4, 0.55]
    assert seen[0].wall_s == 0.0 and all(b.wall_s >= a.wall_s for a, b in itertools.pairwise(seen))
    text = " ".join(c.sections["search-history"]["text"])
    assert "best so far (now 0.550)" in text and "8,000 in total" in text


def test_search_history_placeholder_without_complete_trials(store: Store):
    store.create_study("none", _config("none"))
    c = _parse(render_report(store, "none"))
    assert not c.sections["search-history"]["img"]
    assert "no finished trials yet" in " ".join(c.sections["search-history"]["text"])


class _Rows(HTMLParser):
    """The cell texts of every table row in one section."""

    def __init__(self, section: str) -> None:
        super().__init__(convert_charrefs=True)
        self.section, self.inside, self.rows, self._cell = section, False, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.inside = dict(attrs).get("id") == self.section
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if self.inside and tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_deployments_are_a_readable_table(full_study: Store):
    # a canary report with a miss rate for the live artifact on robot-2
    robot2_art = next(
        d.artifact_id for d in full_study.deployments() if d.device == "robot-2" and d.status == "active"
    )
    full_study.add_device_report(
        "robot-2",
        "canary",
        {"returns": [140.0, 150.0], "steps": 400, "deadline_misses": 6},
        artifact_id=robot2_art,
    )
    doc = render_report(full_study, "full " + EVIL)
    p = _Rows("deployments")
    p.feed(doc)
    header = p.rows[0]
    assert header == [
        "robot",
        "artifact / trial",
        "architecture",
        "status",
        "when",
        "note",
        "canary return",
        "miss rate",
    ]
    rows = {(r[0], r[3]): r for r in p.rows[1:4]}
    live2 = rows[("robot-2", "active")]
    assert live2[1].startswith(f"artifact {robot2_art} / trial ")
    assert live2[6] == "145.0" and live2[7] == "1.5%"  # 6 misses in 400 steps
    live = rows[("robot-" + EVIL, "active")]
    assert live[6] == "155.0"  # mean of the canary's returns [150, 160]
    rolled = rows[("robot-" + EVIL, "rolled_back")]
    assert rolled[5] == "canary " + EVIL and rolled[6] == ""
    assert "slot=B" not in doc and "reason=" not in doc  # no key=value dumps


def test_param_importances_find_the_choice_that_drives_the_objective():
    # width decides the objective; the activation alternates and does not; depth never varies
    rows = []
    for i, width in enumerate((8, 16, 32, 64, 128, 256, 8, 16, 32, 64, 128, 256)):
        act = ("tanh", "relu")[i % 2]
        arch = PolicyArch(obs_dim=4, act_dim=1, layers=(Layer(width, act), Layer(width, "relu")))
        rows.append((arch, width / 256.0))
    imp = param_importances(rows)
    assert "depth" not in imp and "layer norm" not in imp  # the same in every trial
    assert set(imp) >= {"first layer width", "first activation"}
    assert sum(imp.values()) == pytest.approx(1.0)
    assert imp["first layer width"] > imp["first activation"]
    assert param_importances(rows[:3]) == {}  # too few trials to say anything
    same = [(_arch(8), 0.1 * i) for i in range(5)]
    assert param_importances(same) == {}  # nothing varies


def test_importance_section_has_a_figure_or_says_why_not(full_study: Store, store: Store):
    c = _parse(render_report(full_study, "full " + EVIL))
    assert len(c.sections["importance"]["img"]) == 1
    assert "mattered most" in " ".join(c.sections["importance"]["text"])
    study = store.create_study("few", _config("few"))
    arch = _arch(8)
    t = store.add_trial(study.id, 0, arch)
    store.complete_trial(t.id, TrialMetrics.from_dict(_metrics(0, arch)), [(0, 1.0, 0.0)], 1.0, 10)
    c = _parse(render_report(store, "few"))
    assert not c.sections["importance"]["img"]
    assert "needs 4 complete trials" in " ".join(c.sections["importance"]["text"])
