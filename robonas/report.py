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
from robonas.space import PolicyArch
from robonas.store import DeploymentRow, DeviceReportRow, ModelVersionRow, Store, TrialRow
from robonas.study_views import ranked_trials, study_status

SECTIONS = (
    "summary",
    "learning-curves",
    "search-history",
    "importance",
    "pareto",
    "latency-model",
    "gap-model",
    "deployments",
)
TOP_TRIALS = 10  # rows of the best-trials table
MIN_IMPORTANCE_TRIALS = 4  # fewer complete trials than this say nothing about which choices matter
TOP_CURVES = 5  # trials drawn in the learning-curve figure
LAST_REPORTS = 5  # device reports listed per robot

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1240px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 0.3em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f2f2f2; } td.t { text-align: left; }
img { max-width: 100%; } .empty { color: #777; font-style: italic; }
p.caption { color: #444; font-size: 0.9em; margin: 0.2em 0 1.2em; max-width: 60em; }
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


# digits after the point per kind of figure; "count" is an integer with thousands separators
_DIGITS = {"return": 1, "objective": 3, "ms": 3, "seconds": 1, "percent": 1}


def format_number(value: Any, kind: str) -> str:
    """One figure as the report shows it: returns 1 decimal, objectives and ms 3 decimals,
    counts as integers with thousands separators (1,234,567). Missing or non-finite -> ""."""
    f = _float(value)
    if f is None:
        return ""
    if kind == "count":
        return f"{round(f):,}"
    if kind not in _DIGITS:
        raise ValueError(f"unknown number kind {kind!r}; valid: count, {', '.join(_DIGITS)}")
    return f"{f:,.{_DIGITS[kind]}f}"


def _caption(text: str) -> str:
    """What a table or figure shows and how to read it; `text` is trusted report HTML."""
    return f'<p class="caption">{text}</p>'


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
    def return_range(self) -> tuple[float | None, float | None]:
        """The study's resolved (return_lo, return_hi): the floor and target of the objective."""
        resolved = self.study.config.get("resolved")
        if not isinstance(resolved, Mapping):
            return None, None
        return _float(resolved.get("return_lo")), _float(resolved.get("return_hi"))

    @property
    def weights(self) -> tuple[float, float]:
        """(auc, real_return) objective weights from the config; scoring's defaults are 0.5/0.5."""
        obj = self.section("objective")
        w_auc, w_real = _float(obj.get("auc")), _float(obj.get("real_return"))
        return (0.5 if w_auc is None else w_auc), (0.5 if w_real is None else w_real)

    @property
    def budget_ms(self) -> float | None:
        return _float(self.section("device").get("latency_budget_ms"))


# ----------------------------------------------------------------------------- sections


def _summary(d: _StudyData) -> str:
    s = d.status
    lo, hi = d.return_range
    facts = [
        ("study", _e(d.study.name)),
        ("status", _e(s.status)),
        ("env", _e(s.env)),
        ("device profile", _e(s.device)),
        ("latency budget (p99)", f"{format_number(d.budget_ms, 'ms')} ms" if d.budget_ms is not None else ""),
        (
            "return range (floor .. target)",
            f"{format_number(lo, 'return')} .. {format_number(hi, 'return')}"
            if lo is not None and hi is not None
            else "",
        ),
        ("objective", _objective_definition(d)),
        ("trials", ", ".join(f"{_e(k)} {format_number(n, 'count')}" for k, n in s.counts.items())),
        ("env steps", format_number(s.env_steps, "count")),
        ("wall time", f"{format_number(s.wall_s, 'seconds')} s"),
        ("ranked by", _e(d.ranked.ranked_by)),
        ("models", _e(", ".join(f"{k} {v}" for k, v in d.ranked.models.items()))),
        ("updated", _e(_time(s.updated_at))),
    ]
    body = _table(("field", "value"), ((f"<b>{_e(k)}</b>", v) for k, v in facts), text_cols=2)
    body += _caption(
        "The study at a glance. The return range is the study's resolved floor (about what a random "
        "policy scores) and target; returns are normalised to [0, 1] by it for the objective."
    )
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
        "predicted real return",
        "90% interval",
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
            format_number(r.seed_mean, "objective")
            + (f" &plusmn; {format_number(r.seed_std, 'objective')}" if r.seeds > 1 else ""),
            *(format_number(getattr(r, k), kind) for k, kind in _RANKED_COLUMNS[:6]),
            _interval(r.predicted_real_lo90, r.predicted_real_hi90),
            *(format_number(getattr(r, k), kind) for k, kind in _RANKED_COLUMNS[6:]),
        ]
        for r in rows
    )
    caption = _caption(
        "Best candidates first, ranked by <b>" + _e(d.ranked.ranked_by) + "</b>. "
        "<b>Objective</b>: " + _objective_definition(d) + " "
        "<b>Objective lcb</b> is the objective minus its uncertainty (from the gap model's spread), "
        "a cautious score. <b>Predicted real return</b> is the simulated asymptotic return minus the "
        "modelled sim-to-real gap (or the robot twins' prediction once robots have twins); its "
        "<b>90% interval</b> is the range the real return should fall in 9 times out of 10. "
        "<b>auc</b> is the normalised area under the learning curve (0..1, higher learned faster); "
        "<b>robustness</b> is the return under perturbed physics; p50/p99 ms are the predicted "
        "per-step latency on the study's device; &#9733; marks the return/latency Pareto front."
    )
    return body + "<h3>Best trials</h3>" + _table(head, cells, text_cols=3) + caption


_RANKED_COLUMNS = (
    ("objective", "objective"),
    ("objective_lcb", "objective"),
    ("auc", "objective"),
    ("asymptotic_return", "return"),
    ("robustness_return", "return"),
    ("predicted_real_return", "return"),
    ("p50_ms", "ms"),
    ("p99_ms", "ms"),
    ("params", "count"),
)


def _interval(lo: Any, hi: Any) -> str:
    a, b = format_number(lo, "return"), format_number(hi, "return")
    return f"{a} .. {b}" if a and b else ""


def _objective_definition(d: _StudyData) -> str:
    """The objective in words with this study's weights (scoring.objective's formula)."""
    w_auc, w_real = d.weights
    total = w_auc + w_real
    mix = f"{w_auc:g} x normalised AUC + {w_real:g} x normalised predicted real return"
    return _e(
        (mix if total == 1 else f"({mix}) / {total:g}") + ", "
        "where a return r is normalised as (r - floor) / (target - floor), clipped to [0, 1]; "
        "higher is better."
    )


def _learning_curves(d: _StudyData) -> str:
    labels = {r.trial: f"#{r.rank} trial {r.trial} {r.arch}" for r in d.ranked.rows}
    curves = {labels[tid]: pts for tid, pts in d.curves.items() if pts}
    if not curves:
        return _empty("no learning curves yet")
    lo, hi = d.return_range
    return _img(plots.learning_curves_png(curves, lo, hi), "learning curves of the top trials") + _caption(
        f"Mean evaluation return against env steps for the top {len(curves)} trials (band: &plusmn;1 std "
        "over evaluation episodes). The dashed line is the target (return_hi) and the dotted line the "
        "floor (return_lo) the objective normalises by; a curve that flattens below the target has "
        "converged short of it."
    )


def _search_history(d: _StudyData) -> str:
    done = sorted(
        (
            (t.finished_at, t, obj)
            for t in d.trials
            if t.status == "complete"
            and t.finished_at is not None
            and (obj := _float((t.metrics or TrialMetrics()).objective)) is not None
        ),
        key=lambda x: x[0],
    )
    if not done:
        return _empty("no finished trials yet")
    start = done[0][0]
    points, steps = [], 0
    for finished, t, obj in done:
        steps += t.env_steps or 0
        points.append(plots.HistoryPoint((finished - start).total_seconds(), steps, obj))
    best = max(p.objective for p in points)
    return _img(plots.search_history_png(points), "best objective so far over the search") + _caption(
        f"Each dot is one complete trial's objective; the line is the best so far (now "
        f"{format_number(best, 'objective')}), against wall time since the first trial finished (left) "
        f"and against the env steps spent by all trials so far (right, {format_number(steps, 'count')} "
        "in total). A line that has stayed flat for long says more trials are unlikely to help."
    )


def arch_features(arch: PolicyArch) -> dict[str, float | str]:
    """The architecture choices whose importance the report estimates, as Optuna param values."""
    return {
        "depth": float(len(arch.layers)),
        "first layer width": float(arch.layers[0].width) if arch.layers else 0.0,
        "total width": float(sum(layer.width for layer in arch.layers)),
        "first activation": arch.layers[0].activation if arch.layers else "none",
        "layer norm": str(arch.layer_norm),
        "residual": str(arch.residual),
        "shared trunk": str(arch.shared_trunk),
        "history": float(arch.history),
    }


def param_importances(rows: Sequence[tuple[PolicyArch, float]]) -> dict[str, float]:
    """Optuna's PED-ANOVA importance of each varying architecture choice for the objective.

    The store's complete trials become finished trials of an in-memory Optuna study
    (`create_trial` + `add_trials`), so the estimate uses Optuna's evaluator as is; choices that
    are the same in every trial carry no information and are left out. Empty when fewer than
    MIN_IMPORTANCE_TRIALS trials or no choice varies. PED-ANOVA rather than the default fANOVA:
    fANOVA needs scikit-learn, which is not a dependency, and PED-ANOVA is deterministic.
    """
    import optuna  # imported here: a second of import time only reports that need it pay
    from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

    if len(rows) < MIN_IMPORTANCE_TRIALS:
        return {}
    feats = [arch_features(a) for a, _ in rows]
    dists: dict[str, BaseDistribution] = {}
    for key in feats[0]:
        values = sorted({f[key] for f in feats}, key=str)
        if len(values) < 2:
            continue
        if isinstance(values[0], float):
            nums = [float(v) for v in values]
            dists[key] = FloatDistribution(min(nums), max(nums))
        else:
            dists[key] = CategoricalDistribution([str(v) for v in values])
    if not dists:
        return {}
    # the study is a private calculation: its "new study created" INFO line is noise in a CLI run
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize", storage=optuna.storages.InMemoryStorage())
    finally:
        optuna.logging.set_verbosity(verbosity)
    study.add_trials(
        [
            optuna.trial.create_trial(params={k: f[k] for k in dists}, distributions=dists, value=value)
            for f, (_, value) in zip(feats, rows, strict=True)
        ]
    )
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))


def _importance(d: _StudyData) -> str:
    rows = [
        (t.arch, obj)
        for t in d.trials
        if t.status == "complete" and (obj := _float((t.metrics or TrialMetrics()).objective)) is not None
    ]
    importances = param_importances(rows)
    if not importances:
        return _empty(
            f"not enough yet: needs {MIN_IMPORTANCE_TRIALS} complete trials whose architectures differ"
        )
    best = max(importances.values())
    top = " and ".join(k for k, v in importances.items() if v >= best - 1e-9)  # ties named together
    return _img(plots.importance_png(importances), "importance of each architecture choice") + _caption(
        f"How much of the spread in the objective over the {len(rows)} complete trials each architecture "
        "choice accounts for: Optuna's PED-ANOVA estimate of how differently a choice is distributed among "
        "the best trials than among all of them (shares sum to 1). Choices that were the same in "
        f"every trial are left out. Here <b>{_e(top)}</b> mattered most; with few trials, or with "
        "choices that always change together, read this as a hint, not a measurement."
    )


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
    body += _caption(
        "Each complete trial's predicted real return (up is better) against its predicted p99 "
        "control-step latency on the study's device (left is better). The red step line joins the "
        "Pareto front: trials no other trial beats on both. The dashed vertical line is the latency "
        "budget."
    )
    on_front = sorted((p for p in points if p.on_front), key=lambda p: p.p99_ms)
    if on_front:
        body += _table(
            ("front", "predicted real return", "p99 ms"),
            (
                [_e(p.label), format_number(p.predicted_real_return, "return"), format_number(p.p99_ms, "ms")]
                for p in on_front
            ),
            text_cols=1,
        ) + _caption(
            "The Pareto-front trials from fastest to slowest: each buys its extra return with latency."
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
    if series:
        body += _caption(
            "Predicted against measured per-step latency in ms: the latest latency model's held-out "
            "architectures and the robots' bench reports (p50). Points on the dotted y = x line are "
            "predicted exactly; points above it ran slower than predicted."
        )
    if d.models["latency"]:
        body += "<h3>Latency model versions</h3>" + _model_table(d.models["latency"])
        body += _caption("One row per fit of the latency model, newest last, with its fit statistics.")
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
            return pts, f"points of gap model v{latest.version} (bars: mean +-2 std of the predicted gap)"
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
        _img(plots.gap_png(pts), "predicted against real return")
        + _caption(
            "Mean return measured on the robot against the predicted real return (simulated "
            "asymptote minus the modelled sim-to-real gap). Horizontal bars are the prediction's "
            "uncertainty; points on the dotted y = x line were predicted exactly, points below it "
            "did worse on the robot than predicted. Source: " + _e(source) + "."
        )
        if pts
        else _empty("no robot reports yet")
    )
    if d.models["gap"]:
        body += "<h3>Gap model versions</h3>" + _model_table(d.models["gap"])
        body += _caption("One row per fit of the gap model, newest last, with its fit statistics.")
    return body


def _report_cells(d: _StudyData, r: DeviceReportRow) -> list[str]:
    trial = d.report_trial(r)
    returns, timings = _returns(r.payload), _report_timings(r)
    sha = r.payload.get("sha256")
    return [
        _e(_time(r.created_at)),
        _e(r.kind),
        _e("" if trial is None else trial.id),
        format_number(float(np.mean(returns)), "return") if returns else "",
        format_number(len(returns) or None, "count"),
        format_number(timings.get("p50"), "ms"),
        format_number(timings.get("p99"), "ms"),
        format_number(r.payload.get("deadline_misses"), "count"),
        _e(sha[:12] if isinstance(sha, str) else ""),
    ]


def _miss_rate(payload: Mapping[str, Any]) -> float | None:
    """Deadline misses per control step: the report's `miss_rate`, else misses / steps."""
    rate = _float(payload.get("miss_rate"))
    if rate is None:
        misses, steps = _float(payload.get("deadline_misses")), _float(payload.get("steps"))
        rate = misses / steps if misses is not None and steps else None
    return rate


def _deployment_row(d: _StudyData, x: DeploymentRow) -> list[str]:
    """robot, artifact/trial, arch, status, when, note, canary return, miss rate."""
    tid = d.artifact_trial[x.artifact_id]
    mine = [r for r in d.reports if r.device == x.device and r.artifact_id == x.artifact_id]
    canary = [ret for r in mine if r.kind == "canary" and (ret := _returns(r.payload))]
    rates = [m for r in mine if (m := _miss_rate(r.payload)) is not None]
    reason = x.detail.get("reason") or x.detail.get("error") or ""
    return [
        _e(x.device),
        f"artifact {_e(x.artifact_id)} / trial {_e(tid)}",
        _e(d.by_id[tid].arch.describe()),
        f"<b>{_e(x.status)}</b>",
        _e(_time(x.created_at)),
        _e(reason),
        format_number(float(np.mean(canary[-1])), "return") if canary else "",
        f"{format_number(100 * rates[-1], 'percent')}%" if rates else "",
    ]


def _deployments(d: _StudyData) -> str:
    robots = sorted({x.device for x in d.deployments} | {r.device for r in d.reports})
    if not robots:
        return _empty("no deployments yet")
    parts = []
    if d.deployments:
        parts.append(
            _table(
                (
                    "robot",
                    "artifact / trial",
                    "architecture",
                    "status",
                    "when",
                    "note",
                    "canary return",
                    "miss rate",
                ),
                (_deployment_row(d, x) for x in reversed(d.deployments)),
                text_cols=6,
            )
            + _caption(
                "Every deployment of this study's artifacts, newest first. <b>Canary return</b> is the "
                "mean return of the latest canary run on that robot before the artifact went live; "
                "<b>miss rate</b> is the share of control steps that overran their deadline in the "
                "latest report for it; the note is the reason recorded with the status (for example "
                "why a deployment was rolled back)."
            )
        )
    else:
        parts.append(_empty("no deployments from this study yet"))
    for robot in robots:
        parts.append(f"<h3>{_e(robot)}</h3>")
        known = d.devices.get(robot)
        if known is not None:
            parts.append(
                f"<p>profile {_e(known.profile)}, last seen {_e(_time(known.last_seen) or 'never')}</p>"
            )
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
                + _caption(
                    f"The robot's last {len(reports)} report(s), newest first: run, canary and bench "
                    "results with per-step latency percentiles and the model file's sha256 prefix."
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
        _section("search-history", "Search history", _search_history(d)),
        _section("importance", "Which architecture choices mattered", _importance(d)),
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
