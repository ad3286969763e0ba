"""The judge interface shared by AutoInterp (protocol §3) and AxBench steering (protocol §4).

The paper's two scores both come from an LLM judge (gpt-4o-mini). One interface serves every
back-end (OpenAI-compatible server, local Hugging Face chat model, offline rules), so the stages
never know which judge they talk to.

Rating rules (AxBench): each rating is an integer in {0, 1, 2}; anything unparsable or out of range
counts 0. The harmonic mean HM is computed by the steering stage, not by the judge.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class MarkedWindow:
    """A 21-token window of text as the explainer sees it (protocol §3).

    ``tokens`` are decoded token strings; ``acts`` the latent's activation at each token.
    ``marked[i]`` is True where acts[i] > 0.01 × the latent's max activation (the explainer's
    highlight); detection windows are shown with no marks.
    """

    tokens: tuple[str, ...]
    acts: tuple[float, ...] = ()
    marked: tuple[bool, ...] = ()

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass(frozen=True)
class RatingItem:
    """One steered generation to rate (AxBench): the concept text, the instruction, the output."""

    concept: str
    instruction: str
    output: str


@dataclass(frozen=True)
class Ratings:
    """AxBench's three ratings, each in {0, 1, 2} (0 also for unparsable / out-of-range)."""

    concept: int
    instruction: int
    fluency: int


@dataclass
class JudgeUsage:
    """Token counts and cost, recorded per SAE in its result JSON."""

    requests: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    extra: dict = field(default_factory=dict)


class Judge(ABC):
    """A judge for both stages. Subclasses: OpenAI-compatible, llama.cpp, local LM, offline."""

    name: str = "judge"

    def __init__(self) -> None:
        self.usage = JudgeUsage()

    @abstractmethod
    def explain(self, windows: Sequence[MarkedWindow]) -> str:
        """Write a short description of when the latent fires, from marked top/importance windows."""

    @abstractmethod
    def detect(self, explanation: str, windows: Sequence[MarkedWindow]) -> list[int]:
        """Return the indices of the (unmarked, shuffled) windows predicted to contain the latent."""

    @abstractmethod
    def rate(self, items: Sequence[RatingItem]) -> list[Ratings]:
        """Rate steered generations on concept, instruction relevance and fluency (0–2 each)."""

    def explain_many(self, batches: Sequence[Sequence[MarkedWindow]]) -> list[str]:
        """``explain`` for many latents; API back-ends override it to send requests concurrently."""
        return [self.explain(windows) for windows in batches]

    def detect_many(self, cases: Sequence[tuple[str, Sequence[MarkedWindow]]]) -> list[list[int]]:
        """``detect`` for many (explanation, windows) cases; API back-ends run them concurrently."""
        return [self.detect(explanation, windows) for explanation, windows in cases]

    def calibrate(self, unsteered: Sequence[RatingItem]) -> None:
        """Optional: see the unsteered model's outputs first (the offline judge calibrates on them)."""

    def calibration_state(self) -> dict | None:
        """What :meth:`calibrate` learned, JSON-able, so one calibration serves every SAE of a
        model (:func:`saelib.steering.run.judge_calibration`); None when the judge has none."""
        return None

    def load_calibration(self, state: dict | None) -> None:
        """Take a state written by :meth:`calibration_state` (ignored by judges without one)."""
