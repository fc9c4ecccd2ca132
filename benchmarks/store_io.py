"""The store: an iteration's rollout tables through `kepo.store` vs a raw pyarrow Parquet
write/read of the same rows (rows/s), and the store's share of an iteration's wall time.

Part 1, the iteration. One KEPO iteration of the demo config (configs/demo/kepo.yaml:
16 prompts x G = 8, 64-token completions, exploration on, online distillation) runs end to end
through `kepo.pipeline` on the bundled data and tiny models, as the `kepo-iteration` flow runs
it: rollout(0) -> train(0) -> evaluate(1), each stage with its `stages` bookkeeping. Every
public `Store` method is wrapped with a timer (outermost calls only, so nested calls are not
counted twice): the store's time is the wall time spent inside `kepo.store` (opening the
DuckDB file, DDL check, cast + pandera validation, DELETE + INSERT, reads). The same iteration
also gives the rows for part 2. By default the tiny models are built fresh (random weights:
they sample all 64 tokens, every prompt triggers exploration), with `--workdir` the warmed-up
models and curated data of a `kepo demo` workdir are used instead.

Part 2, rows/s. The iteration's rollout tables (prompts, rollouts with completion_ids /
sampled_logprobs / old_logprobs lists, hints, hint_attempts, teacher_topk), read back from the
store, optionally replicated `--replicate` times (prompt ids suffixed) to show how each side
scales. Sides, alternating after one warm-up, `--repeats` times:

- `kepo_store`: `Store.write_partitions(tables, run_id, iteration)` into a DuckDB file that
  already holds the partition (so it is a replace: one transaction, DELETE + INSERT per table,
  after casting and pandera validation), then `Store.read(table, {run_id, iteration})` of each.
- `raw_parquet`: `pyarrow.parquet.write_table` of each table to its own file, then
  `read_table` of each (no validation, no transaction, no partition replace).

    python benchmarks/store_io.py
    python benchmarks/store_io.py --workdir work/demo          # warmed-up demo models and data
    python benchmarks/store_io.py --replicate 1 16 --repeats 5

Prints tables and one JSON line (prefix `store_io `).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from _common import REPO, alternate, emit_json, medians, print_table, set_threads, tiny_pair

PREFIX = "store_io"
ROLLOUT_TABLES = ("prompts", "rollouts", "hints", "hint_attempts", "teacher_topk")
STORE_METHODS = (
    "initialize",
    "overwrite_partition",
    "write_partitions",
    "replace_rows",
    "query",
    "read",
    "count",
    "register_run",
    "run_config",
    "run_ids",
    "set_stage",
    "begin_stage",
    "stage_status",
)


# ------------------------------------------------------------------------------ store timer
class StoreTimer:
    """Wraps every public `Store` method; accumulates wall time of outermost calls per label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.by_method: dict[str, float] = defaultdict(float)
        self.label = "setup"
        self._depth = 0
        self._originals: dict[str, Any] = {}

    def install(self) -> None:
        from kepo.store import Store

        for name in STORE_METHODS:
            original = getattr(Store, name)
            self._originals[name] = original
            setattr(Store, name, self._wrap(name, original))

    def uninstall(self) -> None:
        from kepo.store import Store

        for name, original in self._originals.items():
            setattr(Store, name, original)

    def _wrap(self, name: str, method: Any) -> Any:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return method(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds[self.label] += elapsed
                self.by_method[name] += elapsed
                self.calls[self.label] += 1
                self._depth -= 1

        return wrapper


# ------------------------------------------------------------------------------ part 1
def run_iteration(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], Any]:
    """One demo iteration through kepo.pipeline; returns its timings and the Run."""
    from kepo.config import load_config
    from kepo.pipeline import PlannedStage, execute, iteration_plan
    from kepo.run import Run

    student, teacher, models_note = tiny_pair(tmp / "models", args.workdir)
    data_dir = (args.workdir / "data") if args.workdir else tmp / "data"
    overrides: dict[str, Any] = {
        "workdir": str(tmp / "run"),
        "data.out_dir": str(data_dir),
        "models.student": str(student),
        "models.teacher": str(teacher),
        "models.torch_threads": args.threads,
        "iterations": 1,
    }
    if args.small:  # the smoke-test size: everything minimal, same code path
        overrides |= {
            "data.train_size": 8,
            "data.test_per_modality": 1,
            "data.bundled.synthetic_per_modality": 10,
            "data.bundled.real_variants_per_image": 1,
            "rollout.prompts_per_iteration": 2,
            "rollout.group_size": 2,
            "rollout.sampling.max_new_tokens": 8,
            "rollout.exploration.budget": 1,
            "rollout.exploration.inject_k": 1,
            "rollout.exploration.hint_sampling.max_new_tokens": 8,
            "train.micro_batch_size": 2,
            "train.grad_accum_steps": 1,
            "eval.max_items_per_modality": 1,
            "eval.sampling.max_new_tokens": 8,
        }
    cfg = load_config(REPO / "configs" / "demo" / "kepo.yaml", overrides=overrides)
    timer = StoreTimer()
    timer.install()
    try:
        run = Run.create(cfg)
        execute(run, PlannedStage(0, "curate"))  # reused when the data exists; not timed below
        timer.by_method.clear()
        stages: dict[str, dict[str, float]] = {}
        for planned in iteration_plan(run, 0):
            label = f"{planned.stage}({planned.iteration})"
            timer.label = label
            start = time.perf_counter()
            execute(run, planned)
            stages[label] = {
                "wall_s": time.perf_counter() - start,
                "store_s": timer.seconds[label],
                "store_calls": timer.calls[label],
            }
    finally:
        timer.uninstall()
    total = sum(s["wall_s"] for s in stages.values())
    store = sum(s["store_s"] for s in stages.values())
    return {
        "models": models_note,
        "stages": stages,
        "iteration_wall_s": total,
        "iteration_store_s": store,
        "store_share": store / total,
        "store_calls": sum(timer.calls[label] for label in stages),
        "store_s_by_method": dict(sorted(timer.by_method.items(), key=lambda kv: -kv[1])),
    }, run


# ------------------------------------------------------------------------------ part 2
def rollout_tables(run: Any) -> dict[str, pa.Table]:
    where = {"run_id": run.run_id, "iteration": 0}
    return {name: run.store.read(name, where) for name in ROLLOUT_TABLES}


def replicate(tables: dict[str, pa.Table], copies: int) -> dict[str, pa.Table]:
    """`copies` copies of every row, prompt ids suffixed '#r<j>' so keys stay unique."""
    if copies == 1:
        return tables
    out = {}
    for name, table in tables.items():
        parts = []
        for j in range(copies):
            ids = pc.binary_join_element_wise(table.column("prompt_id"), pa.scalar(f"r{j}"), "#")
            parts.append(
                table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", ids)
            )
        out[name] = pa.concat_tables(parts)
    return out


def compare_io(
    tables: dict[str, pa.Table], run_id: str, work: Path, repeats: int
) -> dict[str, Any]:
    """Alternating write+read of the tables: kepo.store vs raw Parquet."""
    import kepo.store as store_module
    from kepo.store import Store

    work.mkdir(parents=True, exist_ok=True)
    store = Store(work / "bench.duckdb")
    store.initialize()
    where = {"run_id": run_id, "iteration": 0}
    parts: dict[str, list[float]] = defaultdict(list)
    validate = {"s": 0.0}
    to_arrow = store_module.to_arrow

    def timed_to_arrow(*a: Any, **kw: Any) -> pa.Table:
        start = time.perf_counter()
        try:
            return to_arrow(*a, **kw)
        finally:
            validate["s"] += time.perf_counter() - start

    def kepo_store() -> float:
        validate["s"] = 0.0
        store_module.to_arrow = timed_to_arrow
        try:
            start = time.perf_counter()
            store.write_partitions(tables, run_id=run_id, iteration=0)
            mid = time.perf_counter()
            for name in tables:
                got = store.read(name, where)
                if got.num_rows != tables[name].num_rows:
                    raise RuntimeError(f"store read {got.num_rows} rows of {name}")
            end = time.perf_counter()
        finally:
            store_module.to_arrow = to_arrow
        parts["kepo_store.write"].append(mid - start)
        parts["kepo_store.read"].append(end - mid)
        parts["kepo_store.validate"].append(validate["s"])
        return end - start

    def raw_parquet() -> float:
        start = time.perf_counter()
        for name, table in tables.items():
            pq.write_table(table, work / f"{name}.parquet")
        mid = time.perf_counter()
        for name in tables:
            got = pq.read_table(work / f"{name}.parquet")
            if got.num_rows != tables[name].num_rows:
                raise RuntimeError(f"parquet read {got.num_rows} rows of {name}")
        end = time.perf_counter()
        parts["raw_parquet.write"].append(mid - start)
        parts["raw_parquet.read"].append(end - mid)
        return end - start

    parts.clear()
    times = alternate({"kepo_store": kepo_store, "raw_parquet": raw_parquet}, repeats=repeats)
    # the warm-up round's parts are in `parts` too: drop them
    parts_timed = {k: v[1:] for k, v in parts.items()}
    return {
        "rows": sum(t.num_rows for t in tables.values()),
        "rows_per_table": {name: t.num_rows for name, t in tables.items()},
        "arrow_mb": sum(t.nbytes for t in tables.values()) / 2**20,
        "parquet_mb": sum((work / f"{n}.parquet").stat().st_size for n in tables) / 2**20,
        "times": times,
        "parts": parts_timed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="A `kepo demo` workdir (warmed-up models, curated data).",
    )
    parser.add_argument(
        "--replicate", type=int, nargs="+", default=[1, 16], help="Row multipliers for part 2."
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--small", action="store_true", help="Minimal sizes (smoke test).")
    args = parser.parse_args()
    threads_note = set_threads(args.threads)
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        iteration, run = run_iteration(args, tmp)
        base = rollout_tables(run)
        io_results = {
            copies: compare_io(
                replicate(base, copies), run.run_id, tmp / f"io{copies}", args.repeats
            )
            for copies in args.replicate
        }
        cfg = run.config

    print(
        f"iteration: {cfg.rollout.prompts_per_iteration} prompts x G={cfg.rollout.group_size}, "
        f"{cfg.rollout.sampling.max_new_tokens}-token completions, KEPO demo config; {iteration['models']}"
    )
    print(f"cpu, {threads_note}")
    print_table(
        ["stage", "wall s", "in kepo.store s", "store calls", "store share"],
        [
            [
                k,
                v["wall_s"],
                v["store_s"],
                v["store_calls"],
                f"{100 * v['store_s'] / v['wall_s']:.1f} %",
            ]
            for k, v in iteration["stages"].items()
        ]
        + [
            [
                "iteration",
                iteration["iteration_wall_s"],
                iteration["iteration_store_s"],
                iteration["store_calls"],
                f"{100 * iteration['store_share']:.1f} %",
            ]
        ],
    )
    print()
    print(
        f"rollout tables write + read, {args.repeats} alternating repeats after 1 warm-up; medians"
    )
    table, payload_io = [], {}
    for copies, res in io_results.items():
        med = medians(res["times"])
        part_med = medians(res["parts"])
        for side in ("kepo_store", "raw_parquet"):
            table.append(
                [
                    f"x{copies} {side}",
                    res["rows"],
                    med[side],
                    part_med[f"{side}.write"],
                    part_med[f"{side}.read"],
                    part_med.get(f"{side}.validate", 0.0),
                    res["rows"] / med[side],
                ]
            )
        payload_io[f"x{copies}"] = {
            "rows": res["rows"],
            "rows_per_table": res["rows_per_table"],
            "arrow_mb": res["arrow_mb"],
            "parquet_mb": res["parquet_mb"],
            "median_s": med,
            "median_parts_s": part_med,
            "rows_per_s": {side: res["rows"] / med[side] for side in med},
            "ratio_store_over_parquet_time": med["kepo_store"] / med["raw_parquet"],
            "all_s": res["times"],
        }
    print_table(
        ["side", "rows", "write+read s", "write s", "read s", "of write: validate s", "rows/s"],
        table,
    )
    emit_json(
        PREFIX,
        {
            "threads": args.threads,
            "models": iteration["models"],
            "prompts": cfg.rollout.prompts_per_iteration,
            "group": cfg.rollout.group_size,
            "max_new_tokens": cfg.rollout.sampling.max_new_tokens,
            "iteration": {k: v for k, v in iteration.items() if k != "models"},
            "io": payload_io,
            "repeats": args.repeats,
        },
    )


if __name__ == "__main__":
    main()
