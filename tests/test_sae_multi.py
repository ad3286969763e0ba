"""Many SAEs on one stream (saelib.sae.train.train_saes): the same bytes as training each alone on
the same batches, and a killed run resumes to those bytes."""

import pytest
import torch

from saelib.sae.train import SAERun, TrainConfig, latest_checkpoint, train_sae, train_saes
from tests.test_sae_train import D_IN, D_SAE, stream

CFG = TrainConfig(batch_size=128, lr=3e-3, progress=False)
TOTAL = 128 * 24
#: (architecture, sparsity knob): one of each knob kind, and the two whose training uses
#: top-k selection or a straight-through threshold.
CELLS = (("relu", 1.0), ("jumprelu", 4.0), ("topk", 4), ("batchtopk", 4), ("gated", 1.0))


def _runs(cfg=CFG, root=None, cells=CELLS):
    return [SAERun(arch, D_IN, D_SAE, knob, TOTAL, cfg, seed=7 + i,
                   checkpoint_dir=None if root is None else root / f"{arch}")
            for i, (arch, knob) in enumerate(cells)]


class Kill(RuntimeError):
    """Stands for a kill: the stream stops mid-run."""


def dying(after_rows):
    """The test stream, raising :class:`Kill` once ``after_rows`` rows have been served."""
    for i, chunk in enumerate(stream()):
        if i * 200 >= after_rows:
            raise Kill
        yield chunk


def _same_bytes(a, b):
    sa, sb = a.sae.state_dict(), b.sae.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_many_saes_on_one_stream_equal_each_alone():
    together = train_saes(_runs(), stream())
    for (arch, knob), i, res in zip(CELLS, range(len(CELLS)), together):
        alone = train_sae(arch, D_IN, D_SAE, knob, stream(), TOTAL, CFG, seed=7 + i)
        _same_bytes(res, alone)
        assert res.l0 == alone.l0 and res.explained_variance == alone.explained_variance
        assert res.n_steps == TOTAL // CFG.batch_size


def test_global_rng_use_between_steps_does_not_change_an_sae():
    """A run owns its random-number state: draws from the global generator between its steps (by
    another run, the model's forward, a data loader) leave it unchanged."""
    def noisy():
        for chunk in stream():
            torch.rand(1000)
            yield chunk

    _same_bytes(train_saes(_runs(cells=CELLS[:2]), noisy())[1],
                train_saes(_runs(cells=CELLS[:2]), stream())[1])


def test_killed_stream_resumes_to_the_same_bytes(tmp_path):
    cfg = TrainConfig(batch_size=128, lr=3e-3, progress=False, checkpoint_every=5)
    full = train_saes(_runs(cfg), stream())
    with pytest.raises(Kill):
        train_saes(_runs(cfg, tmp_path), dying(128 * 17))
    for arch, _ in CELLS:
        assert latest_checkpoint(tmp_path / arch).name == "step_000000015"
    resumed = train_saes(_runs(cfg, tmp_path), stream())
    for a, b in zip(full, resumed):
        assert b.resumed_from_step == 15
        _same_bytes(a, b)


def test_runs_at_different_steps_each_see_their_own_batches(tmp_path):
    """A run checkpointed at step 10 and another at step 15 resume from one stream that restarts
    at step 10; each ends as its uninterrupted self."""
    cfg10 = TrainConfig(batch_size=128, lr=3e-3, progress=False, checkpoint_every=10)
    cfg15 = TrainConfig(batch_size=128, lr=3e-3, progress=False, checkpoint_every=15)
    cells = CELLS[:2]
    full = train_saes(_runs(cfg10, cells=cells), stream())
    runs = [SAERun(arch, D_IN, D_SAE, knob, TOTAL, cfg, seed=7 + i, checkpoint_dir=tmp_path / arch)
            for i, ((arch, knob), cfg) in enumerate(zip(cells, (cfg10, cfg15)))]
    with pytest.raises(Kill):
        train_saes(runs, dying(128 * 16))
    resumed = [SAERun(arch, D_IN, D_SAE, knob, TOTAL, cfg10, seed=7 + i,
                      checkpoint_dir=tmp_path / arch) for i, (arch, knob) in enumerate(cells)]
    assert [r.step_index for r in resumed] == [10, 15]
    for a, b in zip(full, train_saes(resumed, stream())):
        _same_bytes(a, b)


def test_runs_on_one_stream_share_one_schedule():
    runs = [SAERun("relu", D_IN, D_SAE, 1.0, TOTAL, CFG),
            SAERun("relu", D_IN, D_SAE, 1.0, TOTAL * 2, CFG)]
    with pytest.raises(ValueError, match="one batch size, token budget"):
        train_saes(runs, stream())
