"""Answer probabilities.

A multiple-choice answer is a letter; the model may emit it with or without a leading space, so an answer's
candidates are the first sub-token of `word` and of `" " + word` (the official `max_prob_for_word`). Two modes:

- teacher-forced (default): the softmax of the logits at the answer position, i.e. the next-token distribution
  after the prompt, max over the candidates. One forward pass.
- official: greedy generation; the max over every generated step of the softmax of the raw logits (before any
  logits processing), max over the candidates. Costs a generation and depends on what the model says first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

ScoreMode = Literal["teacher_forced", "official"]
SCORE_MODES: tuple[str, ...] = ("teacher_forced", "official")
#: the official scripts generate up to this many tokens when scoring
OFFICIAL_MAX_NEW_TOKENS = 1024


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class AnswerCandidates:
    """The token ids that count as emitting `word` (its first sub-token, with and without a leading space)."""

    word: str
    ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, word: str) -> "AnswerCandidates":
        ids: list[int] = []
        for text in (word, " " + word):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if not encoded:
                raise ValueError(f"the tokenizer encodes {text!r} to no tokens")
            if encoded[0] not in ids:
                ids.append(int(encoded[0]))
        return cls(word, tuple(ids))


def answer_position_logits(
    logits: Float[Tensor, "batch pos vocab"], attention_mask: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch vocab"]:
    """Logits at each row's last valid position (works for left and right padding)."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (pos * attention_mask.bool()).amax(dim=1)
    return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]


def candidate_prob(
    logits: Float[Tensor, "... vocab"], candidates: AnswerCandidates | Sequence[AnswerCandidates]
) -> Float[Tensor, "..."]:
    """max over candidate ids of softmax(logits). A sequence gives one candidate set per batch row."""
    probs = torch.softmax(logits.float(), dim=-1)
    if isinstance(candidates, AnswerCandidates):
        return probs[..., list(candidates.ids)].amax(dim=-1)
    if len(candidates) != probs.shape[0]:
        raise ValueError(f"{len(candidates)} candidate sets for a batch of {probs.shape[0]}")
    return torch.stack([probs[i, ..., list(c.ids)].amax(dim=-1) for i, c in enumerate(candidates)])


def teacher_forced_probs(
    logits: Float[Tensor, "batch pos vocab"],
    attention_mask: Int[Tensor, "batch pos"],
    answers: Mapping[str, AnswerCandidates | Sequence[AnswerCandidates]],
) -> dict[str, Float[Tensor, " batch"]]:
    """P(answer) at the answer position for each named answer (e.g. {"clean": ..., "corrupt": ...})."""
    final = answer_position_logits(logits, attention_mask)
    return {name: candidate_prob(final, c) for name, c in answers.items()}


def official_probs(
    step_logits: Float[Tensor, "steps batch vocab"],
    answers: Mapping[str, AnswerCandidates | Sequence[AnswerCandidates]],
    n_steps: Int[Tensor, " batch"] | None = None,
) -> dict[str, Float[Tensor, " batch"]]:
    """Official mode: max over generated steps (only each row's own steps, `n_steps`) of P(answer)."""
    out = {}
    for name, c in answers.items():
        per_step = torch.stack([candidate_prob(step_logits[s], c) for s in range(step_logits.shape[0])])
        if n_steps is not None:
            steps = torch.arange(step_logits.shape[0], device=per_step.device)[:, None]
            per_step = per_step.masked_fill(steps >= n_steps.to(per_step.device)[None], float("-inf"))
        out[name] = per_step.amax(dim=0)
    return out


def score(
    model: Any,
    inputs: Any,
    answers: Mapping[str, AnswerCandidates | Sequence[AnswerCandidates]],
    mode: ScoreMode = "teacher_forced",
    max_new_tokens: int = OFFICIAL_MAX_NEW_TOKENS,
    eos_token_id: int | Sequence[int] | None = None,
) -> dict[str, Float[Tensor, " batch"]]:
    """Probabilities of the named answers under `model` on `inputs` (an AVInputs or processor outputs dict).

    Hooks attached to the model (e.g. a patching context) are active, in both modes.
    """
    from hooked_av.model import AVInputs

    av = inputs if isinstance(inputs, AVInputs) else model.prepare_inputs(**inputs)
    if mode == "teacher_forced":
        with torch.no_grad():
            final = model(av, return_type="last_logits")
        return {name: candidate_prob(final, c) for name, c in answers.items()}
    if mode == "official":
        gen = model.generate(av, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
        return official_probs(gen.logits, answers, n_steps=gen.n_steps)
    raise ValueError(f"score mode must be one of {SCORE_MODES}, got {mode!r}")


def predict_choice(
    logits: Float[Tensor, "batch pos vocab"],
    attention_mask: Int[Tensor, "batch pos"],
    choices: Mapping[str, AnswerCandidates],
) -> list[str]:
    """The most probable choice (by teacher-forced candidate probability) for each row."""
    final = answer_position_logits(logits, attention_mask)
    names = list(choices)
    table = torch.stack([candidate_prob(final, choices[n]) for n in names], dim=-1)
    return [names[i] for i in table.argmax(dim=-1).tolist()]
