"""The job controller: job states, the SQLite job store, policies, the model registry, evaluation,
and the detached Ray actor (`controller.py`) with its CLI group and REST API.

The decisions (resume? give up? promote?) live in modules that never import Ray, so they are
testable without a cluster; `controller.py` imports Ray only inside the actor and its launcher.
"""
