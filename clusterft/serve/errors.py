"""What the ingress makes of a failed engine call (errors in OpenAI's schema: clusterft/http.py).

An engine replica that dies (a crash, an OOM kill, a node gone) shows up at the ingress as a Ray
actor error on the deployment handle, at the first chunk or in the middle of a stream. The client
then gets a 503 with Retry-After (or, for a stream already sent, an SSE error event) saying the
replica died and to retry: Serve replaces the replica, and a retry lands on a live one.
"""

from __future__ import annotations

import logging

from ray.exceptions import RayActorError, RayError

from clusterft.http import APIError

logger = logging.getLogger(__name__)


def engine_error(exc: RayError) -> APIError:
    """The 503 for a failed call on the engine deployment's handle."""
    if isinstance(exc, RayActorError):
        message = (
            f"the engine replica died while handling this request ({type(exc).__name__}); "
            "it was not completed: retry it (Serve is starting a replacement replica)"
        )
    else:  # its text can carry a remote traceback: logged, never sent
        logger.error("engine call failed: %s", exc)
        message = f"the engine could not handle this request ({type(exc).__name__}); retry it"
    return APIError(503, message)
