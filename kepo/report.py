"""The run report: one self-contained HTML file built from the named SQL in `dashboards/`.

`build_report(db_path, out_path, runs=None)` runs the dashboards' queries (the same text
`kepo sql --query NAME` runs, read with `kepo.queries.named_query`), so every number in the
report is one a user can reproduce in SQL. Sections:

1. Runs: run id, method, algorithm, in-domain modality, last evaluated checkpoint.
2. Table 1: accuracy per modality, Avg and Avg OOD at each run's last evaluated checkpoint
   (`table1`), each modality with its 95 % Wilson interval (`table1_intervals`).
3. Figure 2: in-domain accuracy and the OOD average per checkpoint, one line per run, shaded
   95 % Wilson intervals (`training_dynamics`).
4. Per-modality bars at each run's last checkpoint (`table1`).
5. Accuracy per question type, per run and checkpoint (`question_types`).
6. Rewards per iteration over trained rows and over on-policy samples (`rewards`).
7. Exploration and 8. quality gate per iteration (`exploration`, `gate`, written with the
   rollout stage), when those queries exist and return rows.
9. Training health per run and iteration (`training_health`): a table, then curves of the loss
   parts, the step diagnostics (clip fraction, approximate KL, entropy, gradient norm, lr, gate),
   the samples (completion length, truncation, all-wrong and zero-advantage groups, sampler vs
   trainer log-prob mismatch) and the stage durations.

Runs launched by `kepo study` (a `study` tag in their config) add a study page after the runs
table (`study_section`): mean ± SD over seeds per method (Table 1 style, with the teacher as a
reference row), curves per method with a ± SD band, the all-zero-group rate and the exploration
acceptance per iteration.

A section without data says so ("no rollouts yet") instead of failing. The file needs no
network: CSS is inline, every plot is a matplotlib SVG (text drawn as paths, so no fonts are
needed) embedded as a `data:` URI, and there is no script. Each plot is a
`<figure class="plot">` and each table a `<table class="data">`.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from kepo.queries import has_query, named_query
from kepo.store import Store, StoreError

log = logging.getLogger(__name__)

# Table 1's columns in the paper's order, and the modality each stands for.
TABLE1_COLUMNS = ("MRI", "CT", "XR", "US", "Der", "Fun", "OCT", "Mic", "Avg", "Avg_OOD")
MODALITY_COLUMNS = {
    "MRI": "MRI",
    "CT": "CT",
    "XR": "X-Ray",
    "US": "Ultrasound",
    "Der": "Dermoscopy",
    "Fun": "Fundus",
    "OCT": "OCT",
    "Mic": "Microscopy",
}
KEY_COLUMNS = ("run_id", "method_label", "in_domain_modality", "iteration")
# Columns of the exploration / gate queries worth a curve (rates and fractions); counts are
# plotted only when a query has no such column.
_RATE_HINTS = ("rate", "frac", "share", "mean", "avg")
# Columns in [0, 1] get a fixed y range so curves of different reports compare at a glance.
_UNIT = ("trained_accuracy", "trained_format")
_UNIT_RANGE = (-0.03, 1.03)

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 72rem; padding: 0 1rem; color: #1a1a1a; background: #fff; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
p.meta, p.note, figcaption { color: #555; font-size: 0.9rem; }
p.empty { color: #8a5a00; background: #fff7e6; border-left: 3px solid #e0a000; padding: 0.4rem 0.8rem; }
table.data { border-collapse: collapse; font-size: 0.85rem; margin: 0.6rem 0; }
table.data th, table.data td { border: 1px solid #d6d6d6; padding: 0.25rem 0.55rem; }
table.data th { background: #f3f3f3; text-align: center; }
table.data td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.data td.best { font-weight: 700; }
table.data td.id { background: #eef5ff; }
figure.plot { margin: 0.8rem 0; }
figure.plot img { max-width: 100%; height: auto; }
nav a { margin-right: 0.8rem; font-size: 0.9rem; }
div.wide { overflow-x: auto; }
div.wide table.data { font-size: 0.74rem; }
div.wide table.data th, div.wide table.data td { padding: 0.2rem 0.35rem; }
span.ci { color: #666; font-size: 0.72rem; white-space: nowrap; }
"""


# ------------------------------------------------------------------------------ entry point
def build_report(
    db_path: str | Path, out_path: str | Path, runs: Sequence[str] | None = None
) -> Path:
    """Write the HTML report of the runs in `db_path` (all, or those in `runs`) to `out_path`."""
    store = Store(db_path)
    if not store.path.exists():
        raise StoreError(f"{store.path}: no such database; run a pipeline stage first")
    run_rows = _runs(store, runs)
    selected = [r["run_id"] for r in run_rows]
    labels = _legend_labels(run_rows)

    table1 = _query(store, "table1", selected)
    dynamics = _query(store, "training_dynamics", selected)
    question_types = _query(store, "question_types", selected)
    rewards = _query(store, "rewards", selected)
    exploration = _optional_query(store, "exploration", selected)
    gate = _optional_query(store, "gate", selected)
    intervals = _optional_query(store, "table1_intervals", selected)
    health = _optional_query(store, "training_health", selected)

    last = {r["run_id"]: r["iteration"] for r in table1}
    sections = [
        _section("runs", "Runs", _runs_table(run_rows, last)),
        _section("table1", "Table 1: accuracy per modality", _table1_section(table1, intervals)),
        _section("dynamics", "Training dynamics (Figure 2)", _dynamics_section(dynamics, labels)),
        _section("modalities", "Per-modality accuracy", _modality_bars(table1, labels)),
        _section("question-types", "Accuracy per question type", _qtype_section(question_types)),
        _section("rewards", "Rewards", _rewards_section(rewards, labels)),
        _section(
            "exploration",
            "Knowledge-enhanced exploration",
            _exploration_section(exploration, labels),
        ),
        _section("gate", "Quality gate", _gate_section(gate, labels)),
        _section("health", "Training health", health_section(health, labels)),
    ]
    # Runs launched by `kepo study` carry a study tag: each study gets its own page section.
    from kepo.study import study_names

    for i, name in enumerate(study_names(store, selected)):
        sections.insert(
            1 + i, _section(f"study-{name}", f"Study: {name}", study_section(store, name))
        )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_page(store.path, selected, sections), encoding="utf-8")
    log.info("report written to %s", out)
    return out


# ------------------------------------------------------------------------------ data
def _runs(store: Store, runs: Sequence[str] | None) -> list[dict[str, Any]]:
    table = store.read(
        "runs",
        columns=["run_id", "method_label", "algorithm", "in_domain_modality", "created_at"],
        order_by=["created_at", "run_id"],
    )
    rows = table.to_pylist()
    if runs:
        known = {r["run_id"] for r in rows}
        unknown = [r for r in runs if r not in known]
        if unknown:
            raise StoreError(
                f"{store.path}: no run(s) {', '.join(unknown)}; registered runs: "
                f"{', '.join(sorted(known)) or 'none'}"
            )
        rows = [r for r in rows if r["run_id"] in set(runs)]
    return rows


def _legend_labels(run_rows: list[dict[str, Any]]) -> dict[str, str]:
    """Method labels when they tell the runs apart, else 'label [run_id]'."""
    methods = [r["method_label"] for r in run_rows]
    unique = len(set(methods)) == len(methods)
    return {
        r["run_id"]: r["method_label"] if unique else f"{r['method_label']} [{r['run_id']}]"
        for r in run_rows
    }


def _query(store: Store, name: str, runs: Sequence[str]) -> list[dict[str, Any]]:
    table: pa.Table = store.query(named_query(name))
    wanted = set(runs)
    return [row for row in table.to_pylist() if row.get("run_id") in wanted]


def _optional_query(store: Store, name: str, runs: Sequence[str]) -> list[dict[str, Any]] | str:
    """Rows of a query another stage ships, or a sentence saying why there are none."""
    if not has_query(name):
        return f"dashboards/{name}.sql is not available"
    try:
        return _query(store, name, runs)
    except Exception as err:  # an older database may lack a column the query reads
        log.warning("query %s failed: %s", name, err)
        return f"the {name} query failed on this database ({err})"


# ------------------------------------------------------------------------------ HTML pieces
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _esc(value)


def _empty(text: str) -> str:
    return f'<p class="empty">{_esc(text)}</p>'


def _section(anchor: str, title: str, body: str) -> tuple[str, str, str]:
    return anchor, title, body


def _html_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    headers: Sequence[str] | None = None,
    classes: Sequence[Sequence[str]] | None = None,
    subtexts: Sequence[Sequence[str | None]] | None = None,
) -> str:
    """subtexts: per cell, a second smaller line (e.g. an interval), or None."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in (headers or columns))
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, value in enumerate(row):
            cls = ["num"] if isinstance(value, int | float) and not isinstance(value, bool) else []
            if classes is not None:
                cls += list(classes[i][j].split())
            attr = f' class="{" ".join(cls)}"' if cls else ""
            sub = subtexts[i][j] if subtexts is not None else None
            extra = f'<br><span class="ci">{_esc(sub)}</span>' if sub else ""
            cells.append(f"<td{attr}>{_fmt(value)}{extra}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def _runs_table(run_rows: list[dict[str, Any]], last: dict[str, int]) -> str:
    if not run_rows:
        return _empty("no runs registered in this database yet")
    rows = [
        (
            r["run_id"],
            r["method_label"],
            r["algorithm"],
            r["in_domain_modality"],
            str(r["created_at"])[:19],
            last.get(r["run_id"]),
        )
        for r in run_rows
    ]
    return _html_table(
        ["run_id", "method", "algorithm", "in-domain", "created (UTC)", "last evaluated"], rows
    )


def _table1_section(table1: list[dict[str, Any]], intervals: list[dict[str, Any]] | str) -> str:
    if not table1:
        return _empty("no evaluations yet: run `kepo eval` on a checkpoint")
    ci = {
        (r["run_id"], r["iteration"], r["modality"]): r
        for r in (intervals if isinstance(intervals, list) else [])
    }
    columns = ["method_label", "run_id", "iteration", *TABLE1_COLUMNS]
    headers = ["Method", "Run", "Checkpoint", *(c.replace("_", " ") for c in TABLE1_COLUMNS)]
    best = {
        c: max((r[c] for r in table1 if r[c] is not None), default=None) for c in TABLE1_COLUMNS
    }
    rows, classes, subtexts = [], [], []
    for r in table1:
        rows.append([r[c] for c in columns])
        subtexts.append(
            [None] * 3
            + [
                _interval(ci.get((r["run_id"], r["iteration"], MODALITY_COLUMNS.get(c))))
                for c in TABLE1_COLUMNS
            ]
        )
        cls = ["", "", ""]
        for c in TABLE1_COLUMNS:
            marks = []
            if len(table1) > 1 and r[c] is not None and r[c] == best[c]:
                marks.append("best")
            if MODALITY_COLUMNS.get(c) == r["in_domain_modality"]:
                marks.append("id")
            cls.append(" ".join(marks))
        classes.append(cls)
    note = (
        '<p class="note">Accuracy in %, at each run\'s last evaluated checkpoint. Avg is the mean '
        "over modalities; Avg OOD the mean over the modalities other than the run's in-domain "
        "one (shaded). Best value per column in bold. Under each modality its 95 % Wilson "
        "interval. SQL: <code>kepo sql --query table1</code>, intervals "
        "<code>kepo sql --query table1_intervals</code>.</p>"
    )
    return _html_table(columns, rows, headers=headers, classes=classes, subtexts=subtexts) + note


def _interval(row: dict[str, Any] | None) -> str | None:
    if row is None or row["ci_low"] is None:
        return None
    return f"[{row['ci_low']:.1f}, {row['ci_high']:.1f}]"


def _dynamics_section(dynamics: list[dict[str, Any]], labels: dict[str, str]) -> str:
    if not dynamics:
        return _empty("no evaluations yet: run `kepo eval` on a checkpoint")
    svg = _line_panels(
        dynamics,
        labels,
        panels=[("id_accuracy", "In-domain accuracy (%)"), ("ood_average", "OOD average (%)")],
        xlabel="checkpoint (training iterations)",
        salt="dynamics",
        bands={
            "id_accuracy": ("id_ci_low", "id_ci_high"),
            "ood_average": ("ood_ci_low", "ood_ci_high"),
        },
    )
    caption = (
        "Left: accuracy on the in-domain modality; right: mean accuracy over the "
        "out-of-distribution modalities. Shaded: 95 % Wilson intervals (in-domain: the "
        "modality's; OOD: the pooled OOD items') "
        "(SQL: <code>kepo sql --query training_dynamics</code>)."
    )
    return _figure(svg, caption)


def _modality_bars(table1: list[dict[str, Any]], labels: dict[str, str]) -> str:
    if not table1:
        return _empty("no evaluations yet: run `kepo eval` on a checkpoint")
    from matplotlib.figure import Figure

    columns = list(TABLE1_COLUMNS)
    fig = Figure(figsize=(10, 3.8))
    ax = fig.add_subplot()
    width = 0.8 / len(table1)
    for i, row in enumerate(table1):
        xs = [j + (i - (len(table1) - 1) / 2) * width for j in range(len(columns))]
        values = [row[c] if row[c] is not None else float("nan") for c in columns]
        ax.bar(
            xs,
            values,
            width=width,
            color=_color(i),
            label=f"{labels[row['run_id']]} (k={row['iteration']})",
        )
    ax.set_xticks(range(len(columns)), [c.replace("_", " ") for c in columns])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    caption = "Accuracy per modality at each run's last evaluated checkpoint k (from table1)."
    return _figure(_svg(fig, "modalities"), caption)


def _qtype_section(question_types: list[dict[str, Any]]) -> str:
    if not question_types:
        return _empty("no evaluations yet: run `kepo eval` on a checkpoint")
    types = sorted({r["question_type"] for r in question_types})
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    methods: dict[str, str] = {}
    for r in question_types:
        key = (r["run_id"], r["iteration"])
        cells.setdefault(key, {})[r["question_type"]] = r
        methods[r["run_id"]] = r["method_label"]
    rows = []
    for run_id, iteration in cells:
        per_type = cells[(run_id, iteration)]
        rows.append(
            [
                methods[run_id],
                run_id,
                iteration,
                *(
                    f"{per_type[t]['accuracy']:.2f} (n={per_type[t]['n']})"
                    if t in per_type
                    else None
                    for t in types
                ),
            ]
        )
    note = (
        '<p class="note">Accuracy in % (items) per question type over all modalities; in-domain '
        "and OOD splits: <code>kepo sql --query question_types</code>.</p>"
    )
    return _html_table(["Method", "Run", "Checkpoint", *types], rows) + note


def _rewards_section(rewards: list[dict[str, Any]], labels: dict[str, str]) -> str:
    if not rewards:
        return _empty("no rollouts yet")
    svg = _line_panels(
        rewards,
        labels,
        panels=[
            ("trained_total", "total reward"),
            ("trained_accuracy", "accuracy reward"),
            ("trained_format", "format reward"),
        ],
        dashed={
            "trained_total": "policy_total",
            "trained_accuracy": "policy_accuracy",
            "trained_format": "policy_format",
        },
        ylim={"trained_total": (-0.05, 2.05), **dict.fromkeys(_UNIT, _UNIT_RANGE)},
        xlabel="iteration",
        salt="rewards",
    )
    caption = (
        "Mean reward per iteration over the trained rows (solid; injected hint-aware "
        "trajectories included) and over the on-policy samples (dashed) "
        "(SQL: <code>kepo sql --query rewards</code>)."
    )
    return _figure(svg, caption)


def _exploration_section(rows: list[dict[str, Any]] | str, labels: dict[str, str]) -> str:
    wanted = [
        ("trigger_rate", "trigger rate (triggered / prompts)"),
        ("acceptance_rate", "acceptance (injected / triggered)"),
        ("attempts_per_accepted", "attempts per accepted prompt"),
    ]
    if isinstance(rows, list) and rows and all(c in rows[0] for c, _ in wanted):
        svg = _line_panels(
            rows,
            labels,
            panels=wanted,
            xlabel="iteration",
            salt="exploration",
            ylim=dict.fromkeys(("trigger_rate", "acceptance_rate"), _UNIT_RANGE),
        )
        caption = (
            "Per iteration: share of prompts whose G samples all scored 0 (exploration ran), "
            "share of those that got a hint-aware trajectory injected, and the attempts such a "
            "prompt needed (SQL: <code>kepo sql --query exploration</code>)."
        )
        return _figure(svg, caption)
    return _curves_section(rows, "exploration", labels, "no rollouts yet")


def _gate_section(rows: list[dict[str, Any]] | str, labels: dict[str, str]) -> str:
    needed = ("source", "n_trained", "n_gate_open")
    if not (isinstance(rows, list) and rows and all(c in rows[0] for c in needed)):
        return _curves_section(rows, "gate", labels, "no rollouts yet")
    # The query has one row per source ('policy', 'hint'): fold them into one row per iteration.
    folded: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        row = folded.setdefault(
            (r["run_id"], r["iteration"]),
            {"run_id": r["run_id"], "iteration": r["iteration"], "n": 0, "open": 0},
        )
        row["n"] += r["n_trained"]
        row["open"] += r["n_gate_open"]
        if r["n_trained"]:
            row[f"frac_{r['source']}"] = r["n_gate_open"] / r["n_trained"]
    curves = [{**r, "frac_all": r["open"] / r["n"] if r["n"] else None} for r in folded.values()]
    svg = _line_panels(
        curves,
        labels,
        panels=[
            ("frac_all", "gate open: all trained rows"),
            ("frac_policy", "gate open: policy (solid), injected (dashed)"),
        ],
        dashed={"frac_policy": "frac_hint"},
        ylim=dict.fromkeys(("frac_all", "frac_policy"), _UNIT_RANGE),
        xlabel="iteration",
        salt="gate",
    )
    caption = (
        "Fraction of trained rows whose quality gate is open (distillation applies), per "
        "iteration (SQL: <code>kepo sql --query gate</code>)."
    )
    return _figure(svg, caption)


def _curves_section(
    rows: list[dict[str, Any]] | str, name: str, labels: dict[str, str], empty: str
) -> str:
    if isinstance(rows, str):
        return _empty(rows)
    if not rows:
        return _empty(empty)
    numeric = [
        c
        for c, v in rows[0].items()
        if c not in KEY_COLUMNS and isinstance(v, int | float) and not isinstance(v, bool)
    ]
    numeric = [c for c in numeric if any(r[c] is not None for r in rows)]
    rates = [c for c in numeric if any(h in c.lower() for h in _RATE_HINTS)]
    chosen = (rates or numeric)[:6]
    if not chosen or "iteration" not in rows[0]:
        return _empty(f"the {name} query returned no per-iteration numbers to plot")
    svg = _line_panels(
        _mean_per_iteration(rows, chosen),
        labels,
        panels=[(c, c.replace("_", " ")) for c in chosen],
        xlabel="iteration",
        salt=name,
    )
    return _figure(svg, f"Per iteration (SQL: <code>kepo sql --query {_esc(name)}</code>).")


def _mean_per_iteration(rows: list[dict[str, Any]], columns: Sequence[str]) -> list[dict]:
    """One row per (run_id, iteration): a query with finer rows is averaged for the curve."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["run_id"], r["iteration"]), []).append(r)
    out = []
    for (run_id, iteration), members in groups.items():
        row: dict[str, Any] = {"run_id": run_id, "iteration": iteration}
        for c in columns:
            values = [m[c] for m in members if m[c] is not None]
            row[c] = sum(values) / len(values) if values else None
        out.append(row)
    return out


# ------------------------------------------------------------------------------ training health
# Figures of the health section: (title, caption, panels); a panel is (column, title, dashed
# column or None). A figure shows the panels that have data and is left out when none has.
HEALTH_FIGURES: tuple[tuple[str, str, tuple[tuple[str, str, str | None], ...]], ...] = (
    (
        "health-loss",
        "Loss parts, mean over the iteration's optimizer steps.",
        (
            ("loss_total", "total loss", None),
            ("loss_pg", "policy-gradient term", None),
            ("loss_distill", "distillation term", None),
            ("loss_kl", "reference KL term", None),
            ("loss_sft", "SFT cross-entropy", None),
        ),
    ),
    (
        "health-step",
        "Step diagnostics, mean over the iteration's optimizer steps: clip fraction, "
        "approximate KL (old − new log-prob), token entropy of the policy on the trained "
        "completions (nats), gradient norm before clipping (dashed: the largest), learning rate "
        "(last step) and the gate-open fraction.",
        (
            ("clipfrac", "clip fraction", None),
            ("approx_kl", "approx. KL", None),
            ("entropy", "entropy (nats)", None),
            ("grad_norm", "grad norm (dashed: max)", "grad_norm_max"),
            ("lr", "learning rate", None),
            ("gate_frac_open", "gate open", None),
        ),
    ),
    (
        "health-samples",
        "On-policy samples: mean completion length (tokens), share cut at max_new_tokens "
        "(finish_reason = length); groups: share of prompts whose G samples were all wrong "
        "(dashed: share with zero advantage on every trained row, no gradient); sampler vs "
        "trainer: mean |generation-time − recomputed old log-prob| per token (dashed: max), "
        "near 0 on a sound setup.",
        (
            ("mean_completion_tokens", "completion length (tokens)", None),
            ("truncation_rate", "truncation rate", None),
            ("all_wrong_rate", "all-wrong groups (dashed: zero adv.)", "zero_advantage_rate"),
            ("logprob_mismatch_mean", "log-prob mismatch (dashed: max)", "logprob_mismatch_max"),
        ),
    ),
    (
        "health-stages",
        "Stage durations (s): rollout and train of iteration k, evaluation of policy version k.",
        (
            ("rollout_s", "rollout (s)", None),
            ("train_s", "train (s)", None),
            ("evaluate_s", "evaluate (s)", None),
        ),
    ),
)
HEALTH_TABLE = (
    ("method_label", "Method"),
    ("run_id", "Run"),
    ("iteration", "Iteration"),
    ("n_steps", "Steps"),
    ("n_skipped", "Skipped"),
    ("loss_total", "Loss"),
    ("clipfrac", "Clip frac"),
    ("approx_kl", "Approx KL"),
    ("entropy", "Entropy"),
    ("grad_norm", "Grad norm"),
    ("gate_frac_open", "Gate open"),
    ("mean_completion_tokens", "Length"),
    ("truncation_rate", "Truncated"),
    ("all_wrong_rate", "All wrong"),
    ("zero_advantage_rate", "Zero adv."),
    ("logprob_mismatch_mean", "Log-prob Δ"),
    ("rollout_s", "Rollout s"),
    ("train_s", "Train s"),
    ("evaluate_s", "Eval s"),
)
HEALTH_PANELS_PER_FIGURE = 4
_HEALTH_UNIT = ("clipfrac", "gate_frac_open", "truncation_rate", "all_wrong_rate")


def health_section(rows: list[dict[str, Any]] | str, labels: dict[str, str]) -> str:
    """The training-health table and figures (rows of the `training_health` query)."""
    if isinstance(rows, str):
        return _empty(rows)
    if not rows:
        return _empty("no training or rollout rows yet")
    text_columns = ("method_label", "run_id")
    parts = [
        '<div class="wide">'
        + _html_table(
            [c for c, _ in HEALTH_TABLE],
            [[_sig(r[c]) for c, _ in HEALTH_TABLE] for r in rows],
            headers=[h for _, h in HEALTH_TABLE],
            classes=[["" if c in text_columns else "num" for c, _ in HEALTH_TABLE] for _ in rows],
        )
        + "</div>",
        '<p class="note">Per run and iteration; rates are shares (0–1), Log-prob Δ the mean '
        "absolute sampler − trainer log-prob difference per token. "
        "SQL: <code>kepo sql --query training_health</code>.</p>",
    ]
    for salt, caption, panels in HEALTH_FIGURES:
        present = [p for p in panels if any(r.get(p[0]) is not None for r in rows)]
        # balanced rows of at most HEALTH_PANELS_PER_FIGURE panels (5 panels: 3 + 2)
        per_figure = (
            math.ceil(len(present) / max(math.ceil(len(present) / HEALTH_PANELS_PER_FIGURE), 1))
            if present
            else 1
        )
        for start in range(0, len(present), per_figure):
            chunk = present[start : start + per_figure]
            svg = _line_panels(
                rows,
                labels,
                panels=[(c, t) for c, t, _ in chunk],
                dashed={c: d for c, _, d in chunk if d},
                ylim={c: _UNIT_RANGE for c, _, _ in chunk if c in _HEALTH_UNIT},
                xlabel="iteration",
                salt=f"{salt}-{start}",
            )
            parts.append(_figure(svg, caption if start == 0 else "(continued)"))
    return "".join(parts)


def _sig(value: Any) -> Any:
    """Floats to four significant digits as text (losses and lr span many magnitudes)."""
    return f"{value:.4g}" if isinstance(value, float) else value


# ------------------------------------------------------------------------------ markdown
def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return "–" if v is None else str(_sig(v)).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def table1_markdown(store: Store, runs: Sequence[str] | None = None) -> str:
    """Table 1 (the `table1` query) as a markdown table, for trackers and Prefect artifacts."""
    rows = _query(store, "table1", [r["run_id"] for r in _runs(store, runs)])
    if not rows:
        return "No evaluations yet: run `kepo eval` on a checkpoint."
    headers = ["Method", "Run", "Checkpoint", *(c.replace("_", " ") for c in TABLE1_COLUMNS)]
    body = [
        [r["method_label"], r["run_id"], r["iteration"], *(r[c] for c in TABLE1_COLUMNS)]
        for r in rows
    ]
    return (
        "Accuracy (%) per modality at each run's last evaluated checkpoint "
        "(`kepo sql --query table1`).\n\n" + _markdown_table(headers, body)
    )


def iteration_markdown(store: Store, run_id: str, iteration: int) -> str:
    """Exploration and training-health summary of one iteration of one run, in markdown."""
    parts = [f"Run `{run_id}`, iteration {iteration}."]
    exploration = _optional_query(store, "exploration", [run_id])
    row = (
        next((r for r in exploration if r["iteration"] == iteration), None)
        if isinstance(exploration, list)
        else None
    )
    if row is None:
        parts.append("No exploration rows for this iteration.")
    else:
        names = (
            ("n_prompts", "prompts"),
            ("n_triggered", "exploration triggered"),
            ("trigger_rate", "trigger rate"),
            ("n_accepted", "accepted (≥ 1 trajectory injected)"),
            ("acceptance_rate", "acceptance rate"),
            ("n_attempts", "hint-aware attempts"),
            ("n_injected", "trajectories injected"),
            ("n_malformed_hints", "malformed hints"),
        )
        parts.append(
            "**Knowledge-enhanced exploration** (`kepo sql --query exploration`)\n\n"
            + _markdown_table(["", "value"], [(t, row.get(c)) for c, t in names if c in row])
        )
    health = _optional_query(store, "training_health", [run_id])
    row = (
        next((r for r in health if r["iteration"] == iteration), None)
        if isinstance(health, list)
        else None
    )
    if row is not None:
        parts.append(
            "**Training health** (`kepo sql --query training_health`)\n\n"
            + _markdown_table(
                ["", "value"],
                [(h, row.get(c)) for c, h in HEALTH_TABLE if c not in ("method_label", "run_id")],
            )
        )
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------ study page
def _pm(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"


def study_section(store: Store, study: str) -> str:
    """The study page: Table 1-style mean ± SD per method, curves, all-zero rate, exploration.

    Numbers come from the summary queries of `kepo.study` (SQL over the same store).
    """
    from kepo import study as st

    runs = st.study_runs(store, study)
    if not runs:
        return _empty(f"study {study}: no method runs registered yet")
    summary = st.summary_table(store, study)
    reference = st.reference_table(store, study)
    curves = st.curves(store, study)
    zero = st.all_zero_rates(store, study)
    exploration = [r for r in st.exploration_rates(store, study) if r["n_triggered"]]
    seeds = sorted({r["seed"] for r in runs})
    modality = runs[0]["in_domain_modality"]
    labels = {r["method"]: r["method_label"] for r in runs}  # every method, first-run order
    colors = {method: _color(i) for i, method in enumerate(labels)}
    parts = [
        f'<p class="meta">In-domain modality <b>{_esc(modality)}</b> · {len(labels)} methods · '
        f"seeds {_esc(', '.join(map(str, seeds)))} · {len(runs)} runs</p>"
    ]
    if summary:
        rows = [
            [
                r["method_label"],
                r["n_seeds"],
                r["checkpoint"],
                _pm(r["id_mean"], r["id_sd"]),
                _pm(r["ood_mean"], r["ood_sd"]),
                _pm(r["avg_mean"], r["avg_sd"]),
            ]
            for r in summary
        ]
        rows += [
            [
                r["method_label"],
                "–",
                r["checkpoint"],
                _pm(r["id_mean"], None),
                _pm(r["ood_mean"], None),
                _pm(r["avg_mean"], None),
            ]
            for r in reference
        ]
        headers = ["Method", "Seeds", "Checkpoint", f"ID ({modality})", "Avg OOD", "Avg"]
        parts.append(_html_table(headers, rows))
        parts.append(
            '<p class="note">Accuracy in %, mean ± sample standard deviation over seeds at the '
            "last evaluated checkpoint (no ± with one seed). Avg OOD is the mean over the seven "
            "other modalities. The teacher row is the warmed-up teacher evaluated once, for "
            "reference. SQL: <code>dashboards/study_summary.sql</code>.</p>"
        )
    else:
        parts.append(_empty("no evaluations of the study's runs yet"))
    if curves:
        series = [{**r, "run_id": r["method"]} for r in curves]
        parts.append(
            _figure(
                _band_panels(
                    series,
                    labels,
                    [("id", f"In-domain ({modality}) accuracy (%)"), ("ood", "OOD average (%)")],
                    xlabel="checkpoint (training iterations)",
                    salt=f"study-{study}",
                ),
                "Mean over seeds per checkpoint, shaded ± one standard deviation (Figure 2 style).",
            )
        )
    if zero:
        series = [{**r, "run_id": r["method"]} for r in zero]
        parts.append(
            _figure(
                _line_panels(
                    series,
                    labels,
                    panels=[
                        ("all_zero_rate", "all-zero groups (share of prompts)"),
                        ("mean_policy_correct", "correct samples per prompt (of G)"),
                    ],
                    xlabel="iteration",
                    salt=f"study-zero-{study}",
                    colors=colors,
                    ylim={"all_zero_rate": _UNIT_RANGE},
                ),
                "Left: share of prompts whose G on-policy samples all had accuracy reward 0 "
                "(<code>prompts.n_policy_correct = 0</code>), pooled over seeds: the learning "
                "cliff. Right: mean number of correct on-policy samples per prompt.",
            )
        )
        first = min(r["iteration"] for r in zero)
        rows = [
            [
                labels.get(r["method"], r["method"]),
                r["n_prompts"],
                r["n_all_zero"],
                f"{100 * r['all_zero_rate']:.1f} %",
            ]
            for r in zero
            if r["iteration"] == first
        ]
        parts.append(_html_table(["Method", "Prompts", "All-zero groups", "Rate"], rows))
        parts.append(
            f'<p class="note">All-zero-group rate at iteration {first} (before any '
            "training), pooled over seeds.</p>"
        )
    else:
        parts.append(_empty("no rollouts of the study's runs yet"))
    if exploration:
        series = [{**r, "run_id": r["method"]} for r in exploration]
        parts.append(
            _figure(
                _line_panels(
                    series,
                    labels,
                    panels=[
                        ("trigger_rate", "triggered / prompts"),
                        ("acceptance_rate", "acceptance (injected / triggered)"),
                    ],
                    xlabel="iteration",
                    salt=f"study-explore-{study}",
                    colors=colors,
                    ylim=dict.fromkeys(("trigger_rate", "acceptance_rate"), _UNIT_RANGE),
                ),
                "Knowledge-enhanced exploration per iteration, KEPO runs pooled over seeds: share "
                "of prompts that triggered, and share of those that got a hint-aware trajectory "
                "injected.",
            )
        )
    else:
        parts.append(_empty("no prompt triggered exploration in this study"))
    return "".join(parts)


def _band_panels(
    rows: list[dict[str, Any]],
    labels: dict[str, str],
    panels: Sequence[tuple[str, str]],
    *,
    xlabel: str,
    salt: str,
) -> str:
    """One panel per prefix p: the `{p}_mean` line per series, shaded `{p}_sd` band."""
    from matplotlib.figure import Figure

    order = [k for k in labels if any(r["run_id"] == k for r in rows)]
    colors = {k: _color(i) for i, k in enumerate(labels)}  # the same colour in every plot
    fig = Figure(figsize=(min(4.6 * len(panels), 14), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (prefix, title) in zip(axes, panels, strict=True):
        for key in order:
            series = sorted((r for r in rows if r["run_id"] == key), key=lambda r: r["iteration"])
            points = [
                (r["iteration"], r[f"{prefix}_mean"], r[f"{prefix}_sd"] or 0.0)
                for r in series
                if r[f"{prefix}_mean"] is not None
            ]
            if not points:
                continue
            xs, ys, sds = zip(*points, strict=True)
            ax.plot(xs, ys, "-", marker="o", ms=4, color=colors[key], label=labels[key])
            ax.fill_between(
                xs,
                [y - d for y, d in zip(ys, sds, strict=True)],
                [y + d for y, d in zip(ys, sds, strict=True)],
                color=colors[key],
                alpha=0.15,
                linewidth=0,
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(alpha=0.3)
        _integer_x(ax, sorted({r["iteration"] for r in rows}))
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=8)
        fig.tight_layout(rect=(0, 0.08 + 0.05 * ((len(names) - 1) // 4), 1, 1))
    else:
        fig.tight_layout()
    return _svg(fig, salt)


# ------------------------------------------------------------------------------ plots
def _color(i: int) -> str:
    palette = (
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
        "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    )  # fmt: skip
    return palette[i % len(palette)]


def _line_panels(
    rows: list[dict[str, Any]],
    labels: dict[str, str],
    *,
    panels: Sequence[tuple[str, str]],
    xlabel: str,
    salt: str,
    dashed: dict[str, str] | None = None,
    ylim: dict[str, tuple[float, float]] | None = None,
    colors: dict[str, str] | None = None,
    bands: dict[str, tuple[str, str]] | None = None,
) -> str:
    """One panel per (column, title); in each, one line per run over `iteration`.

    dashed: column -> a second column drawn dashed in the same panel; ylim: column -> y range;
    colors: run -> colour (default: by position among the runs plotted); bands: column ->
    (low column, high column) shaded around its line.
    """
    from matplotlib.figure import Figure

    run_order = [r for r in labels if any(row["run_id"] == r for row in rows)]
    fig = Figure(figsize=(min(4.6 * len(panels), 14), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (column, title) in zip(axes, panels, strict=True):
        for i, run_id in enumerate(run_order):
            series = sorted(
                (r for r in rows if r["run_id"] == run_id), key=lambda r: r["iteration"]
            )
            for col, style, label in (
                (column, "-", labels[run_id]),
                ((dashed or {}).get(column), "--", None),
            ):
                if col is None:
                    continue
                points = [(r["iteration"], r[col]) for r in series if r.get(col) is not None]
                if points:
                    xs, ys = zip(*points, strict=True)
                    color = (colors or {}).get(run_id, _color(i))
                    ax.plot(xs, ys, style, marker="o", ms=4, color=color, label=label)
            low_high = (bands or {}).get(column)
            if low_high:
                band = [
                    (r["iteration"], r[low_high[0]], r[low_high[1]])
                    for r in series
                    if r.get(low_high[0]) is not None and r.get(low_high[1]) is not None
                ]
                color = (colors or {}).get(run_id, _color(i))
                if len(band) == 1:  # a lone checkpoint: a bar, since a band needs two
                    ax.vlines(band[0][0], band[0][1], band[0][2], color=color, alpha=0.4, lw=5)
                elif band:
                    xs, lows, highs = zip(*band, strict=True)
                    ax.fill_between(xs, lows, highs, color=color, alpha=0.15, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(alpha=0.3)
        _integer_x(ax, sorted({r["iteration"] for r in rows}))
        if ylim and column in ylim:
            ax.set_ylim(*ylim[column])
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=8)
        fig.tight_layout(rect=(0, 0.08 + 0.05 * ((len(names) - 1) // 4), 1, 1))
    else:
        fig.tight_layout()
    return _svg(fig, salt)


def _integer_x(ax: Any, iterations: list[int]) -> None:
    """Iterations are integers: tick each one when few, keep one point off the frame edges."""
    if len(iterations) <= 12:
        ax.set_xticks(iterations)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    if len(iterations) == 1:
        ax.set_xlim(iterations[0] - 1, iterations[0] + 1)


def _svg(fig: Any, salt: str) -> str:
    """The figure as SVG text (deterministic: fixed id salt, no date)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"kepo-{salt}", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def _figure(svg: str, caption: str) -> str:
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    alt = _esc(html.unescape(caption.replace("<code>", "").replace("</code>", "")))
    return (
        f'<figure class="plot"><img src="data:image/svg+xml;base64,{data}" alt="{alt}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


# ------------------------------------------------------------------------------ page
def _page(db_path: Path, runs: Sequence[str], sections: list[tuple[str, str, str]]) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{_esc(t)}</h2>{b}</section>' for a, t, b in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no favicon request
        f"<title>kepo report: {_esc(db_path.name)}</title><style>{_CSS}</style></head><body>"
        "<h1>kepo report</h1>"
        f'<p class="meta">Database <code>{_esc(db_path.name)}</code> · runs: '
        f"{_esc(', '.join(runs) or 'none')} · generated {now}</p>"
        f"<nav>{nav}</nav>{body}</body></html>\n"
    )


__all__ = [
    "TABLE1_COLUMNS",
    "build_report",
    "health_section",
    "iteration_markdown",
    "study_section",
    "table1_markdown",
]
