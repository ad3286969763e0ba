"""The skeleton every per-SAE evaluation stage shares, written once.

Find the job; if its record is current, return it; check the stage it needs; time the work;
complete and write the record (:func:`saelib.stages.records.finish_block`). A stage module supplies
only what differs: its record class, its settings, what it needs, and its ``compute``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from ..models import LoadedModel, load_model
from ..profiles import ModelEntry, Profile
from ..results import Timer
from .layout import SAEJob, resolve_job
from .records import BlockRecord, block_is_current, finish_block, read_block

B = TypeVar("B", bound=BlockRecord)

_LAST_MODEL: dict[tuple[str, str], LoadedModel] = {}


def stage_model(entry: ModelEntry, device: str) -> LoadedModel:
    """The model a per-SAE stage evaluates with: loaded once per process and kept until another
    model is asked for (one at a time, so a paper-size model is never held twice).

    Why: on a warm kernel (:mod:`saelib.warm`) one process runs a worker's whole series of
    notebooks; loading SmolLM2 took ~2 s of each train, steering and selection job, and the
    steering decoder's bfloat16 copy (made once per model object) was made again in every job. No
    stage changes a model's weights or leaves a hook on it (hooks are per call)."""
    key = (entry.name, str(device))
    if key not in _LAST_MODEL:
        _LAST_MODEL.clear()
        _LAST_MODEL[key] = load_model(entry.name, device=device)
    return _LAST_MODEL[key]


@dataclass
class Context:
    """What ``compute`` gets: the cell of the grid, its folder, the timer and the progress flag."""

    profile: Profile
    entry: ModelEntry
    job: SAEJob
    out: Path
    timer: Timer
    progress: bool


@dataclass(frozen=True)
class BlockStage(Generic[B]):
    """A per-SAE stage that writes one block of ``result.json``.

    ``needs``: the stage whose outputs it reads (``"train"``, ``"interp"``…, or a function of the
    profile naming it) and ``needs_done`` its done check (every chain of them starts at the train
    stage's); ``compute(ctx)`` returns the record's own fields and the seed it used."""

    record: type[B]
    settings: Callable[[Profile], dict[str, Any]]
    needs: str | Callable[[Profile], str]
    needs_done: Callable[[Profile, SAEJob], bool]
    compute: Callable[[Context], tuple[dict[str, Any], int]]

    def done(self, profile: Profile, job: SAEJob) -> bool:
        """What this stage reads is current (``needs_done``, which holds only for a trained SAE),
        and its block was computed from the SAE as saved now with the profile's settings."""
        return (self.needs_done(profile, job)
                and block_is_current(profile, job, self.record, self.settings(profile)))

    def read(self, profile: Profile, job: SAEJob) -> B | None:
        return read_block(profile, job, self.record)

    def run(self, profile: Profile | str, model: str, arch: str, level: int,
            progress: bool = True) -> B:
        """(Or, when done, return the recorded) block of one SAE."""
        profile, entry, job, out = resolve_job(profile, model, arch, level)
        if self.done(profile, job):
            record = self.read(profile, job)
            assert record is not None  # done() read it a moment ago
            return record
        if not self.needs_done(profile, job):
            needs = self.needs if isinstance(self.needs, str) else self.needs(profile)
            raise FileNotFoundError(f"{out}: the {needs} stage has not run for this SAE; run "
                                    f"the {needs} stage for {entry.name} {arch} level {level} first")
        timer = Timer()
        body, seed = self.compute(Context(profile, entry, job, out, timer, progress))
        return finish_block(profile, job, self.record, body, self.settings(profile), seed,
                            timer.timings)
