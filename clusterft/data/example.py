"""`Example`: one conversation in the common form every dataset format is converted to."""

from __future__ import annotations

from dataclasses import dataclass

Message = dict[str, str]
"""{"role": "system" | "user" | "assistant" | "tool", "content": str}"""


@dataclass(frozen=True)
class Example:
    """A conversation ending with an assistant turn, and where it came from (for error messages)."""

    messages: list[Message]
    source_file: str
    line: int

    @property
    def location(self) -> str:
        return f"{self.source_file}:{self.line}"

    @property
    def prompt_messages(self) -> list[Message]:
        """Everything before the final assistant turn: what a model is asked at eval time."""
        return self.messages[:-1]

    @property
    def reference(self) -> str:
        """The final assistant turn: the expected answer for exact-match evaluation."""
        return self.messages[-1]["content"]
