"""Prefect flows and deployments of kepo: thin wrappers that call `kepo/`.

Offline defaults are set before Prefect reads its settings: no telemetry (there is no network)
and a patient start for the embedded local API on a busy machine. Both can be overridden by
setting the variables yourself.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
