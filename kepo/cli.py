"""The `kepo` command line. Sub-commands live in `kepo/commands/`; this module only wires them."""

from __future__ import annotations

import logging
import sys

import typer

from kepo.commands import audit as audit_cmd
from kepo.commands import curate as curate_cmd
from kepo.commands import demo as demo_cmd
from kepo.commands import models as models_cmd
from kepo.commands import run as run_cmd
from kepo.commands import sql as sql_cmd
from kepo.commands import study as study_cmd
from kepo.commands.evaluate import evaluate_command
from kepo.commands.report import report_command
from kepo.commands.train import train_command

app = typer.Typer(
    name="kepo",
    help="KEPO post-training pipeline: curate, roll out, train, evaluate, audit (tables in DuckDB).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """KEPO post-training pipeline: curate, roll out, train, evaluate, audit (tables in DuckDB)."""
    _show_kepo_log()


class _FallbackHandler(logging.StreamHandler):
    """Prints kepo's records on the current sys.stderr when the root logger has no handler of
    its own; otherwise (Prefect's console in demo / run / study, basicConfig in train / eval,
    a test runner) the record propagates there and is shown once."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        self.stream = sys.stderr
        super().emit(record)


def _show_kepo_log() -> None:
    """kepo's INFO lines (progress of long work when stderr is not a terminal, stage
    summaries) are shown by every command."""
    logger = logging.getLogger("kepo")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _FallbackHandler) for h in logger.handlers):
        handler = _FallbackHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)


app.command("sql")(sql_cmd.sql)
# Sub-command groups and commands are registered below, one line each.
app.add_typer(models_cmd.app, name="models")
app.add_typer(curate_cmd.app, name="curate")
app.command("eval")(evaluate_command)
app.command("report")(report_command)
app.command("audit")(audit_cmd.audit)
app.command("train")(train_command)
app.command("rollout")(run_cmd.rollout)
app.command("run")(run_cmd.run)
app.command("demo")(demo_cmd.demo)
app.command("study")(study_cmd.study)
app.add_typer(run_cmd.config_app, name="config")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
