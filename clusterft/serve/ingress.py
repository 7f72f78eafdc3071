"""The OpenAI HTTP edge (FastAPI inside a Serve deployment): auth, validation, chat templates,
tokenization, and streaming the engine's deltas as OpenAI JSON or SSE.

Every error leaves in OpenAI's schema. Bad input is a 400 (never a 500); a stream's status is decided
by its first engine message, which is awaited before the response starts, so overload (503) and
unknown models (404) are real status codes even for `stream: true`.

No `from __future__ import annotations` here: FastAPI must see real types in route signatures
(strings in methods wrapped by `serve.ingress` are not resolved and `Request` becomes a query field).
"""

import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from clusterft.engine import SamplingParams
from clusterft.serve.metrics import ServeMetrics
from clusterft.serve.model_source import resolve
from clusterft.serve.protocol import (
    AdapterRequest,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ModelCard,
    ModelList,
    error_body,
    new_id,
    now,
)
from clusterft.serve.responses import (
    ChoiceAccumulator,
    TokenText,
    UsageCounter,
    chat_logprobs,
    completion_logprobs,
)
from clusterft.serve.spec import ServeSpec
from clusterft.serve.streams import merge_streams, prepend
from clusterft.serve.version_routes import ModelVersionHeader, VersionRoutes, note_model_version, router

RETRY_AFTER_S = 1
app = FastAPI(title="clusterft OpenAI-compatible server")
app.add_middleware(ModelVersionHeader)
app.include_router(router)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(error_body(message, type_, param, status), status_code=status, headers=headers)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return _error_response(exc.status, exc.message, exc.type, exc.param)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return _error_response(400, f"{param or 'request'}: {first.get('msg')}", "BadRequestError", param)


@app.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", "InternalServerError")


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error_response(
        exc.status_code, str(exc.detail), "NotFoundError" if exc.status_code == 404 else "Error"
    )


def _raise_if_error(chunk: dict[str, Any]) -> None:
    if "error" in chunk:
        e = chunk["error"]
        raise APIError(e["status"], e["message"], e["type"], e.get("param"))


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@serve.deployment(name="ingress", max_ongoing_requests=1024)
@serve.ingress(app)
class OpenAIIngress(VersionRoutes):
    def __init__(self, spec: ServeSpec, engine: DeploymentHandle) -> None:
        from clusterft.runtime import apply_runtime_defaults

        apply_runtime_defaults()
        from clusterft.hf.loading import load_tokenizer

        self.spec = spec
        self.engine = engine
        self.tokenizer = load_tokenizer(resolve(spec).model_dir)  # registry versions share their tokenizer
        self.token_text = TokenText(self.tokenizer)
        self.api_key = spec.resolved_api_key()
        self.metrics = ServeMetrics()
        self._max_model_len: int | None = None

    # ---- plumbing --------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Constant-time: the comparison's duration must not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise APIError(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>'", "AuthenticationError"
            )

    async def _model_info(self) -> dict[str, Any]:
        try:
            return await self.engine.model_info.remote()
        except RayError as exc:
            raise APIError(
                503, f"the engine is unavailable ({type(exc).__name__}); retry", "ServiceUnavailableError"
            ) from exc

    async def _max_len(self) -> int:
        if self._max_model_len is None:
            self._max_model_len = (await self._model_info())["max_model_len"]
        return self._max_model_len

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def _check_lengths(self, prompts: list[list[int]], max_tokens: int | None, field: str) -> None:
        max_len = await self._max_len()
        for ids in prompts:
            if not ids:
                raise APIError(400, "prompt is empty: give at least one token", "BadRequestError", "prompt")
            wanted = len(ids) + (max_tokens or 1)
            if len(ids) >= max_len or wanted > max_len:
                raise APIError(
                    400,
                    f"This model's maximum context length is {max_len} tokens. However, you requested "
                    f"{wanted} tokens ({len(ids)} in the prompt, {max_tokens or 1} in `{field}`). "
                    f"Shorten the prompt or lower `{field}`.",
                    "BadRequestError",
                    field,
                )

    @staticmethod
    def _params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, logprobs: int | None):
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        try:
            return SamplingParams(
                n=req.n,
                best_of=req.best_of,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                min_p=req.min_p,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty,
                seed=req.seed,
                max_tokens=max_tokens,
                stop=tuple(stop),
                stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
            )
        except ValueError as exc:
            raise APIError(400, str(exc), "BadRequestError") from exc

    async def _start(
        self, prompts: list[list[int]], params: SamplingParams, model: str, priority: int
    ) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """Send every prompt to the engine; yields (prompt index, chunk), the first already awaited so
        that admission errors raise APIError before any response starts."""
        base = new_id("req")
        gens = [
            self.engine.options(stream=True).generate.remote(f"{base}-{i}", ids, params, model, priority)
            for i, ids in enumerate(prompts)
        ]
        merged = merge_streams(gens)
        try:
            first = await merged.__anext__()
        except RayError as exc:
            await merged.aclose()
            raise APIError(
                503, f"the engine is unavailable ({type(exc).__name__}); retry", "ServiceUnavailableError"
            ) from exc
        if "error" in first[1]:
            await merged.aclose()
            _raise_if_error(first[1])
        note_model_version(first[1])
        return prepend(first, merged)

    async def _timed(
        self, stream: AsyncIterator[tuple[int, dict[str, Any]]], counter: UsageCounter, start: float
    ):
        """Pass chunks through, recording TTFT, inter-token latency and token counts."""
        last = None
        try:
            async for i, chunk in stream:
                if "error" in chunk:
                    yield i, chunk
                    continue
                num_tokens = counter.add(i, chunk)
                if num_tokens:
                    t = time.perf_counter()
                    if last is None:
                        self.metrics.ttft.observe(t - start)
                    else:
                        self.metrics.observe_tokens(t - last, num_tokens)
                    last = t
                yield i, chunk
        except RayError as exc:  # the engine replica died under this request
            msg = f"the engine replica failed while running this request ({type(exc).__name__}); retry it"
            yield 0, {"error": {"status": 503, "message": msg, "type": "ServiceUnavailableError"}}
            return
        self.metrics.e2e.observe(time.perf_counter() - start)
        self.metrics.prompt_tokens.inc(sum(counter.prompt_tokens.values()))
        self.metrics.generation_tokens.inc(counter.completion_tokens)

    # ---- routes ----------------------------------------------------------------------------------
    @app.get("/metrics")
    async def metrics(self) -> Response:
        if not self.spec.enable_metrics:
            raise APIError(404, "metrics are disabled (enable_metrics: false)", "NotFoundError")
        stats = await self.engine.stats.remote()
        return Response(self.metrics.render(stats), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(self, request: Request) -> ModelList:
        self._authorize(request)
        info = await self._model_info()
        created = now()
        cards = [
            ModelCard(
                id=info["base_model"],
                created=created,
                root=info["root"],
                version=info["version"],
                max_model_len=info["max_model_len"],
            )
        ]
        for name, path in info["adapters"].items():
            cards.append(
                ModelCard(
                    id=name,
                    created=created,
                    root=path,
                    parent=info["base_model"],
                    max_model_len=info["max_model_len"],
                )
            )
        return ModelList(data=cards)

    @app.post("/v1/admin/adapters", status_code=201)
    async def add_adapter(self, body: AdapterRequest, request: Request) -> dict[str, Any]:
        self._authorize(request)
        _raise_if_error(await self.engine.add_adapter.remote(body.name, body.path) or {})
        return {"id": body.name, "object": "model", "root": body.path}

    @app.delete("/v1/admin/adapters/{name}")
    async def remove_adapter(self, name: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        _raise_if_error(await self.engine.remove_adapter.remote(name) or {})
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        start = time.perf_counter()
        self._authorize(request)
        if body.echo and body.logprobs is not None:
            raise APIError(
                400,
                "echo with logprobs needs prompt logprobs, which are not computed; drop one",
                "BadRequestError",
                "echo",
            )
        raw = body.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        prompts = [self._encode(p) if isinstance(p, str) else list(p) for p in raw]
        await self._check_lengths(prompts, body.max_tokens, "max_tokens")
        params = self._params(body, body.max_tokens, body.logprobs)
        echo = [self.tokenizer.decode(ids) if body.echo else "" for ids in prompts]
        counter = UsageCounter()
        stream = self._timed(await self._start(prompts, params, body.model, body.priority), counter, start)
        rid, created = new_id("cmpl"), now()
        if body.stream:
            return self._sse_response(self._completion_events(stream, body, echo, rid, created, counter))
        acc = ChoiceAccumulator(body.n)
        async for i, chunk in stream:
            _raise_if_error(chunk)
            acc.add(i, chunk)
        choices = []
        for index, c in acc.ordered():
            lps = None
            if body.logprobs is not None:
                lps = completion_logprobs(c.token_ids, c.logprobs, body.logprobs, self.token_text, 0)
            choices.append(
                CompletionChoice(
                    index=index,
                    text=echo[index // body.n] + "".join(c.text),
                    logprobs=lps,
                    finish_reason=c.finish_reason,
                )
            )
        self.metrics.requests.labels("200").inc()
        return JSONResponse(
            CompletionResponse(
                id=rid, created=created, model=body.model, choices=choices, usage=counter.usage()
            ).model_dump()
        )

    async def _completion_events(self, stream, body: CompletionRequest, echo, rid, created, counter):
        echoed, offsets = set(), {}
        async for i, chunk in stream:
            if "error" in chunk:
                yield _sse(error_body(chunk["error"]["message"], chunk["error"]["type"], None, 503))
                break
            choices = []
            for o in chunk["outputs"]:
                index = i * body.n + o["index"]
                text = o["text"]
                if index not in echoed:
                    echoed.add(index)
                    text = echo[i] + text
                lps = None
                if body.logprobs is not None:
                    lps = completion_logprobs(
                        o["token_ids"],
                        o["logprobs"] or [],
                        body.logprobs,
                        self.token_text,
                        offsets.get(index, 0),
                    ).model_dump()
                offsets[index] = offsets.get(index, 0) + len(o["text"])
                choices.append(
                    {"index": index, "text": text, "logprobs": lps, "finish_reason": o["finish_reason"]}
                )
            if choices:
                yield _sse(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": body.model,
                        "choices": choices,
                    }
                )
        else:
            if body.stream_options and body.stream_options.include_usage:
                yield _sse(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": body.model,
                        "choices": [],
                        "usage": counter.usage().model_dump(),
                    }
                )
        yield _sse("[DONE]")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        start = time.perf_counter()
        self._authorize(request)
        from clusterft.data import render_prompt

        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = render_prompt(messages, self.spec.chat_template, self.tokenizer)
        except Exception as exc:
            raise APIError(
                400, f"messages: cannot apply the chat template: {exc}", "BadRequestError", "messages"
            ) from exc
        prompts = [self._encode(text)]
        max_tokens = body.max_completion_tokens or body.max_tokens
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        await self._check_lengths(prompts, max_tokens, field)
        k = body.top_logprobs or 0
        params = self._params(body, max_tokens, k if body.logprobs else None)
        counter = UsageCounter()
        stream = self._timed(await self._start(prompts, params, body.model, body.priority), counter, start)
        rid, created = new_id("chatcmpl"), now()
        if body.stream:
            return self._sse_response(self._chat_events(stream, body, rid, created, counter, k))
        acc = ChoiceAccumulator(body.n)
        async for i, chunk in stream:
            _raise_if_error(chunk)
            acc.add(i, chunk)
        choices = [
            ChatChoice(
                index=index,
                message=AssistantMessage(content="".join(c.text)),
                logprobs=chat_logprobs(c.token_ids, c.logprobs, k, self.token_text)
                if body.logprobs
                else None,
                finish_reason=c.finish_reason,
            )
            for index, c in acc.ordered()
        ]
        self.metrics.requests.labels("200").inc()
        return JSONResponse(
            ChatCompletionResponse(
                id=rid, created=created, model=body.model, choices=choices, usage=counter.usage()
            ).model_dump()
        )

    async def _chat_events(self, stream, body: ChatCompletionRequest, rid, created, counter, k: int):
        started: set[int] = set()

        def chunk_of(choices: list[ChatChunkChoice], usage=None) -> str:
            return _sse(
                ChatCompletionChunk(
                    id=rid, created=created, model=body.model, choices=choices, usage=usage
                ).model_dump(exclude_none=True)
            )

        async for _, chunk in stream:
            if "error" in chunk:
                yield _sse(error_body(chunk["error"]["message"], chunk["error"]["type"], None, 503))
                break
            choices = []
            for o in chunk["outputs"]:
                index = o["index"]
                if index not in started:  # OpenAI's first delta of a choice names the role
                    started.add(index)
                    choices.append(ChatChunkChoice(index=index, delta=Delta(role="assistant", content="")))
                lps = (
                    chat_logprobs(o["token_ids"], o["logprobs"] or [], k, self.token_text)
                    if body.logprobs
                    else None
                )
                choices.append(
                    ChatChunkChoice(
                        index=index,
                        delta=Delta(content=o["text"]),
                        logprobs=lps,
                        finish_reason=o["finish_reason"],
                    )
                )
            if choices:
                yield chunk_of(choices)
        else:
            if body.stream_options and body.stream_options.include_usage:
                yield chunk_of([], counter.usage())
        yield _sse("[DONE]")

    def _sse_response(self, events: AsyncIterator[str]) -> StreamingResponse:
        self.metrics.requests.labels("200").inc()
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
