"""OpenAI's HTTP schemas (the subset we serve), as pydantic models.

Requests forbid unknown fields so that a typo or an unsupported OpenAI feature is a 400 naming the
field, not silently ignored. `priority`, `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`stop_token_ids`, `structured_outputs` and `prompt_logprobs` are extensions (vLLM's names).

Every sampling field is checked against the engine's own bounds (SamplingParams' `_FIELD_BOUNDS`, one
table for both), so a value the engine would refuse is a 400 naming the field when the body is parsed.
The MAX_* limits below bound what one request may ask of the server; they are checked then too,
before anything is tokenized. Bounds that depend on the model (token ids and top_k below the vocab
size, the prompt's length in characters) are checked by the ingress, still before tokenizing.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from clusterft.engine.sampling_params import _FIELD_BOUNDS

MAX_PROMPTS = 128  # prompts of one /v1/completions request (each is an engine request)
MAX_STOP = 16  # stop strings (OpenAI allows 4)
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 1024  # messages of one chat request
MAX_CHOICES = 256  # structured_outputs.choice
MAX_TOOLS = 128
MAX_PRIORITY = 1000  # |priority|; only callers with the admin key may set it (see the ingress)

# SamplingParams field -> (its allowed values in words, the check)
_ENGINE_BOUNDS = {name: (allowed, ok) for name, allowed, ok in _FIELD_BOUNDS}
# HTTP field -> the SamplingParams field it becomes, where the names differ
_ENGINE_NAME = {"top_logprobs": "logprobs", "max_completion_tokens": "max_tokens"}


def _engine_field(default: Any, name: str, **constraints: Any) -> Any:
    """A request field checked against the engine's bound for `name` (see `_check_engine_bounds`);
    the allowed values, in the engine's words, document it in the OpenAPI schema."""
    return Field(default=default, description=f"{_ENGINE_BOUNDS[name][0]}.", **constraints)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # field -> the earlier boolean field with which 0 passes though the engine refuses it (the
    # request gives 0 its own meaning then)
    _zero_needs: ClassVar[dict[str, str]] = {}

    @field_validator("*")
    @classmethod
    def _check_engine_bounds(cls, value: Any, info: ValidationInfo) -> Any:
        """The engine's bound for this field (if it has one): the same ValueError SamplingParams
        raises, when the body is parsed rather than when the request reaches the engine."""
        assert info.field_name is not None
        name = _ENGINE_NAME.get(info.field_name, info.field_name)
        if name not in _ENGINE_BOUNDS or value is None or (name == "logprobs" and isinstance(value, bool)):
            return value
        allowed, ok = _ENGINE_BOUNDS[name]
        needs = cls._zero_needs.get(info.field_name)
        if needs is not None and type(value) is int and value == 0:
            if info.data.get(needs):
                return value
            raise ValueError(f"{info.field_name} must be {allowed} (0 only with {needs}=true), got 0")
        checked = (value,) if name == "stop" and isinstance(value, str) else value
        if not ok(tuple(checked) if isinstance(checked, list) else checked):
            raise ValueError(f"{info.field_name} must be {allowed}, got {value!r}")
        return value


class StreamOptions(_Request):
    include_usage: bool = False


class StructuredOutputs(_Request):
    """Extension (vLLM's `structured_outputs`): exactly one of these constrains the output."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_schema: dict[str, Any] | None = Field(default=None, alias="json", description="A JSON schema.")
    json_object: bool | None = Field(default=None, description="true: any JSON object.")
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = Field(default=None, description="A Lark grammar (llguidance's syntax).")


class _SamplingFields(_Request):
    model: str
    n: int = _engine_field(1, "n", le=64)
    best_of: int | None = _engine_field(None, "best_of", le=64)
    temperature: float = _engine_field(1.0, "temperature", le=2.0)
    top_p: float = _engine_field(1.0, "top_p")
    top_k: int = _engine_field(0, "top_k")
    min_p: float = _engine_field(0.0, "min_p")
    presence_penalty: float = _engine_field(0.0, "presence_penalty")
    frequency_penalty: float = _engine_field(0.0, "frequency_penalty")
    repetition_penalty: float = _engine_field(1.0, "repetition_penalty")
    seed: int | None = _engine_field(None, "seed")
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = _engine_field(None, "stop")
    stop_token_ids: list[int] | None = _engine_field(None, "stop_token_ids", max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    use_beam_search: bool = Field(
        default=False,
        description="Extension (vLLM's): beam search of width best_of (or n), returning the n best "
        "beams; deterministic, so temperature must be 0 (the default when beam search is on).",
    )
    length_penalty: float = _engine_field(1.0, "length_penalty")
    early_stopping: bool | Literal["never"] = _engine_field(False, "early_stopping")
    structured_outputs: StructuredOutputs | None = None
    prompt_logprobs: int | None = _engine_field(None, "prompt_logprobs", le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: int = Field(
        default=0,
        ge=-MAX_PRIORITY,
        le=MAX_PRIORITY,
        description="Extension (vLLM's): lower runs first when the engine is busy (-1 before 0); "
        "only with the admin key.",
    )

    @model_validator(mode="after")
    def _prompt_logprobs_not_streamed(self) -> _SamplingFields:
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError(
                "prompt_logprobs: not available with stream=true (as in vLLM); drop one, or for "
                "completions use echo=true with logprobs, which streams"
            )
        return self


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description=f"Text, texts, token ids or lists of token ids (at most {MAX_PROMPTS} prompts); "
        "token ids in [0, vocab size)."
    )
    _zero_needs: ClassVar[dict[str, str]] = {"max_tokens": "echo"}

    echo: bool = False  # before max_tokens: max_tokens 0 needs it (validated in field order)
    max_tokens: int | None = _engine_field(16, "max_tokens")
    logprobs: int | None = _engine_field(None, "logprobs", le=20)

    @model_validator(mode="after")
    def _echo_scoring(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None and self.use_beam_search:
            raise ValueError(
                "echo with logprobs scores the prompt, which beam search does not support; drop "
                "use_beam_search, echo or logprobs"
            )
        return self

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt scored, nothing generated (lm-eval-harness's loglikelihood)."""
        return self.echo and self.max_tokens == 0

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """The top-k the engine scores the prompt with: prompt_logprobs's, or echo's logprobs'."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted, default=None)

    @field_validator("prompt")
    @classmethod
    def _some_prompts(cls, value: str | list[str] | list[int] | list[list[int]]) -> Any:
        if isinstance(value, str):
            return value
        if not value:
            raise ValueError("give a prompt: a string, a list of strings, token ids or lists of token ids")
        prompts = [value] if isinstance(value[0], int) else value
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}: send several")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty: give at least one token")
            if not isinstance(prompt, str) and min(prompt) < 0:
                raise ValueError(f"token ids must be >= 0, got {min(prompt)} in prompt {i}")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s), one entry per engine request: text or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text


class ToolCallMessage(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call they answer

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(_Request):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format: json_schema is required with type json_schema, and only then")
        return self


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = _engine_field(None, "max_tokens")
    max_completion_tokens: int | None = _engine_field(None, "max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = _engine_field(None, "logprobs", le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice: no tool named {self.tool_choice.function.name!r} in tools "
                    f"({', '.join(names) or 'none given'}); name one of them"
                )
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice: required needs tools; give tools or drop tool_choice")
        return self


class AdapterRequest(_Request):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's entry of `prompt_logprobs`, keyed by token id."""

    logprob: float
    rank: int
    decoded_token: str


PromptLogprobsList = list[dict[int, PromptLogprob] | None]  # first None: the first token has no prefix


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobsList | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobsList | None = None  # vLLM's: one prompt, so one list per response


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # each with its index among the choice's calls


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "clusterft"
    parent: str | None = None
    max_model_len: int | None = None
    version: str | None = None  # the registry version a followed alias points at (clusterft extension)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
