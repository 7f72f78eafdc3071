"""The model registry, below both the controller and serving: immutable versions per model name,
aliases that point at them (`registry.py`), each version's manifest of file hashes (`manifest.py`),
the records live replicas write of what they serve (`serving.py`), and the staging of a merged model
with its merge-equivalence check (`merged.py`). Imports neither Ray, the controller nor serving.
"""

REGISTRY_ENV = "CLUSTERFT_REGISTRY"
DEFAULT_REGISTRY = "registry"
