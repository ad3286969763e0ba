"""The stage table and its typed records: one spelling per stage, records that fail where they are
built, and a record of an older schema recomputed rather than a crash."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from saelib import book, grid, stages
from saelib.profiles import PARAMS_DIR, profile_from_dict
from saelib.stages.records import BlockRecord, StaleRecord, block_is_current, read_block
from saelib.stages.runner import BlockStage

from conftest import training_provenance

ROOT = Path(__file__).resolve().parent.parent
RECORDS = [stages.capture.CaptureRecord, stages.train.TrainRecord, stages.interp.InterpRecord,
           stages.interp.DescriptiveRecord, stages.steering.SteerRecord, stages.selection.SelectRecord,
           stages.judge.JudgeRecord]


def _profile(tmp_path):
    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["runs_dir"] = str(tmp_path)
    return profile_from_dict(data, name="smoke")


def _filled(cls):
    """An instance of ``cls`` with a distinct JSON value in every field."""
    return cls(**{f.name: {"field": f.name} for f in dataclasses.fields(cls)})


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_records_round_trip_and_refuse_what_they_cannot_read(cls):
    record = _filled(cls)
    data = record.to_json()
    assert data["schema"] == cls.SCHEMA and cls.from_json(data) == record
    assert record[dataclasses.fields(cls)[0].name] == {"field": dataclasses.fields(cls)[0].name}
    with pytest.raises(KeyError, match="fields"):
        record["no_such_field"]
    with pytest.raises(StaleRecord, match="schema"):
        cls.from_json({**data, "schema": cls.SCHEMA + 1})
    with pytest.raises(StaleRecord, match="unknown keys"):
        cls.from_json({**data, "renamed_key": 1})
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    with pytest.raises(StaleRecord, match=required[0]):
        cls.from_json({k: v for k, v in data.items() if k != required[0]})
    with pytest.raises(TypeError):  # a stage that forgets or renames a field fails where it builds one
        cls(**{f.name: None for f in dataclasses.fields(cls)[1:]}, renamed=None)


def test_a_record_without_a_schema_key_is_schema_one():
    """Records written before schemas were recorded stay readable (no run is recomputed for it)."""
    data = stages.steering.SteerRecord.from_json({k: v for k, v in _filled(stages.steering.SteerRecord)
                                               .to_json().items() if k != "schema"})
    assert stages.steering.SteerRecord.SCHEMA == 1 and data == _filled(stages.steering.SteerRecord)


def _trained_by_hand(profile):
    """An SAE folder with weights and a train record, as the train stage leaves it."""
    job = next(j for j in stages.sae_jobs(profile) if j.arch == "topk")
    out = stages.sae_dir(profile, job)
    (out / "sae").mkdir(parents=True)
    (out / "sae" / stages.layout.SAE_WEIGHTS).write_bytes(b"weights")
    (out / stages.layout.RESULT).write_text(json.dumps(
        {"train": {}, "sparsity_method": {"method": "k"}, "provenance": training_provenance(profile)}))
    assert stages.train.done(profile, job)
    return job, out


def test_the_runner_recomputes_a_block_of_an_older_schema_and_nothing_else(tmp_path, capsys):
    profile = _profile(tmp_path)
    job, out = _trained_by_hand(profile)
    calls = []

    def compute(ctx):
        calls.append(ctx.job)
        (ctx.out / stages.interp.INTERP_ROWS).write_text('{"latent": 0}\n')
        fields = [f.name for f in dataclasses.fields(stages.interp.InterpRecord)
                  if f.name not in {f.name for f in dataclasses.fields(BlockRecord)}]
        return {**{name: None for name in fields}, "mu": 0.5,
                "rows_file": stages.interp.INTERP_ROWS}, 0

    stage = BlockStage(stages.interp.InterpRecord, lambda p: {"interp": {"n": 1}}, "train",
                       stages.train.done, compute)
    first = stage.run(profile, job.model, job.arch, job.level)
    assert first.mu == 0.5 and len(calls) == 1
    assert stage.run(profile, job.model, job.arch, job.level) == first and len(calls) == 1

    result = json.loads((out / stages.layout.RESULT).read_text())
    result["interp"]["schema"] = 0  # as an older version of this block would read
    (out / stages.layout.RESULT).write_text(json.dumps(result))
    assert read_block(profile, job, stages.interp.InterpRecord) is None
    assert not block_is_current(profile, job, stages.interp.InterpRecord, {"interp": {"n": 1}})
    assert "schema 0" in capsys.readouterr().err
    again = stage.run(profile, job.model, job.arch, job.level)
    assert len(calls) == 2 and again.mu == 0.5
    stored = json.loads((out / stages.layout.RESULT).read_text())
    assert stored["interp"]["schema"] == stages.interp.InterpRecord.SCHEMA
    assert stored["train"] == {} and stored["sparsity_method"] == {"method": "k"}  # others kept
    # the typed record the analysis reads (SAEResult's interp block) reads the stored block back
    assert stages.interp.InterpRecord.from_json(stored["interp"]).mu == 0.5


def test_a_train_record_of_an_older_schema_is_trained_again(tmp_path):
    profile = _profile(tmp_path)
    job, out = _trained_by_hand(profile)
    result = json.loads((out / stages.layout.RESULT).read_text())
    (out / stages.layout.RESULT).write_text(json.dumps({**result, "schema": 0}))
    assert not stages.train.done(profile, job)


def test_a_later_stage_needs_the_stage_before_it(tmp_path):
    profile = _profile(tmp_path)
    job, _ = _trained_by_hand(profile)
    with pytest.raises(FileNotFoundError, match="run the interp stage"):
        stages.steering.run(profile, job.model, job.arch, job.level)


def test_one_spelling_per_stage(tmp_path):
    """A stage's name is its notebook, its jobs' prefix, its executed folder and its record block."""
    profile = _profile(tmp_path)
    blocks = {"interp": stages.interp.InterpRecord, "steering": stages.steering.SteerRecord,
              "selection": stages.selection.SelectRecord}
    assert {s.name for s in stages.STAGES} == {"capture", "train", "interp", "steering",
                                               "selection", "judge", "analysis", "observations"}
    notebooks = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert notebooks == {s.name for s in stages.STAGES}
    for name, cls in blocks.items():
        assert cls.BLOCK == name
    for job in grid.build_jobs(profile):
        assert job.name == job.stage or job.name.startswith(f"{job.stage}-")
        assert job.output(profile).parent.name == job.stage
        assert (ROOT / "notebooks" / stages.stage(job.stage).notebook).exists()
    for name in ("capture", "train", "interp", "steering", "selection"):
        assert getattr(stages, name).NAME == name  # and its module


def test_the_books_contents_come_from_the_stage_table():
    toc = (ROOT / "_toc.yml").read_text()
    assert toc == book.toc_text(), "run `python -m saelib.book --toc` after changing STAGES"
    for s in stages.STAGES:
        assert f"book/executed/{s.name}/" in toc


def test_the_grid_record_names_each_jobs_stage(tmp_path, monkeypatch):
    """grid.json stores every job's stage, so the cost table never parses job names."""
    profile = _profile(tmp_path)
    monkeypatch.setattr(stages.capture, "prepare", lambda p: {})

    def fake_run(profile_, job):
        job.output(profile_).parent.mkdir(parents=True, exist_ok=True)
        job.output(profile_).write_text("{}")

    monkeypatch.setattr(grid, "run_notebook", fake_run)
    report = grid.run_grid(profile, progress=False, only="capture")
    record = json.loads((profile.run_root() / "grid.json").read_text())
    assert record["job_stages"] == {j.name: j.stage for j in grid.build_jobs(profile)}
    assert set(record["job_seconds"]) == set(report.ran) == {"capture-smollm2-135m-instruct"}
    from saelib.report import grid_seconds

    table = grid_seconds(profile)
    assert list(table["stage"]) == ["capture"] and list(table["jobs"]) == [1]


def test_profile_sections_are_typed_once_at_load(tmp_path):
    profile = _profile(tmp_path)
    assert profile.section("steering") is profile.section("steering")
    assert type(profile.section("selection")).__name__ == "SelectionConfig"
    assert profile.section("steering").n_concepts == profile.steering["n_concepts"]
    with pytest.raises(Exception, match="valid"):
        profile.section("steer")


def test_the_stage_table_names_each_stages_records_and_row_files():
    """The table's record and row-file columns are the ones the stage modules write."""
    by_name = {s.name: s for s in stages.STAGES}
    assert by_name["steering"].rows == (stages.steering.STEER_ROWS,)
    assert set(by_name["selection"].rows) == {stages.selection.SELECT_SCORES,
                                              stages.selection.SELECT_ROWS}
    for s in stages.STAGES:
        for cls in s.records:
            if issubclass(cls, BlockRecord):
                assert cls.BLOCK in {"interp", "descriptive", "steering", "selection"}
                assert getattr(stages.analysis.SAEResult, "__dataclass_fields__")[cls.BLOCK]
    from saelib.report import BLOCKS

    assert BLOCKS == ("interp", "descriptive", "steering", "selection")


@pytest.mark.slow
def test_a_bfloat16_capture_streams_float32_activations_and_is_its_own_capture(tmp_path):
    """``capture.dtype: bfloat16`` (the paper profiles') on the packaged SmolLM2 at the smoke size:
    the model computes in bfloat16, the eval shards and the descriptive inputs are float32, the
    five SAEs train from the stream, and the capture is done for this dtype and not for float32."""
    from saelib.activations import ActivationStore
    from saelib.stages import capture
    from saelib.stages.layout import activations_dir

    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["runs_dir"] = str(tmp_path)
    data["capture"]["dtype"] = "bfloat16"
    profile = profile_from_dict(data, name="smoke")
    entry = profile.models[0]
    capture.prepare(profile, progress=False)
    rec = capture.run(profile, entry.name, progress=False)
    assert rec.splits["train"]["cells"] == 5 and rec.splits["train"]["forward_contexts"] > 0
    store = ActivationStore.open(activations_dir(profile, entry, "eval"))
    assert store.manifest["model_dtype"] == "bfloat16" and store.manifest["dtype"] == "float32"
    assert store.shard(0).dtype.name == "float32"
    assert len(list(tmp_path.rglob("stream.json"))) == 5
    assert capture.done(profile, entry)
    data["capture"]["dtype"] = "float32"
    assert not capture.done(profile_from_dict(data, name="smoke"), entry)
