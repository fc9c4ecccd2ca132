"""Serve the `kepo-iteration` deployment from this process (a local or remote Prefect API).

    prefect server start                       # terminal 1 (or point PREFECT_API_URL at a server)
    python -m flows.serve --workdir work/demo  # terminal 2: serves kepo-iteration/local
    prefect deployment run 'kepo-iteration/local' -p run_id=kepo-demo -p iteration=0

Each triggered run executes in a fresh subprocess of this server process. For a cluster, deploy
the same flow to a work pool with `prefect deploy` (see prefect.yaml).
"""

from __future__ import annotations

import argparse

from flows.iteration import kepo_iteration


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="work/demo", help="Run directory holding kepo.duckdb.")
    parser.add_argument("--name", default="local", help="Deployment name.")
    parser.add_argument(
        "--limit", type=int, default=1, help="Concurrent runs (1: DuckDB has one writer)."
    )
    args = parser.parse_args()
    kepo_iteration.serve(
        name=args.name,
        parameters={"workdir": args.workdir},
        limit=args.limit,
        description="One KEPO iteration (rollout -> train -> evaluate) of a registered run.",
        tags=["kepo"],
    )


if __name__ == "__main__":
    main()
