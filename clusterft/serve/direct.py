"""The direct ingress (ServeSpec.ingress: direct): the engine deployment serves the OpenAI and
Anthropic routes itself, so a request is HTTP proxy -> engine replica, one hop, and its tokens go from
the replica's step loop to its HTTP response in process, with no actor message per chunk.

HTTP :port --> engine (num_replicas, FastAPI + EngineLoop per replica) --> TP workers

The routes are ingress.py's (OpenAIRoutes), mounted on this class; the handle they reach the engine
through is this replica itself (InProcessHandle). What the one hop gives up is in the README (Serving,
"Direct ingress"): Serve's proxy picks the replica before the prompt is tokenized, so there is no
prefix routing (ServeSpec refuses routing: prefix with several replicas), and a request in flight on
a replica that dies ends with the proxy's error rather than the OpenAI 503 the separate ingress sends.
"""

import inspect
from collections.abc import Callable
from typing import Any

from ray import serve

from clusterft.serve.engine_deployment import EngineReplica
from clusterft.serve.ingress import OpenAIRoutes, app
from clusterft.serve.spec import ServeSpec


async def _value(value: Any) -> Any:
    return value


class _InProcessMethod:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """An async generator for a streaming method (generate), else an awaitable of its result."""
        result = self.fn(*args, **kwargs)
        return result if inspect.isasyncgen(result) or inspect.isawaitable(result) else _value(result)


class InProcessHandle:
    """What the routes call through `engine` (a DeploymentHandle to the engine in the separate shape),
    answered by this replica's own EngineReplica methods: `engine.options(stream=True).generate.remote
    (...)` is the replica's generate stream, `engine.status.remote()` an awaitable of its status.
    Options (stream) need no translation: each method's shape is its own."""

    def __init__(self, replica: EngineReplica) -> None:
        self._replica = replica

    def options(self, **_: Any) -> "InProcessHandle":
        return self

    def __getattr__(self, method: str) -> _InProcessMethod:
        if method == "generate":  # the follower's stream itself: EngineReplica.generate only re-yields it
            return _InProcessMethod(self._replica.follower.generate)
        return _InProcessMethod(getattr(self._replica, method))


# The replica's environment (ray_actor_options' runtime_env, set in app.py): Serve runs the routes on
# the event loop that serves HTTP, not on a second loop in its own thread, so a streamed chunk goes
# straight to the socket instead of through a cross-thread message queue (the largest per-chunk cost
# in the profile, README Benchmarks "Direct ingress"). The routes never block that loop: engine steps
# and tokenizing run in threads.
DIRECT_REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


@serve.deployment(name="engine", max_ongoing_requests=1024)
@serve.ingress(app)
class DirectEngineDeployment(OpenAIRoutes, EngineReplica):
    """An engine replica that is also the HTTP ingress (Ray Serve LLM's direct streaming pattern)."""

    def __init__(self, spec: ServeSpec) -> None:
        EngineReplica.__init__(self, spec)
        OpenAIRoutes.__init__(self, spec, InProcessHandle(self))  # the engine is this replica
