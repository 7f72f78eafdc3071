"""The ingress's tokenizers: one per model version that its engine replicas serve.

A registered version may come with a tokenizer of its own (added special tokens, another chat
template), and the engine replica picks the version when it admits a request, after the ingress has
tokenized it. So the ingress tokenizes for the version it last saw serving and names that tokenizer
(its fingerprint) with the request; an engine replica now serving a version with another tokenizer
sends the request back naming its version, and the ingress tokenizes it again for that one:

    ingress: ids = current.encode(text) ──generate(ids, fingerprint)──► engine replica
                 ▲                                                        │ fingerprint differs
                 └── current = tokenizer of <version> ◄── tokenizer_changed(version)

Decoding for the response (echo, logprobs) uses the tokenizer of the version that served it.
Versions sharing their tokenizer files (most fine-tunes) never send a request back.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from clusterft.http import APIError
from clusterft.serve.model_source import resolve, resolve_version, tokenizer_fingerprint
from clusterft.serve.responses import TokenText
from clusterft.serve.spec import ServeSpec

MAX_CACHED_VERSIONS = 4  # a rollout has two; a rollback needs the one before


@dataclass(frozen=True)
class VersionTokenizer:
    """One version's tokenizer and what the ingress checks requests against."""

    version: str | None  # None: a fixed model_dir
    tokenizer: Any
    fingerprint: str  # tokenizer_fingerprint of the version's model dir
    vocab_size: int
    max_token_chars: int  # a token stands for at most this many characters of text
    token_text: TokenText

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_text_fits(self, num_chars: int, max_len: int, field: str) -> None:
        """The 400 for text too long for a context of `max_len` tokens whatever it tokenizes to (checked
        before tokenizing it)."""
        if num_chars > max_len * self.max_token_chars:
            raise APIError(
                400,
                f"{field} has {num_chars} characters: more than this model's context of {max_len} tokens "
                f"can hold ({max_len * self.max_token_chars}, a token being at most {self.max_token_chars} "
                "characters). Shorten it.",
                field,
            )

    def check_token_ids(self, token_ids: list[int], index: int) -> None:
        """The 400 for a token-id prompt (number `index`) with ids outside the vocab."""
        if max(token_ids) >= self.vocab_size:
            raise APIError(
                400,
                f"token ids must be in [0, {self.vocab_size}) (the model's vocab), got {max(token_ids)} in "
                f"prompt {index}",
                "prompt",
            )


def load_version_tokenizer(version: str | None, model_dir: str) -> VersionTokenizer:
    from clusterft.hf.loading import load_tokenizer, model_config

    tokenizer = load_tokenizer(model_dir)
    return VersionTokenizer(
        version=version,
        tokenizer=tokenizer,
        fingerprint=tokenizer_fingerprint(model_dir),
        vocab_size=model_config(model_dir).get("vocab_size") or len(tokenizer),
        # byte-level BPE: bytes; a text longer than max_model_len times this can never fit
        max_token_chars=max(map(len, tokenizer.get_vocab())),
        token_text=TokenText(tokenizer),
    )


class Tokenizers:
    """The tokenizers of the versions seen serving, newest `MAX_CACHED_VERSIONS`; `current` is the one
    requests are tokenized for. `get` loads (slow): call it on the ingress's tokenizer thread only."""

    def __init__(self, spec: ServeSpec) -> None:
        self.spec = spec
        model = resolve(spec)
        self.current = load_version_tokenizer(model.version, model.model_dir)
        self._cache: OrderedDict[str | None, VersionTokenizer] = OrderedDict({model.version: self.current})

    def get(self, version: str | None) -> VersionTokenizer:
        """The tokenizer of `version`, loaded from the registry the first time."""
        found = self._cache.get(version)
        if found is None:
            registry = self.spec.registry
            model = resolve_version(registry, version) if registry and version else resolve(self.spec)
            found = self._cache[version] = load_version_tokenizer(version, model.model_dir)
            while len(self._cache) > MAX_CACHED_VERSIONS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(version)
        return found
