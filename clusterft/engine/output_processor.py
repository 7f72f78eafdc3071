"""OutputProcessor: sequences' new tokens -> RequestOutputs; detokenizes and applies stop strings.

A stop string ends the sequence (the scheduler is told to free it) and is cut from the text; while a
sequence runs, the last `len(longest stop) - 1` characters are held back so that a stop string
arriving over several tokens is never streamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clusterft.engine.detokenizer import IncrementalDetokenizer
from clusterft.engine.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from clusterft.engine.prompt_logprobs import PromptTokenLogprob
from clusterft.engine.request import Request, RequestStatus
from clusterft.engine.sampling_params import SamplingParams


@dataclass
class SequenceState:
    detokenizer: IncrementalDetokenizer
    num_processed: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: dict[int, SequenceState] = field(default_factory=dict)
    num_cached_tokens: int = 0
    finish_message: str | None = None
    beam_results: list[CompletionOutput] | None = None
    prompt_logprobs: PromptLogprobs | None = None


def prompt_logprobs_output(token_ids: list[int], entries: list[PromptTokenLogprob | None]) -> PromptLogprobs:
    """vLLM's shape: per prompt token, None for the first, else the token's Logprob then the top-k."""
    out: PromptLogprobs = [None]
    for token_id, entry in zip(token_ids[1:], entries[1:], strict=True):
        assert entry is not None
        ranked = {token_id: Logprob(entry.logprob, entry.rank)}
        for rank, (top_id, logprob) in enumerate(entry.top, start=1):
            ranked.setdefault(top_id, Logprob(logprob, rank))
        out.append(ranked)
    return out


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(self, state: RequestState) -> None:
        self.states[state.request_id] = state

    def process(self, updated: list[Request]) -> tuple[set[str], list[str]]:
        """Detokenize updated sequences; returns (touched root ids, sequence ids stopped by a stop string)."""
        touched, stopped = set(), []
        for request in updated:
            root = request.parent_id or request.request_id
            state = self.states.get(root)
            if state is None:
                continue
            touched.add(root)
            params = state.params
            seq = state.sequences.get(request.index)
            if seq is None:
                seq = state.sequences[request.index] = SequenceState(
                    IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
                )
            new_ids = request.output_token_ids[seq.num_processed :]
            seq.num_processed = len(request.output_token_ids)
            seq.token_ids = list(request.output_token_ids)
            seq.cumulative_logprob = request.cumulative_logprob
            seq.logprobs = list(request.logprobs) if params.logprobs is not None else None
            state.num_cached_tokens = max(request.num_cached_tokens, 0)
            if params.prompt_logprobs is not None and state.prompt_logprobs is None:
                assert request.has_prompt_logprobs, "a prompt is computed before its first output token"
                state.prompt_logprobs = prompt_logprobs_output(
                    state.prompt_token_ids, request.prompt_logprobs
                )
            if request.is_finished:
                seq.finish_reason, seq.stop_reason = request.status.finish_reason, request.stop_reason
                state.finish_message = state.finish_message or request.finish_message
            if params.detokenize:
                old_len = len(seq.detokenizer.output_text)
                seq.detokenizer.add_tokens(new_ids)
                if request.is_finished:
                    seq.detokenizer.flush()
                if params.stop and self._apply_stop_strings(seq, params, old_len) and not request.is_finished:
                    stopped.append(request.request_id)
        return touched, stopped

    @staticmethod
    def _apply_stop_strings(seq: SequenceState, params: SamplingParams, old_len: int) -> bool:
        text = seq.detokenizer.output_text
        for stop in params.stop:
            idx = text.find(stop, max(0, old_len - len(stop) + 1))
            if idx >= 0:
                seq.detokenizer.output_text = text[:idx]
                seq.finish_reason, seq.stop_reason = "stop", stop
                return True
        return False

    def finish_ignored(self, request: Request) -> None:
        state = self.states[request.parent_id or request.request_id]
        state.finish_message = request.finish_message
        seq = state.sequences.setdefault(request.index, SequenceState(IncrementalDetokenizer(self.tokenizer)))
        seq.finish_reason = RequestStatus.FINISHED_IGNORED.finish_reason

    def finish_beams(self, root: str, best: list[tuple[list[int], float]], eos_token_ids) -> None:
        state = self.states[root]
        state.beam_results = [
            CompletionOutput(
                index=i,
                text=self.tokenizer.decode(tokens, skip_special_tokens=state.params.skip_special_tokens),
                token_ids=tokens,
                cumulative_logprob=score,
                logprobs=None,
                finish_reason="stop" if tokens and tokens[-1] in eos_token_ids else "length",
            )
            for i, (tokens, score) in enumerate(best)
        ]

    def fail(self, root: str, message: str) -> None:
        """The request was aborted by an error: every sequence ends with "abort"; `message` says why."""
        state = self.states[root]
        state.finish_message = message
        for index in range(state.params.num_sequences):
            state.sequences.setdefault(index, SequenceState(IncrementalDetokenizer(self.tokenizer)))
        self.abort(root)

    def abort(self, root: str) -> None:
        state = self.states.get(root)
        if state is not None:
            for seq in state.sequences.values():
                seq.finish_reason = seq.finish_reason or "abort"

    @staticmethod
    def _is_finished(state: RequestState) -> bool:
        sequences = state.sequences.values()
        if state.finish_message is not None or any(s.finish_reason == "abort" for s in sequences):
            return True
        return len(state.sequences) >= state.params.num_sequences and all(s.finish_reason for s in sequences)

    def make_output(self, root: str) -> RequestOutput | None:
        """The request's output now; None while a best_of / beam request is still running. A finished
        request's state is dropped."""
        state = self.states[root]
        params = state.params
        num_sequences = params.num_sequences
        if state.beam_results is not None:
            outputs, finished = state.beam_results, True
        else:
            finished = self._is_finished(state)
            if (num_sequences > params.n or params.use_beam_search) and not finished:
                return None
            holdback = max((len(s) for s in params.stop), default=1) - 1
            outputs = []
            for index in sorted(state.sequences):
                seq = state.sequences[index]
                text = seq.detokenizer.output_text
                if seq.finish_reason is None and holdback:
                    text = text[: max(0, len(text) - holdback)]
                outputs.append(
                    CompletionOutput(
                        index,
                        text,
                        seq.token_ids,
                        seq.cumulative_logprob,
                        seq.logprobs,
                        seq.finish_reason,
                        seq.stop_reason,
                    )
                )
            if num_sequences > params.n:  # best_of: the n with the best cumulative logprob
                outputs = sorted(outputs, key=lambda o: -(o.cumulative_logprob or 0.0))[: params.n]
                for i, out in enumerate(outputs):
                    out.index = i
        if finished:
            del self.states[root]
        return RequestOutput(
            request_id=root,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=state.num_cached_tokens,
            finish_message=state.finish_message,
            prompt_logprobs=state.prompt_logprobs,
        )
