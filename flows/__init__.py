"""Prefect flows and deployments of kepo: thin wrappers that call `kepo/`.

Offline defaults are set before Prefect reads its settings: no telemetry (there is no network),
a patient start for the embedded local API on a busy machine, and kepo's own loggers shown in the
Prefect UI next to the flow's. Each can be overridden by setting the variable yourself.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "kepo")
