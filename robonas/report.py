"""The study report: one self-contained HTML file (`robonas report STUDY --out FILE.html`).

Reads the store only. Figures come from `robonas.plots` (matplotlib, Agg) and are inlined as
base64 PNG data URLs, and the little CSS there is sits in a `<style>` block, so the file can be
mailed or archived with nothing else. The HTML is assembled by hand with `html.escape` on every
string that came from the store: a template engine (jinja2) is not a dependency and a dozen small
functions that each return one section read just as well.

Device reports and model versions are written by the agent, fleet and recalibration code, whose
payloads may grow or lack keys, so everything read from them goes through the tolerant helpers
(`_float`, `_timings`, `_returns`) and a missing figure becomes a "no ... yet" line, never an
exception.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.atomic import atomic_write
from robonas import plots
from robonas.errors import RobonasError
from robonas.metrics import TrialMetrics
from robonas.scoring import pareto_front
from robonas.store import DeploymentRow, DeviceReportRow, ModelVersionRow, Store, TrialRow
from robonas.study_views import ranked_trials, study_status

SECTIONS = ("summary", "learning-curves", "pareto", "latency-model", "gap-model", "deployments")
TOP_TRIALS = 10  # rows of the best-trials table
TOP_CURVES = 5  # trials drawn in the learning-curve figure
LAST_REPORTS = 5  # device reports listed per robot

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; } td.t { text-align: left; }
img { max-width: 100%; } .empty { color: #777; font-style: italic; }
section { margin-bottom: 2.5em; }
"""


# ----------------------------------------------------------------------------- small helpers


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _float(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, text, bool, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: Any, digits: int = 3) -> str:
    f = _float(value)
    if f is None:
        return "" if value is None else _e(value)
    if f == int(f) and abs(f) < 1e15:
        return f"{int(f):,}" if isinstance(value, int) else f"{f:.{digits}g}"
    return f"{f:.{digits}g}" if abs(f) >= 1000 or abs(f) < 0.01 else f"{f:.{digits}f}"


def _time(t: datetime | None) -> str:
    return "" if t is None else t.strftime("%Y-%m-%d %H:%M:%S UTC")


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _empty(text: str) -> str:
    return f'<p class="empty">{_e(text)}</p>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], text_cols: int = 0) -> str:
    """Rows of already-escaped cell HTML; the first `text_cols` columns are left-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="t">{c}</td>' if i < text_cols else f"<td>{c}</td>" for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}">\n<h2>{_e(title)}</h2>\n{body}\n</section>'


def _timings(payload: Mapping[str, Any]) -> dict[str, float]:
    """p50/p90/p99 ms from a report's `timings_ms` {p50, p90, p99}."""
    raw = payload.get("timings_ms")
    if isinstance(raw, Mapping):
        return {k: v for k in ("p50", "p90", "p99") if (v := _float(raw.get(k))) is not None}
    return {}


def _report_timings(r: DeviceReportRow) -> dict[str, float]:
    """Control-step timings of a run/canary report, or the interpreter's invoke time of a bench."""
    timings = _timings(r.payload)
    invoke = r.payload.get("invoke_us")
    if not timings and isinstance(invoke, Mapping):
        timings = {k: v / 1000.0 for k in ("p50", "p99") if (v := _float(invoke.get(k))) is not None}
    return timings


def _returns(payload: Mapping[str, Any]) -> list[float]:
    raw = payload.get("returns")
    if not isinstance(raw, list):
        return []
    return [v for v in map(_float, raw) if v is not None]


# ----------------------------------------------------------------------------- what the study owns


class _StudyData:
    """Everything the report needs, read once: the study's trials and the rows that link to them."""

    def __init__(self, store: Store, study_name: str) -> None:
        self.study = store.get_study(study_name)
        self.status = study_status(store, study_name)
        self.ranked = ranked_trials(store, study_name, n=TOP_TRIALS)
        self.trials = store.trials(self.study.id)
        self.by_id: dict[int, TrialRow] = {t.id: t for t in self.trials}
        self.arch_ids = {t.arch_id for t in self.trials}
        self.curves = {r.trial: store.curve(r.trial) for r in self.ranked.rows[:TOP_CURVES]}
        # artifact id -> trial id, for every artifact made from this study's trials
        self.artifact_trial: dict[int, int] = {a.id: t.id for t in self.trials for a in store.artifacts(t.id)}
        self.deployments: list[DeploymentRow] = [
            d for d in store.deployments() if d.artifact_id in self.artifact_trial
        ]
        self.reports: list[DeviceReportRow] = [
            r
            for r in store.device_reports()
            if self.report_trial(r) is not None
            or (r.kind == "bench" and r.payload.get("arch_id") in self.arch_ids)
        ]
        search = self.study.config.get("search") or {}
        self.search = search if isinstance(search, Mapping) else {}
        # latency models are per device: only the study's device's (a store can hold studies
        # for several devices); gap models are per study
        device = self.section("device").get("profile")
        mine = (None, self.study.id)
        self.models: dict[str, list[ModelVersionRow]] = {
            "latency": [
                m
                for m in store.model_versions("latency")
                if m.study_id in mine and (device is None or m.device == device)
            ],
            "gap": [m for m in store.model_versions("gap") if m.study_id in mine],
        }
        self.devices = {x.name: x for x in store.devices()}

    def report_trial(self, r: DeviceReportRow) -> TrialRow | None:
        """The study trial a device report is about, through its trial id or its artifact."""
        tid = r.trial_id
        if tid not in self.by_id and r.artifact_id is not None:
            tid = self.artifact_trial.get(r.artifact_id)
        return self.by_id.get(tid) if tid is not None else None

    def section(self, key: str) -> Mapping[str, Any]:
        value = self.search.get(key)
        return value if isinstance(value, Mapping) else {}

    @property
    def budget_ms(self) -> float | None:
        return _float(self.section("device").get("latency_budget_ms"))


# ----------------------------------------------------------------------------- sections


def _summary(d: _StudyData) -> str:
    s = d.status
    resolved = d.study.config.get("resolved") or {}
    facts = [
        ("study", _e(d.study.name)),
        ("status", _e(s.status)),
        ("env", _e(s.env)),
        ("device profile", _e(s.device)),
        ("latency budget (p99)", f"{_fmt(d.budget_ms)} ms" if d.budget_ms is not None else ""),
        (
            "return range",
            f"{_fmt(resolved.get('return_lo'))} .. {_fmt(resolved.get('return_hi'))}"
            if isinstance(resolved, Mapping)
            else "",
        ),
        ("trials", ", ".join(f"{_e(k)} {n}" for k, n in s.counts.items())),
        ("env steps", _fmt(s.env_steps)),
        ("wall time", f"{_fmt(s.wall_s)} s"),
        ("ranked by", _e(d.ranked.ranked_by)),
        ("models", _e(", ".join(f"{k} {v}" for k, v in d.ranked.models.items()))),
        ("updated", _e(_time(s.updated_at))),
    ]
    body = _table(("field", "value"), ((f"<b>{_e(k)}</b>", v) for k, v in facts), text_cols=2)
    rows = d.ranked.rows
    if not rows:
        return body + _empty("no complete trials yet")
    head = (
        "rank",
        "trial",
        "architecture",
        "pareto",
        "seeds",
        "objective over seeds",
        "objective",
        "objective lcb",
        "auc",
        "asymptotic",
        "robustness",
        "pred. real",
        "p50 ms",
        "p99 ms",
        "params",
    )
    cells = (
        [
            _e(r.rank),
            _e(r.trial),
            _e(r.arch),
            "&#9733;" if r.pareto else "",
            _e(r.seeds),
            _fmt(r.seed_mean) + (f" &plusmn; {_fmt(r.seed_std)}" if r.seeds > 1 else ""),
            *(
                _fmt(getattr(r, k))
                for k in (
                    "objective",
                    "objective_lcb",
                    "auc",
                    "asymptotic_return",
                    "robustness_return",
                    "predicted_real_return",
                    "p50_ms",
                    "p99_ms",
                    "params",
                )
            ),
        ]
        for r in rows
    )
    return body + "<h3>Best trials</h3>" + _table(head, cells, text_cols=3)


def _learning_curves(d: _StudyData) -> str:
    labels = {r.trial: f"#{r.rank} trial {r.trial} {r.arch}" for r in d.ranked.rows}
    curves = {labels[tid]: pts for tid, pts in d.curves.items() if pts}
    if not curves:
        return _empty("no learning curves yet")
    return _img(plots.learning_curves_png(curves), "learning curves of the top trials")


def _pareto(d: _StudyData) -> str:
    pts = []
    for t in d.trials:
        m = t.metrics or TrialMetrics()
        ret, p99 = _float(m.predicted_real_return), _float(m.p99_ms)
        if t.status == "complete" and ret is not None and p99 is not None:
            pts.append((t, ret, p99))
    rejected = [
        p99
        for t in d.trials
        if t.status == "rejected"
        if (p99 := _float((t.metrics or TrialMetrics()).p99_ms)) is not None
    ]
    if not pts and not rejected:
        return _empty("no complete trials yet")
    front = set(pareto_front((t.id, ret, p99) for t, ret, p99 in pts))
    points = [plots.ParetoPoint(f"trial {t.id}", ret, p99, t.id in front) for t, ret, p99 in pts]
    body = _img(plots.pareto_png(points, d.budget_ms, rejected), "predicted real return against p99 latency")
    on_front = sorted((p for p in points if p.on_front), key=lambda p: p.p99_ms)
    if on_front:
        body += _table(
            ("front", "pred. real return", "p99 ms"),
            ([_e(p.label), _fmt(p.predicted_real_return), _fmt(p.p99_ms)] for p in on_front),
            text_cols=1,
        )
    if rejected:
        body += (
            f"<p>{len(rejected)} candidate(s) rejected before training (predicted p99 "
            f"over the budget), marked &#215; along the bottom.</p>"
        )
    return body


def _latency_points(d: _StudyData) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    if d.models["latency"]:
        latest = d.models["latency"][-1]
        rows = latest.metrics.get("holdout")
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, Mapping):
                pred, meas = _float(row.get("predicted_ms")), _float(row.get("measured_ms"))
                if pred is not None and meas is not None:
                    series.setdefault(f"holdout, model v{latest.version}", []).append((pred, meas))
    for r in d.reports:
        if r.kind != "bench":
            continue
        invoke = r.payload.get("invoke_us")
        measured = _float(invoke.get("p50")) if isinstance(invoke, Mapping) else None
        pred = _float(r.payload.get("predicted_p50_ms"))
        trial = d.report_trial(r)
        if pred is None and trial is not None:
            pred = _float((trial.metrics or TrialMetrics()).p50_ms)
        if measured is not None and pred is not None:
            series.setdefault("bench reports (p50)", []).append((pred, measured / 1000.0))
    return series


def _model_table(models: Sequence[ModelVersionRow]) -> str:
    """One row per fit: version, scope, time and its scalar metrics (lists are left out)."""
    keys = sorted({k for m in models for k, v in m.metrics.items() if _float(v) is not None})
    rows = (
        [
            _e(m.version),
            _e(m.device or "any"),
            _e(_time(m.created_at)),
            *(_fmt(m.metrics.get(k)) for k in keys),
        ]
        for m in models
    )
    return _table(("version", "device", "fitted", *keys), rows, text_cols=3)


def _latency_model(d: _StudyData) -> str:
    series = _latency_points(d)
    body = (
        _img(plots.latency_scatter_png(series), "predicted against measured latency")
        if series
        else _empty("no measurements yet")
    )
    if d.models["latency"]:
        body += "<h3>Latency model versions</h3>" + _model_table(d.models["latency"])
    return body


def _gap_points(d: _StudyData) -> tuple[list[plots.GapPoint], str]:
    if d.models["gap"]:
        latest = d.models["gap"][-1]
        rows = latest.metrics.get("points")
        pts = []
        for row in rows if isinstance(rows, list) else []:
            if not isinstance(row, Mapping):
                continue
            pred, real = _float(row.get("predicted")), _float(row.get("real"))
            if pred is not None and real is not None:
                pts.append(plots.GapPoint(pred, real, _float(row.get("lo")), _float(row.get("hi"))))
        if pts:
            return pts, f"points of gap model v{latest.version}"
    pts = []
    for r in d.reports:
        trial, returns = d.report_trial(r), _returns(r.payload)
        if r.kind != "run" or trial is None or not returns:
            continue
        m = trial.metrics or TrialMetrics()
        pred, std = _float(m.predicted_real_return), _float(m.predicted_real_std)
        if pred is not None:
            lo, hi = (pred - std, pred + std) if std is not None else (None, None)
            pts.append(plots.GapPoint(pred, float(np.mean(returns)), lo, hi))
    return pts, "robot run reports joined to their trials (bars: +-1 std of the prediction)"


def _gap_model(d: _StudyData) -> str:
    pts, source = _gap_points(d)
    body = (
        _img(plots.gap_png(pts), "predicted against real return") + f"<p>{_e(source)}</p>"
        if pts
        else _empty("no robot reports yet")
    )
    if d.models["gap"]:
        body += "<h3>Gap model versions</h3>" + _model_table(d.models["gap"])
    return body


def _report_cells(d: _StudyData, r: DeviceReportRow) -> list[str]:
    trial = d.report_trial(r)
    returns, timings = _returns(r.payload), _report_timings(r)
    sha = r.payload.get("sha256")
    return [
        _e(_time(r.created_at)),
        _e(r.kind),
        _e("" if trial is None else trial.id),
        _fmt(float(np.mean(returns))) if returns else "",
        _e(len(returns) or ""),
        _fmt(timings.get("p50")),
        _fmt(timings.get("p99")),
        _fmt(r.payload.get("deadline_misses")),
        _e(sha[:12] if isinstance(sha, str) else ""),
    ]


def _deployments(d: _StudyData) -> str:
    robots = sorted({x.device for x in d.deployments} | {r.device for r in d.reports})
    if not robots:
        return _empty("no deployments yet")
    parts = []
    for robot in robots:
        parts.append(f"<h3>{_e(robot)}</h3>")
        known = d.devices.get(robot)
        if known is not None:
            parts.append(
                f"<p>profile {_e(known.profile)}, last seen {_e(_time(known.last_seen) or 'never')}</p>"
            )
        deps = [x for x in d.deployments if x.device == robot]
        if deps:
            rows = (
                [
                    _e(x.id),
                    _e(_time(x.created_at)),
                    _e(x.status),
                    _e(x.artifact_id),
                    _e(d.artifact_trial.get(x.artifact_id)),
                    _e(d.by_id[d.artifact_trial[x.artifact_id]].arch_id),
                    _e(", ".join(f"{k}={v}" for k, v in sorted(x.detail.items()))),
                ]
                for x in reversed(deps)
            )
            parts.append(
                _table(
                    ("deployment", "time", "status", "artifact", "trial", "arch", "detail"), rows, text_cols=3
                )
            )
        else:
            parts.append(_empty("no deployments from this study yet"))
        reports = [r for r in d.reports if r.device == robot][-LAST_REPORTS:]
        if reports:
            parts.append(
                "<h4>Last reports</h4>"
                + _table(
                    (
                        "time",
                        "kind",
                        "trial",
                        "mean return",
                        "episodes",
                        "p50 ms",
                        "p99 ms",
                        "deadline misses",
                        "sha256",
                    ),
                    (_report_cells(d, r) for r in reversed(reports)),
                    text_cols=3,
                )
            )
        else:
            parts.append(_empty("no robot reports yet"))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- entry points


def render_report(store: Store, study_name: str) -> str:
    """The report of one study as an HTML document (str); raises StoreError for an unknown study."""
    d = _StudyData(store, study_name)
    sections = [
        _section("summary", "Summary", _summary(d)),
        _section("learning-curves", "Learning curves", _learning_curves(d)),
        _section("pareto", "Return vs latency (Pareto front)", _pareto(d)),
        _section("latency-model", "Latency model", _latency_model(d)),
        _section("gap-model", "Sim-to-real gap model", _gap_model(d)),
        _section("deployments", "Deployments", _deployments(d)),
    ]
    title = f"robonas study {d.study.name}"
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )


def write_report(store: Store, study_name: str, out_path: str | os.PathLike[str]) -> Path:
    """Write the study's report to `out_path` atomically (temp file, fsync, replace)."""
    out = Path(out_path)
    text = render_report(store, study_name)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, text.encode("utf-8"))
    except OSError as e:
        raise RobonasError(f"cannot write report to {out}: {e}") from e
    return out
