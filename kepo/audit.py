"""The whole story of one rollout prompt, read back from the store (`kepo audit`).

`prompt_story` gathers, for (run, iteration, prompt): the prompt row, every trajectory (policy
samples and injected hint-aware ones) with rewards, parse record, advantage and gate, the
trigger decision and why, the teacher hint (raw and parsed), every hint-aware attempt, which
samples were injected into which slot and which they replaced, and which rows are distilled
(gate open and trained). It is a plain JSON-serialisable dict; `render_story` prints it with
rich. `iteration_overview` lists an iteration's prompts (to find one worth auditing).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from kepo.store import Store, StoreError

_LIST_COLUMNS = ("completion_ids", "sampled_logprobs", "old_logprobs", "ref_logprobs")


def _where(run_id: str, iteration: int, prompt_id: str | None = None) -> dict[str, Any]:
    where: dict[str, Any] = {"run_id": run_id, "iteration": iteration}
    if prompt_id is not None:
        where["prompt_id"] = prompt_id
    return where


def _logprob_summary(row: dict[str, Any], full: bool) -> dict[str, Any]:
    """Replace token-level lists by their sums (or keep them with `full`)."""
    out = {k: v for k, v in row.items() if k not in _LIST_COLUMNS or full}
    for col in ("sampled_logprobs", "old_logprobs", "ref_logprobs"):
        if col in row:
            value = row[col]
            out[f"{col.removesuffix('_logprobs')}_logprob_sum"] = (
                None if value is None else float(sum(value))
            )
    return out


def explain_trigger(prompt: dict[str, Any], settings: dict[str, Any]) -> str:
    """One sentence saying why exploration did or did not run for this prompt."""
    reason = prompt["trigger_reason"]
    part = settings.get("trigger_reward", "total")
    g = settings.get("group_size", "G")
    best = prompt["max_trigger_reward"]
    if reason == "exploration_off":
        return (
            f"exploration is off for this run (algorithm {settings.get('algorithm')}, "
            f"exploration enabled: {settings.get('exploration_enabled')})"
        )
    if reason == "no_policy_samples":
        return (
            f"no policy samples were drawn: algorithm {settings.get('algorithm')} trains on the "
            "dataset target of this prompt"
        )
    if reason.startswith("all_zero"):
        return f"triggered: all {g} policy samples scored 0 on the {part} reward"
    if reason == "batch_scope":
        return (
            f"triggered by batch scope: this prompt's best policy sample scored {best:g} on the "
            f"{part} reward, but another prompt of the batch was all-zero (trigger_scope = batch)"
        )
    if reason == "not_all_zero":
        return f"not triggered: the best of the {g} policy samples scored {best:g} > 0 on the {part} reward"
    return reason


def _settings(store: Store, run_id: str) -> dict[str, Any]:
    cfg = store.run_config(run_id)
    ex = cfg.rollout.exploration
    gate = cfg.algorithm.distill.gate
    return {
        "method_label": cfg.method_label,
        "algorithm": cfg.algorithm.name,
        "exploration_enabled": cfg.exploration_active,
        "group_size": cfg.rollout.group_size,
        "trigger_reward": ex.trigger_reward,
        "trigger_scope": ex.trigger_scope,
        "budget": ex.budget,
        "inject_k": ex.inject_k,
        "accept_rule": ex.accept_rule,
        "malformed_hint": ex.malformed_hint,
        "reject_leaks": ex.reject_leaks,
        "hint_version": cfg.prompts.hint_version,
        "gate": f"{gate.reward_part} {gate.comparator} {gate.tau:g}",
        "distill_mode": cfg.algorithm.distill.mode,
    }


def iteration_overview(store: Store, run_id: str, iteration: int) -> list[dict[str, Any]]:
    """The prompts of one iteration with their exploration counts."""
    cols = [
        "batch_position",
        "prompt_id",
        "modality",
        "gold_letter",
        "n_policy_correct",
        "triggered",
        "trigger_reason",
        "n_attempts",
        "n_injected",
    ]
    return store.read(
        "prompts", _where(run_id, iteration), columns=cols, order_by=["batch_position"]
    ).to_pylist()


def prompt_story(
    store: Store, run_id: str, iteration: int, prompt_id: str, *, full: bool = False
) -> dict[str, Any]:
    """Everything the store holds about one prompt of one iteration (see the module docstring).

    `full` keeps token ids and per-token log-probs; otherwise they are summarised by their sums.
    """
    where = _where(run_id, iteration, prompt_id)
    prompts = store.read("prompts", where).to_pylist()
    if not prompts:
        known = store.read("prompts", _where(run_id, iteration), columns=["prompt_id"])
        ids = known.column("prompt_id").to_pylist()
        hint = (
            f"prompts of that iteration: {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''}"
            if ids
            else f"run {run_id!r} has no rollout for iteration {iteration}"
        )
        raise StoreError(f"no prompt {prompt_id!r} in run {run_id!r} iteration {iteration}; {hint}")
    prompt = {k: v for k, v in prompts[0].items() if k not in ("run_id", "iteration")}
    settings = _settings(store, run_id)

    rollouts = store.read("rollouts", where, order_by=["sample_idx"]).to_pylist()
    hints = store.read("hints", where).to_pylist()
    attempts = store.read("hint_attempts", where, order_by=["attempt_idx", "k_idx"]).to_pylist()
    topk = store.read("teacher_topk", where, columns=["sample_idx", "teacher", "k"]).to_pylist()
    topk_rows = {r["sample_idx"] for r in topk}

    samples = []
    for row in rollouts:
        s = _logprob_summary(
            {k: v for k, v in row.items() if k not in ("run_id", "iteration", "prompt_id")}, full
        )
        if row["source"] == "hint":
            short = row["attempt_id"].removeprefix(f"{prompt_id}/")
            s["status"] = f"injected into slot {row['slot']} from attempt {short}"
        elif row["replaced_by"] is not None:
            s["status"] = f"replaced by sample {row['replaced_by']}, not trained"
        else:
            s["status"] = "trained"
        s["distilled"] = bool(row["gate_open"] and row["trained"])
        s["teacher_topk_stored"] = row["sample_idx"] in topk_rows
        samples.append(s)

    attempt_rows = []
    for row in attempts:
        a = {k: v for k, v in row.items() if k not in ("run_id", "iteration", "prompt_id")}
        if not full:
            a.pop("completion_ids")
            lp = a.pop("sampled_logprobs")
            a["sampled_logprob_sum"] = float(sum(lp))
        attempt_rows.append(a)

    hint = None
    if hints:
        hint = {k: v for k, v in hints[0].items() if k not in ("run_id", "iteration", "prompt_id")}
    accepted_attempt = next((a["attempt_idx"] for a in attempt_rows if a["attempt_accepted"]), None)
    return {
        "run_id": run_id,
        "iteration": iteration,
        "prompt_id": prompt_id,
        "settings": settings,
        "prompt": prompt,
        "trigger": {
            "triggered": prompt["triggered"],
            "reason": prompt["trigger_reason"],
            "explanation": explain_trigger(prompt, settings),
        },
        "samples": samples,
        "hint": hint,
        "attempts": attempt_rows,
        "accepted_attempt_idx": accepted_attempt,
        "injected": [
            {"sample_idx": s["sample_idx"], "slot": s["slot"], "attempt_id": s["attempt_id"]}
            for s in samples
            if s["source"] == "hint"
        ],
        "replaced": [
            {"sample_idx": s["sample_idx"], "slot": s["slot"], "replaced_by": s["replaced_by"]}
            for s in samples
            if s["replaced_by"] is not None
        ],
        "distilled": [s["sample_idx"] for s in samples if s["distilled"]],
        "teacher_topk": topk,
    }


# ------------------------------------------------------------------------------ rendering
def _short(text: str | None, width: int) -> str:
    if text is None:
        return "NULL"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:+.3f}" if isinstance(value, float) else str(value)


def _yes(value: bool) -> str:
    return "[green]yes[/green]" if value else "[dim]no[/dim]"


def render_story(story: dict[str, Any], console: Console, *, width: int = 70) -> None:
    """Print a `prompt_story` as panels and tables."""
    p, st = story["prompt"], story["settings"]
    head = Text.assemble(
        (f"{story['prompt_id']}", "bold"),
        f"  run {story['run_id']} ({st['method_label']}), iteration {story['iteration']}\n",
        f"{p['modality']} · {p['question_type']} · gold {p['gold_letter']} · "
        f"batch position {p['batch_position']} · epoch {p['epoch']} · seed {p['sampling_seed']}",
    )
    console.print(Panel(head, title="prompt", expand=False))
    console.print(
        Panel(p["training_prompt"], title="training prompt x (trained under)", expand=False)
    )

    trig = story["trigger"]
    colour = "yellow" if trig["triggered"] else "green"
    console.print(
        f"[bold {colour}]exploration: {trig['reason']}[/bold {colour}] — {trig['explanation']}"
    )
    console.print(
        f"[dim]settings: G={st['group_size']} B={st['budget']} K={st['inject_k']} "
        f"accept={st['accept_rule']} trigger={st['trigger_reward']}/{st['trigger_scope']} "
        f"gate {st['gate']} distill={st['distill_mode']} hint {st['hint_version']}[/dim]"
    )

    table = Table(title="trajectories (rollouts); rewards = format + accuracy = total")
    for col in (
        "#",
        "slot",
        "source",
        "trained",
        "rewards",
        "answer",
        "adv",
        "gate",
        "distil",
        "leak",
        "tok",
        "status",
        "completion",
    ):
        table.add_column(col, overflow="fold")
    for s in story["samples"]:
        if s["source"] == "hint":
            status = f"injected ({s['attempt_id'].removeprefix(story['prompt_id'] + '/')})"
        elif s["replaced_by"] is not None:
            status = f"replaced by #{s['replaced_by']}"
        else:
            status = "on-policy"
        table.add_row(
            str(s["sample_idx"]),
            str(s["slot"]),
            "[magenta]hint[/magenta]" if s["source"] == "hint" else "policy",
            _yes(s["trained"]),
            f"{s['reward_format']:g}+{s['reward_accuracy']:g}={s['reward_total']:g}",
            s["parsed_answer"] or f"[dim]{s['parse_reason']}[/dim]",
            _num(s["advantage"]),
            _yes(s["gate_open"]),
            _yes(s["distilled"]),
            "[red]yes[/red]" if s["leak_flag"] else "no",
            str(s["n_tokens"]),
            status,
            _short(s["completion_text"], width),
        )
    console.print(table)

    hint = story["hint"]
    if hint is not None:
        lines = [
            f"teacher: {hint['teacher']}   parse_ok: {hint['parse_ok']}"
            + (
                f"   reason: {hint['parse_reason']}   rule: {hint['malformed_rule']}"
                if not hint["parse_ok"]
                else ""
            ),
            f"hint used: {hint['hint_text'] if hint['hint_text'] is not None else '(none: prompt skipped)'}",
            f"raw output: {_short(hint['raw_output'], 4 * width)}",
        ]
        console.print(Panel("\n".join(lines), title="teacher hint", expand=False))
    elif trig["triggered"]:
        console.print("[red]triggered but no hint row[/red]")

    if story["attempts"]:
        at = Table(title="hint-aware attempts (rejection sampling)")
        for col in (
            "b",
            "k",
            "rewards",
            "answer",
            "leak",
            "accepted",
            "attempt ok",
            "injected",
            "completion",
        ):
            at.add_column(col, overflow="fold")
        for a in story["attempts"]:
            at.add_row(
                str(a["attempt_idx"]),
                str(a["k_idx"]),
                f"{a['reward_format']:g}+{a['reward_accuracy']:g}={a['reward_total']:g}",
                a["parsed_answer"] or f"[dim]{a['parse_reason']}[/dim]",
                "[red]yes[/red]" if a["leak_flag"] else "no",
                _yes(a["accepted"]),
                _yes(a["attempt_accepted"]),
                _yes(a["injected"]),
                _short(a["completion_text"], width),
            )
        console.print(at)
        first = story["attempts"][0]
        console.print(Panel(first["generation_prompt"], title="hint-aware prompt", expand=False))

    summary = []
    if story["injected"]:
        summary.append(
            "injected: "
            + ", ".join(
                f"sample {i['sample_idx']} into slot {i['slot']} (from {i['attempt_id']})"
                for i in story["injected"]
            )
        )
    elif trig["triggered"]:
        summary.append(
            f"injected: nothing (no attempt accepted within the budget of {st['budget']}); "
            "the original policy samples are trained"
        )
    if story["replaced"]:
        summary.append(
            "replaced (kept, not trained): "
            + ", ".join(
                f"sample {r['sample_idx']} by {r['replaced_by']}" for r in story["replaced"]
            )
        )
    summary.append(
        "distilled (gate open and trained): "
        + (", ".join(map(str, story["distilled"])) or "none")
        + (
            f"; teacher top-k stored for: {', '.join(str(t['sample_idx']) for t in story['teacher_topk'])}"
            if story["teacher_topk"]
            else ""
        )
    )
    console.print(Panel(Group(*map(Text, summary)), title="outcome", expand=False))


def render_overview(rows: list[dict[str, Any]], console: Console, title: str) -> None:
    table = Table(title=title)
    for col in (
        "pos",
        "prompt_id",
        "modality",
        "gold",
        "policy correct",
        "triggered",
        "reason",
        "attempts",
        "injected",
    ):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            str(r["batch_position"]),
            r["prompt_id"],
            r["modality"],
            r["gold_letter"],
            "-" if r["n_policy_correct"] is None else str(r["n_policy_correct"]),
            _yes(r["triggered"]),
            r["trigger_reason"],
            str(r["n_attempts"]),
            str(r["n_injected"]),
        )
    console.print(table)


__all__ = [
    "explain_trigger",
    "iteration_overview",
    "prompt_story",
    "render_overview",
    "render_story",
]
