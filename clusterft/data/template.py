"""Chat templates: how a conversation becomes text, split into (prompt, response) per assistant turn.

The named templates follow LLaMA-Factory's (`default`, `alpaca`, `chatml`, `qwen`, `llama3`);
`tokenizer` uses the model's own `chat_template`. A conversation renders as

    prefix system  user_1 [assistant_1] separator user_2 [assistant_2] ...
    |<------ prompt_1 ------>|<-response_1->|<---- prompt_2 ---->|<-response_2->|

and only the responses are trained on. A response ends with the end-of-turn token (`<|im_end|>`,
`<|eot_id|>`, or the tokenizer's eos): the model must learn to emit it, since that is where
generation stops. Unlike LLaMA-Factory, the newline chatml writes after `<|im_end|>` belongs to the
next prompt (`separator`), not to the response: the model never generates it, so it is not trained.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from clusterft.data.errors import DatasetError
from clusterft.data.example import Message

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Turn = tuple[str, str]
"""(prompt text, response text) of one assistant turn."""


class ChatTemplate(Protocol):
    name: str

    @property
    def stop_words(self) -> tuple[str, ...]:
        """Strings that end an assistant turn: generation stops at the first one."""
        ...

    def turns(self, messages: list[Message]) -> list[Turn]:
        """The (prompt, response) texts of each assistant turn; concatenated, the whole conversation."""
        ...

    def generation_prompt(self, messages: list[Message]) -> str:
        """The text a model continues to answer the conversation `messages` (ending with a user turn)."""
        ...


def _fill(slot: str, content: str, eos_token: str) -> str:
    # str.replace, not str.format: message content may contain braces.
    return slot.replace("{eos}", eos_token).replace("{content}", content)


def _split_system(messages: list[Message]) -> tuple[str, list[Message]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return "", messages


@dataclass(frozen=True)
class FormatTemplate:
    """A template written as slots; `{content}` is the message text, `{eos}` the tokenizer's eos token."""

    name: str
    user: str
    assistant: str
    system: str
    tool: str
    separator: str = ""
    prefix: str = ""
    default_system: str = ""
    end_of_turn: str = "{eos}"
    eos_token: str = ""

    def bind(self, tokenizer: PreTrainedTokenizerBase) -> FormatTemplate:
        """This template with `{eos}` resolved to `tokenizer`'s eos token."""
        if self.eos_token == "" and "{eos}" in self.user + self.assistant + self.system + self.end_of_turn:
            if tokenizer.eos_token is None:
                raise DatasetError(f"template {self.name!r} needs an eos token; the tokenizer has none")
            return replace(self, eos_token=tokenizer.eos_token)
        return self

    @property
    def stop_words(self) -> tuple[str, ...]:
        return (_fill(self.end_of_turn, "", self.eos_token),)

    def _render(self, messages: list[Message]) -> tuple[list[Turn], str]:
        """Turns, and the prompt text left after the last assistant turn (empty if it ends the list)."""
        system, rest = _split_system(messages)
        system = system or self.default_system
        prompt = self.prefix + (_fill(self.system, system, self.eos_token) if system else "")
        turns: list[Turn] = []
        for message in rest:
            if message["role"] == "assistant":
                turns.append((prompt, _fill(self.assistant, message["content"], self.eos_token)))
                prompt = self.separator
            else:
                slot = self.tool if message["role"] == "tool" else self.user
                prompt += _fill(slot, message["content"], self.eos_token)
        return turns, prompt if rest and rest[-1]["role"] != "assistant" else ""

    def turns(self, messages: list[Message]) -> list[Turn]:
        return self._render(messages)[0]

    def generation_prompt(self, messages: list[Message]) -> str:
        turns, prompt = self._render(messages)
        return "".join(p + r for p, r in turns) + prompt


_CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
_LLAMA3_ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"

NAMED_TEMPLATES: dict[str, FormatTemplate] = {
    t.name: t
    for t in (
        FormatTemplate(
            name="default",
            user="Human: {content}{eos}\nAssistant:",
            assistant="{content}{eos}",
            system="System: {content}{eos}\n",
            tool="Human: {content}{eos}\nAssistant:",
            separator="\n",
        ),
        FormatTemplate(
            name="alpaca",
            user="### Instruction:\n{content}\n\n### Response:\n",
            assistant="{content}{eos}",
            system="{content}",
            tool="### Instruction:\n{content}\n\n### Response:\n",
            separator="\n\n",
            default_system=(
                "Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.\n\n"
            ),
        ),
        FormatTemplate(
            name="chatml",
            user=_CHATML_USER,
            assistant="{content}<|im_end|>",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            tool="<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n",
            separator="\n",
            end_of_turn="<|im_end|>",
        ),
        FormatTemplate(
            name="qwen",
            user=_CHATML_USER,
            assistant="{content}<|im_end|>",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            tool=(
                "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n"
                "<|im_start|>assistant\n"
            ),
            separator="\n",
            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            end_of_turn="<|im_end|>",
        ),
        FormatTemplate(
            name="llama3",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>" + _LLAMA3_ASSISTANT_HEADER,
            assistant="{content}<|eot_id|>",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
            + _LLAMA3_ASSISTANT_HEADER,
            prefix="<|begin_of_text|>",
            end_of_turn="<|eot_id|>",
        ),
    )
}


class TokenizerTemplate:
    """The tokenizer's own `chat_template`, split into turns by rendering growing prefixes.

    The prompt of assistant turn i is render(messages[:i], add_generation_prompt=True); its response
    is what render(messages[:i+1]) adds to that, cut after the eos token (text after it, such as
    chatml's newline, is left to the next prompt). Templates that rewrite earlier turns when later
    ones are added (not prefix-stable) are refused: their turns cannot be labelled.
    """

    name = "tokenizer"

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise DatasetError(
                "template: tokenizer, but the tokenizer has no chat_template; "
                "choose a named template (default, alpaca, chatml, qwen, llama3)"
            )
        self._tokenizer = tokenizer
        self._eos_token: str = tokenizer.eos_token or ""

    @property
    def stop_words(self) -> tuple[str, ...]:
        return (self._eos_token,) if self._eos_token else ()

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        text = self._tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert isinstance(text, str), "apply_chat_template(tokenize=False) returns text"
        return text

    def turns(self, messages: list[Message]) -> list[Turn]:
        turns: list[Turn] = []
        consumed = ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:index], add_generation_prompt=True)
            full = self._render(messages[: index + 1], add_generation_prompt=False)
            if not prompt.startswith(consumed) or not full.startswith(prompt):
                raise DatasetError(
                    "template: tokenizer: the tokenizer's chat_template is not prefix-stable (earlier "
                    "turns render differently once later ones are added), so assistant turns cannot "
                    "be located; choose a named template"
                )
            response = full[len(prompt) :]
            if self._eos_token and self._eos_token in response:
                response = response[: response.rindex(self._eos_token) + len(self._eos_token)]
            turns.append((prompt[len(consumed) :], response))
            consumed = prompt + response
        return turns

    def generation_prompt(self, messages: list[Message]) -> str:
        return self._render(messages, add_generation_prompt=True)


def get_template(name: str, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """The template `name` bound to `tokenizer` (for its eos token or its chat_template)."""
    if name == "tokenizer":
        return TokenizerTemplate(tokenizer)
    if name not in NAMED_TEMPLATES:
        choices = ", ".join([*NAMED_TEMPLATES, "tokenizer"])
        raise DatasetError(f"unknown template {name!r}; choose one of {choices}")
    return NAMED_TEMPLATES[name].bind(tokenizer)


def render_prompt(messages: list[Message], template: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt text for generating the next assistant turn of `messages` (ends with the
    assistant header, e.g. `<|im_start|>assistant\\n`). Serving and evaluation use this; training
    renders the same text for the same turns, so a trained model sees what it was trained on."""
    if not messages or messages[-1]["role"] == "assistant":
        raise ValueError("render_prompt needs messages ending with a user (or tool) turn")
    return get_template(template, tokenizer).generation_prompt(messages)
