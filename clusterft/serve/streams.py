"""Async stream helpers of the OpenAI routes (module-level so that Serve's pickled classes find them)."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any


async def prepend(first, rest: AsyncIterator) -> AsyncIterator:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


async def merge_streams(gens: list) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """Interleave the engine streams of a request's prompts; cancelling this cancels them all (client
    disconnects abort every prompt's engine request, which frees its blocks). One stream (every chat
    request, most completions) is passed through as it is: no pump task and queue hop per chunk."""
    if len(gens) == 1:
        try:
            async for chunk in gens[0]:
                yield 0, chunk
        finally:
            await _close(gens[0])
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen) -> None:
        try:
            async for chunk in gen:
                await queue.put((i, chunk))
        except Exception as exc:
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    remaining = len(gens)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for gen in gens:
            cancel = getattr(gen, "cancel", None)
            if cancel is not None:  # a Ray stream: its engine request aborts in the engine replica
                cancel()
        for task in tasks:  # an in-process stream (direct ingress): cancelled with its pump task
            task.cancel()


async def _close(gen) -> None:
    """End a stream its consumer left: a Ray stream is cancelled (its engine request aborts in the
    engine replica), an in-process one (direct ingress) closed, which aborts its engine request."""
    cancel = getattr(gen, "cancel", None)
    if cancel is not None:
        cancel()
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        await aclose()
