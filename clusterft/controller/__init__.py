"""The job controller's pure core: job states, the SQLite job store, policies and the model registry.

Nothing here imports Ray: the detached controller actor and the REST API are thin shells around
these objects, so every decision (resume? give up? promote?) is testable without a cluster.
"""
