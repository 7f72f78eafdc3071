"""The web dashboard the jobs API serves at /dashboard: jobs with live loss curves, checkpoints,
evaluation against gates and logs; the registry with promote and rollback; the serve app's figures;
a YAML editor that submits jobs. Plain HTML and JS with uPlot vendored (static/), nothing fetched
from the internet; its data comes from /v1 routes under the jobs API's keys (routes.py)."""

from clusterft.dashboard.routes import mount_dashboard

__all__ = ["mount_dashboard"]
