"""The job controller: job states, the SQLite job store, policies, the model registry, evaluation,
the controller (`controller.py`) and the detached Ray actor that runs it (`actor.py`), with its CLI
group and REST API.

The decisions (resume? give up? promote?) live in modules that never import Ray, so they are
testable without a cluster; `actor.py` imports Ray only inside the actor and its launcher.
"""
