"""Beam search decisions, step for step the same arithmetic as HF `generate(num_beams=k)`.

A BeamSearchGroup only decides; the scheduler owns the beams as requests. It hands over each beam's
log-softmax row as the model runner returns it (the group holds them: the scheduler holds no tensors);
once every live beam has its row, the group steps and says which (parent beam, token) pairs continue.
The scheduler then forks parents picked more than once (sharing their KV blocks, copy-on-write) and
frees parents picked by none. All scores are float32 tensors, as in HF, so ties break the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BeamStep:
    parents: list[int]  # index into the running beams, one per next running beam
    token_ids: list[int]
    done: bool


class BeamSearchGroup:
    def __init__(
        self,
        num_prompt_tokens: int,
        beam_width: int,
        max_length: int,
        eos_token_ids: frozenset[int],
        length_penalty: float,
        early_stopping: bool | str,
    ) -> None:
        self.num_beams = beam_width
        self.prompt_len = num_prompt_tokens
        self.max_length = max_length
        self.eos_token_ids = torch.tensor(sorted(eos_token_ids), dtype=torch.long)
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.beams_to_keep = max(2, 1 + len(eos_token_ids)) * beam_width
        self.top_num_beam_mask = torch.arange(self.beams_to_keep) < beam_width
        self.cur_len = num_prompt_tokens
        self.running_scores = torch.zeros(1)  # one beam (the prompt) before the first step
        self.finished_tokens: list[list[int] | None] = [None] * beam_width
        self.finished_scores = torch.full((beam_width,), -1.0e9)
        self.is_sent_finished = torch.zeros(beam_width, dtype=torch.bool)
        self.heuristic_unsatisfied = True
        self.rows: dict[str, torch.Tensor] = {}  # beam request id -> its (V,) log-softmax row this step

    def add_row(self, beam_id: str, log_probs: torch.Tensor) -> None:
        self.rows[beam_id] = log_probs

    def drop_row(self, beam_id: str) -> None:
        """Forget a finished or preempted beam's row (a recomputed beam sends it again)."""
        self.rows.pop(beam_id, None)

    def step_when_ready(self, beam_ids: list[str], beam_token_ids: list[list[int]]) -> BeamStep | None:
        """Step with the rows of `beam_ids` (the live beams, in order) once all have arrived; None while
        one is missing (its beam was preempted or not scheduled yet)."""
        if not all(beam_id in self.rows for beam_id in beam_ids):
            return None
        return self.step(torch.stack([self.rows.pop(beam_id) for beam_id in beam_ids]), beam_token_ids)

    def step(self, log_probs: torch.Tensor, beam_token_ids: list[list[int]]) -> BeamStep:
        """log_probs: (num_running, V) log-softmax rows; beam_token_ids: each beam's generated tokens."""
        num_running, vocab_size = log_probs.shape
        assert self.beams_to_keep <= num_running * vocab_size
        scores = (log_probs + self.running_scores[:, None]).reshape(-1)  # (num_running * V,)
        topk_scores, topk_indices = torch.topk(scores, k=self.beams_to_keep)
        topk_parents = topk_indices // vocab_size
        topk_tokens = topk_indices % vocab_size
        hits = torch.isin(topk_tokens, self.eos_token_ids) | (self.cur_len + 1 >= self.max_length)

        # Next running beams: the best continuations that did not just finish.
        running_scores = topk_scores + hits.to(torch.float32) * -1.0e9
        next_indices = torch.topk(running_scores, k=self.num_beams)[1]

        # Finished hypotheses: only the top `num_beams` candidates may finish, length-penalised.
        fin_scores = topk_scores / ((self.cur_len + 1 - self.prompt_len) ** self.length_penalty)
        full = bool(self.is_sent_finished.all()) and self.early_stopping is True
        fin_scores += float(full) * -1.0e9
        fin_scores += float(not self.heuristic_unsatisfied) * -1.0e9
        just_finished = hits & self.top_num_beam_mask
        fin_scores += (~just_finished) * -1.0e9
        merged_scores = torch.cat((self.finished_scores, fin_scores))
        merged_finished = torch.cat((self.is_sent_finished, just_finished))
        keep = torch.topk(merged_scores, k=self.num_beams)[1].tolist()
        candidates = [
            beam_token_ids[p] + [t] for p, t in zip(topk_parents.tolist(), topk_tokens.tolist(), strict=True)
        ]
        merged_tokens = self.finished_tokens + candidates
        self.finished_tokens = [merged_tokens[i] for i in keep]
        self.finished_scores = merged_scores[keep]
        self.is_sent_finished = merged_finished[keep]

        self.running_scores = running_scores[next_indices]
        self.cur_len += 1
        self._check_early_stop_heuristic()
        exists_open_beam = not (bool(self.is_sent_finished.all()) and self.early_stopping is True)
        done = not (self.heuristic_unsatisfied and exists_open_beam and not bool(hits.all()))
        return BeamStep(
            parents=topk_parents[next_indices].tolist(),
            token_ids=topk_tokens[next_indices].tolist(),
            done=done,
        )

    def _check_early_stop_heuristic(self) -> None:
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = self.max_length - self.prompt_len
        else:
            best_len = self.cur_len - self.prompt_len
        best_possible = self.running_scores[:1] / (best_len**self.length_penalty)
        worst_finished = torch.where(self.is_sent_finished, self.finished_scores.min(), -1.0e9)
        self.heuristic_unsatisfied = self.heuristic_unsatisfied and bool(
            (best_possible > worst_finished).any()
        )

    def best(self, n: int) -> list[tuple[list[int], float]]:
        """The n best finished hypotheses (generated tokens, length-penalised score), best first."""
        return [
            (tokens or [], float(score))
            for tokens, score in zip(self.finished_tokens[:n], self.finished_scores[:n].tolist(), strict=True)
        ]
