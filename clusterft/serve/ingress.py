"""The OpenAI HTTP edge (FastAPI inside a Serve deployment): auth, validation, chat templates,
tokenization, and streaming the engine's deltas as OpenAI JSON or SSE.

Every error leaves in OpenAI's schema. Bad input is a 400 (never a 500); a stream's status is decided
by its first engine message, which is awaited before the response starts, so overload (503) and
unknown models (404) are real status codes even for `stream: true`.

One request must never hurt another: `RequestGuard` answers 401/403 and 413 before a body is parsed;
the schemas (protocol.py) bound every field, and the model's bounds (token ids, top_k, text that
cannot fit the context) are checked here before anything is tokenized; tokenizing and chat templating
run on one tokenizer thread, never on the event loop every stream of this replica shares. `priority`
(a request that runs ahead of others and preempts them) is for callers with the admin key only: 403.
It has vLLM's meaning (lower runs first: -1 before 0); the engine's is the opposite (higher first), so
the value is negated on its way there.

Each request is tokenized, and its response decoded, with the tokenizer of the model version that
runs it (clusterft/serve/tokenizers.py): a promoted version may add tokens.

No `from __future__ import annotations` here: FastAPI must see real types in route signatures
(strings in methods wrapped by `serve.ingress` are not resolved and `Request` becomes a query field).
"""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle

from clusterft.engine import SamplingParams
from clusterft.engine.structured import StructuredOutputsParams
from clusterft.http import APIError, EdgePolicy, RequestGuard, add_error_handlers
from clusterft.serve import anthropic
from clusterft.serve.admin import change_everywhere, record_handle
from clusterft.serve.constraints import chat_tool_format, output_constraint, template_messages, uses_tools
from clusterft.serve.errors import engine_error
from clusterft.serve.metrics import RequestCounter, ServeMetrics, note_error_status
from clusterft.serve.protocol import (
    AdapterRequest,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    new_id,
    now,
)
from clusterft.serve.responses import (
    ChatChunkChoices,
    ChoiceAccumulator,
    CompletionChunkChoices,
    UsageCounter,
    assistant_reply,
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    joined,
    sse_events,
    vllm_prompt_logprobs,
    without_generation,
)
from clusterft.serve.routing import routing_key
from clusterft.serve.spec import ServeSpec
from clusterft.serve.streams import merge_streams, prepend
from clusterft.serve.tokenizers import Tokenizers, VersionTokenizer
from clusterft.serve.version_routes import ModelVersionHeader, VersionRoutes, note_model_version, router

T = TypeVar("T")
MAX_TOKENIZER_SWITCHES = 3  # a request sent back this often (versions switching under it) is a 503


def _edge_policy() -> EdgePolicy:
    """The policy of the replica this request reached (set in OpenAIRoutes.__init__)."""
    return serve.get_replica_context().servable_object.edge_policy


def _edge_error_response(request: Request, error: APIError) -> Response:
    """A refused request's answer in its route's shape: Anthropic's on /v1/messages, else OpenAI's."""
    if request.url.path == "/v1/messages":
        return anthropic.error_response(error)
    return error.response()


def _metrics() -> ServeMetrics:
    return serve.get_replica_context().servable_object.metrics


app = FastAPI(title="clusterft OpenAI-compatible server")
app.add_middleware(ModelVersionHeader)
app.add_middleware(RequestGuard, policy=_edge_policy)
app.add_middleware(RequestCounter, metrics=_metrics)  # outermost: it counts RequestGuard's answers too
app.include_router(router)
add_error_handlers(app)


def _raise_if_error(chunk: dict[str, Any]) -> None:
    if "error" in chunk:
        raise APIError.from_chunk(chunk)


class OpenAIRoutes(VersionRoutes):
    """The HTTP routes and their plumbing, mounted by two Serve shapes: the separate ingress below
    (requests reach the engine through `engine`, a handle) and the direct engine deployment
    (clusterft/serve/direct.py: the engine replica serves them itself, `engine` calls it in process)."""

    def __init__(self, spec: ServeSpec, engine: DeploymentHandle) -> None:
        from clusterft.runtime import apply_runtime_defaults

        apply_runtime_defaults()

        self.spec = spec
        self.engine = engine
        self.admin = record_handle(spec)  # admin changes reach every engine replica through it
        self.tokenizers = Tokenizers(spec)  # each version's; loading them runs on the tokenizer thread
        # One thread: tokenizing is CPU work that must not stall the event loop (every stream of this
        # replica), and a fast tokenizer must not be used from two threads at once.
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self.edge_policy = EdgePolicy(
            spec.resolved_api_key(),
            spec.resolved_admin_api_key(),
            spec.max_request_bytes,
            error_response=_edge_error_response,
        )
        self.metrics = ServeMetrics()
        self._max_model_len: int | None = None

    # ---- plumbing --------------------------------------------------------------------------------
    async def _in_tokenizer_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn, *args)

    def _engine_stream(
        self,
        request_id: str,
        ids: list[int],
        params: SamplingParams,
        model: str,
        priority: int,
        fingerprint: str | None,
    ) -> Any:
        """One prompt's engine stream (EngineDeployment.generate): a Ray streaming call here."""
        return self.engine.options(stream=True).generate.remote(
            request_id, ids, params, model, priority, fingerprint, routing_key()
        )

    async def _model_info(self) -> dict[str, Any]:
        return await self._engine_call("model_info")

    async def _max_len(self) -> int:
        if self._max_model_len is None:
            self._max_model_len = (await self._model_info())["max_model_len"]
        return self._max_model_len

    async def _tokenizer_of(self, version: str | None) -> VersionTokenizer:
        """The tokenizer of `version`, which an engine replica serves now: requests are tokenized for it
        from here on."""
        tok = self.tokenizers.current
        if version != tok.version:
            tok = await self._in_tokenizer_thread(self.tokenizers.get, version)
            self.tokenizers.current = tok
        return tok

    async def _prompt_token_ids(
        self, tok: VersionTokenizer, prompt: str | list[int], index: int
    ) -> list[int]:
        """A prompt's token ids: text tokenized on the tokenizer thread, ids checked against the vocab."""
        if isinstance(prompt, str):
            tok.check_text_fits(len(prompt), await self._max_len(), "prompt")
            return await self._in_tokenizer_thread(tok.encode, prompt)
        tok.check_token_ids(prompt, index)
        return list(prompt)

    def _check_priority(self, priority: int, request: Request) -> None:
        if priority and not self.edge_policy.is_admin(request):
            raise APIError(
                403,
                "priority: only callers with the admin key may set it (a request with priority runs "
                "ahead of others' and preempts them); drop it or send the admin key",
                "priority",
            )

    async def _check_lengths(self, prompts: list[list[int]], max_tokens: int | None, field: str) -> None:
        max_len = await self._max_len()
        for ids in prompts:
            if not ids:
                raise APIError(400, "prompt is empty: give at least one token", "prompt")
            wanted = len(ids) + (max_tokens or 1)
            if len(ids) >= max_len or wanted > max_len:
                raise APIError(
                    400,
                    f"This model's maximum context length is {max_len} tokens. However, you requested "
                    f"{wanted} tokens ({len(ids)} in the prompt, {max_tokens or 1} in `{field}`). "
                    f"Shorten the prompt or lower `{field}`.",
                    field,
                )

    def _params(
        self,
        req: CompletionRequest | ChatCompletionRequest,
        max_tokens: int | None,
        logprobs: int | None,
        structured: StructuredOutputsParams | None = None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """The request's SamplingParams; a 400 naming the field for what the schema could not check
        alone (best_of < n, top_k over the vocab)."""
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        vocab_size = self.tokenizers.current.vocab_size
        if req.top_k > vocab_size:
            raise APIError(
                400,
                f"top_k must be -1, 0 (off) or in [1, {vocab_size}] (the model's vocab size), "
                f"got {req.top_k}",
                "top_k",
            )
        # Beam search is deterministic: an unset temperature means 0 there, as in vLLM's API.
        beam_default = req.use_beam_search and "temperature" not in req.model_fields_set
        try:
            return SamplingParams(
                n=req.n,
                best_of=req.best_of,
                temperature=0.0 if beam_default else req.temperature,
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
                prompt_logprobs=prompt_logprobs,
                use_beam_search=req.use_beam_search,
                length_penalty=req.length_penalty,
                early_stopping=req.early_stopping,
                structured_outputs=structured,
            )
        except ValueError as exc:
            field = str(exc).split(" ", 1)[0]
            raise APIError(400, str(exc), field if field in type(req).model_fields else None) from exc

    async def _start(
        self,
        prepare: Callable[[VersionTokenizer], Awaitable[list[list[int]]]],
        tokenized: bool,
        params: SamplingParams,
        model: str,
        priority: int,
    ) -> tuple[VersionTokenizer, list[list[int]], AsyncIterator[tuple[int, dict[str, Any]]]]:
        """Make the prompts (`prepare`: with the tokenizer of the version last seen serving) and send
        each to the engine. Returns the tokenizer of the version that admitted them, the prompts, and
        the stream of (prompt index, chunk), its first already awaited so that admission errors raise
        APIError before any response starts. A replica whose version tokenizes differently sends the
        request back (when `tokenized`: text, not token ids, came in): made again for that version."""
        tok = self.tokenizers.current
        for _ in range(MAX_TOKENIZER_SWITCHES):
            prompts = await prepare(tok)
            fingerprint = tok.fingerprint if tokenized else None
            base = new_id("req")
            gens = [
                # vLLM's priority (lower first) as the engine's (higher first)
                self._engine_stream(f"{base}-{i}", ids, params, model, -priority, fingerprint)
                for i, ids in enumerate(prompts)
            ]
            merged = merge_streams(gens)
            try:
                first = await merged.__anext__()
            except RayError as exc:
                await merged.aclose()
                raise engine_error(exc) from exc
            chunk = first[1]
            if "error" in chunk:
                await merged.aclose()
                if chunk.get("tokenizer_changed"):
                    tok = await self._tokenizer_of(chunk["model_version"])
                    continue
                _raise_if_error(chunk)
            note_model_version(chunk)
            return await self._tokenizer_of(chunk.get("model_version")), prompts, prepend(first, merged)
        raise APIError(503, "the served model version kept changing while this request was sent; retry it")

    async def _timed(
        self, stream: AsyncIterator[tuple[int, dict[str, Any]]], counter: UsageCounter, start: float
    ):
        """Pass chunks through, recording TTFT, inter-token latency and token counts."""
        last = None
        try:
            async for i, chunk in stream:
                if "error" in chunk:
                    note_error_status(chunk["error"]["status"])  # a stream's error event: counted so
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
            error = engine_error(exc)
            note_error_status(error.status)
            yield 0, error.chunk()
            return
        self.metrics.e2e.observe(time.perf_counter() - start)
        self.metrics.prompt_tokens.inc(sum(counter.prompt_tokens.values()))
        self.metrics.generation_tokens.inc(counter.completion_tokens)

    # ---- routes ----------------------------------------------------------------------------------
    @app.get("/metrics")
    async def metrics(self) -> Response:
        if not self.spec.enable_metrics:
            raise APIError(404, "metrics are disabled (enable_metrics: false)")
        stats = await self.admin.engine_stats.remote()  # every live engine replica's, from its last sync
        return Response(self.metrics.render(stats), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        """The base model and its adapters by name (never where they are on disk)."""
        info = await self._model_info()
        created = now()
        cards = [
            ModelCard(
                id=info["base_model"],
                created=created,
                version=info["version"],
                max_model_len=info["max_model_len"],
            )
        ]
        for name in info["adapters"]:
            cards.append(
                ModelCard(
                    id=name, created=created, parent=info["base_model"], max_model_len=info["max_model_len"]
                )
            )
        return ModelList(data=cards)

    @app.post("/v1/admin/adapters", status_code=201)
    async def add_adapter(self, body: AdapterRequest) -> dict[str, Any]:
        progress = await change_everywhere(self.admin, "add_adapter", body.name, body.path)
        if progress["errors"]:  # the path is no adapter (every replica says why): take it back
            await change_everywhere(self.admin, "remove_adapter", body.name)
            raise APIError(400, progress["errors"][0], "path")
        return {"id": body.name, "object": "model", "root": body.path, "num_replicas": progress["num_live"]}

    @app.delete("/v1/admin/adapters/{name}")
    async def remove_adapter(self, name: str) -> dict[str, Any]:
        progress = await change_everywhere(self.admin, "remove_adapter", name)
        return {"id": name, "object": "model", "deleted": True, "num_replicas": progress["num_live"]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        start = time.perf_counter()
        self._check_priority(body.priority, request)
        structured = await self._in_tokenizer_thread(output_constraint, body, None)  # compiles a grammar
        max_tokens = 1 if body.echo_only else body.max_tokens  # the engine samples at least one
        params = self._params(body, max_tokens, body.logprobs, structured, body.engine_prompt_logprobs)

        async def prepare(tok: VersionTokenizer) -> list[list[int]]:
            prompts = [await self._prompt_token_ids(tok, p, i) for i, p in enumerate(body.prompts())]
            await self._check_lengths(prompts, body.max_tokens, "max_tokens")
            return prompts

        tokenized = any(isinstance(p, str) for p in body.prompts())
        tok, prompts, admitted = await self._start(prepare, tokenized, params, body.model, body.priority)
        echo = [""] * len(prompts)
        if body.echo:
            echo = await self._in_tokenizer_thread(tok.tokenizer.batch_decode, prompts)
        counter = UsageCounter()
        stream = self._timed(without_generation(admitted) if body.echo_only else admitted, counter, start)
        rid, created = new_id("cmpl"), now()
        if body.stream:
            head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
            echoed = list(zip(echo, prompts, strict=True)) if body.echo else None
            choices_of = CompletionChunkChoices(body.n, echoed, body.logprobs, tok.token_text)
            return self._sse_response(stream, head, choices_of, counter, body)
        acc = ChoiceAccumulator(body.n)
        async for i, chunk in stream:
            _raise_if_error(chunk)
            acc.add(i, chunk)
        choices = []
        for index, c in acc.ordered():
            p = index // body.n
            lps = None
            if body.logprobs is not None:
                lps = completion_logprobs(
                    c.token_ids, c.logprobs, body.logprobs, tok.token_text, len(echo[p])
                )
                if body.echo:
                    prompt_lps = echo_logprobs(
                        prompts[p], acc.prompt_logprobs[p], body.logprobs, tok.token_text
                    )
                    lps = joined(prompt_lps, lps)
            choices.append(
                CompletionChoice(
                    index=index,
                    text=echo[p] + "".join(c.text),
                    logprobs=lps,
                    finish_reason=c.finish_reason,
                    prompt_logprobs=vllm_prompt_logprobs(acc.prompt_logprobs[p], tok.token_text)
                    if body.prompt_logprobs is not None
                    else None,
                )
            )
        return JSONResponse(
            CompletionResponse(
                id=rid, created=created, model=body.model, choices=choices, usage=counter.usage()
            ).model_dump()
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        start = time.perf_counter()
        self._check_priority(body.priority, request)
        from clusterft.data import render_prompt

        max_tokens = body.max_completion_tokens or body.max_tokens
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        k = body.top_logprobs or 0
        tool_format = chat_tool_format(body, self.spec.chat_template, self.tokenizers.current.tokenizer)
        structured = await self._in_tokenizer_thread(output_constraint, body, tool_format)
        params = self._params(
            body, max_tokens, k if body.logprobs else None, structured, body.prompt_logprobs
        )
        messages = template_messages(body.messages)
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []] or None
        reply_format = tool_format if uses_tools(body) else None
        num_chars = sum(len(m["content"]) for m in messages) + len(str(tools or ""))

        def render_and_encode(tok: VersionTokenizer) -> list[int]:
            try:
                if tool_format is None:
                    text = render_prompt(messages, self.spec.chat_template, tok.tokenizer)
                else:  # the model's own template renders the tools and the tool turns
                    text = tok.tokenizer.apply_chat_template(
                        messages, tools=tools, tokenize=False, add_generation_prompt=True
                    )
            except Exception as exc:
                raise APIError(400, f"messages: cannot apply the chat template: {exc}", "messages") from exc
            return tok.encode(text)

        async def prepare(tok: VersionTokenizer) -> list[list[int]]:
            tok.check_text_fits(num_chars, await self._max_len(), "messages")
            prompts = [await self._in_tokenizer_thread(render_and_encode, tok)]
            await self._check_lengths(prompts, max_tokens, field)
            return prompts

        tok, _, admitted = await self._start(prepare, True, params, body.model, body.priority)
        counter = UsageCounter()
        stream = self._timed(admitted, counter, start)
        rid, created = new_id("chatcmpl"), now()
        if body.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}
            choices_of = ChatChunkChoices(k if body.logprobs else None, tok.token_text, reply_format)
            return self._sse_response(stream, head, choices_of, counter, body)
        acc = ChoiceAccumulator(body.n)
        async for i, chunk in stream:
            _raise_if_error(chunk)
            acc.add(i, chunk)
        choices = []
        for index, c in acc.ordered():
            message, finish_reason = assistant_reply("".join(c.text), c.finish_reason, reply_format)
            choices.append(
                ChatChoice(
                    index=index,
                    message=message,
                    logprobs=chat_logprobs(c.token_ids, c.logprobs, k, tok.token_text)
                    if body.logprobs
                    else None,
                    finish_reason=finish_reason,
                )
            )
        return JSONResponse(
            ChatCompletionResponse(
                id=rid,
                created=created,
                model=body.model,
                choices=choices,
                usage=counter.usage(),
                prompt_logprobs=vllm_prompt_logprobs(acc.prompt_logprobs[0], tok.token_text)
                if body.prompt_logprobs is not None
                else None,
            ).model_dump()
        )

    @app.post("/v1/messages")
    async def messages(self, request: Request) -> Response:
        """Anthropic's Messages API, served by the chat route; errors in Anthropic's shape."""
        try:
            body = anthropic.parse_request(await request.body())
            return anthropic.anthropic_response(
                await self.chat_completions(body.to_chat(), request), body.model
            )
        except APIError as error:
            return anthropic.error_response(error)

    def _sse_response(self, stream, head, choices_of, counter: UsageCounter, body) -> StreamingResponse:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = sse_events(stream, head, choices_of, counter, include_usage)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )


@serve.deployment(name="ingress", max_ongoing_requests=1024)
@serve.ingress(app)
class OpenAIIngress(OpenAIRoutes):
    """The separate ingress: HTTP proxy -> this replica -> an engine replica through its handle."""
