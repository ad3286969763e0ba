"""saelib.sae.sparse: the embedding-bag decode trains exactly what sae-lens's dense decode trains
(TopK and BatchTopK; ReLU and Gated once their codes are sparse).

Equality is checked against sae-lens 6.54's own classes on the same weights and inputs: losses,
outputs and every parameter gradient to 1e-5 (float32 summation order is the only difference,
measured ~1e-8), and whole short training runs to 1e-4.
"""

import pytest
import torch
from sae_lens.saes import (SAE, BatchTopKTrainingSAE, JumpReLUSAE, StandardTrainingSAE, TopKSAE,
                           TopKTrainingSAE)
from sae_lens.saes.sae import TrainStepInput

from saelib.sae.registry import get_arch
from saelib.sae.sparse import SparseBatchTopKTrainingSAE, SparseTopKTrainingSAE, active_latents
from saelib.sae.train import TrainConfig, train_sae

D_IN, D_SAE, K = 24, 96, 6
TOL = dict(rtol=1e-5, atol=1e-5)


def pair(arch: str, rescale: bool, k: float = K):
    """(saelib sparse-decode SAE, sae-lens dense SAE) with identical random weights."""
    spec = get_arch(arch)
    cfg = spec.make_config(D_IN, D_SAE, k, 0, TrainConfig())
    cfg.rescale_acts_by_decoder_norm = rescale
    torch.manual_seed(3)
    sparse = spec.training_class(sparse_decode=True)(cfg)
    dense = spec.training_class(sparse_decode=False)(cfg)
    with torch.no_grad():
        for p in sparse.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        # unequal decoder norms, so rescale_acts_by_decoder_norm matters
        sparse.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense


def step(sae, x, dead_mask):
    sae.zero_grad()
    out = sae.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead_mask, n_training_steps=0,
        is_logging_step=False))
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in sae.named_parameters()}
    return out, grads


def test_registry_trains_topk_and_batchtopk_with_the_sparse_subclasses():
    assert get_arch("topk").training_class() is SparseTopKTrainingSAE
    assert get_arch("batchtopk").training_class() is SparseBatchTopKTrainingSAE
    assert get_arch("topk").training_class(sparse_decode=False) is TopKTrainingSAE
    assert get_arch("batchtopk").training_class(sparse_decode=False) is BatchTopKTrainingSAE
    assert get_arch("relu").training_class(False) is StandardTrainingSAE
    assert issubclass(get_arch("relu").training_class(True), StandardTrainingSAE)
    # the subclasses are sae-lens's classes as far as fold/save code is concerned
    assert issubclass(SparseBatchTopKTrainingSAE, BatchTopKTrainingSAE)
    assert issubclass(SparseTopKTrainingSAE, TopKTrainingSAE)


def test_train_config_rejects_non_bool_sparse_decode():
    with pytest.raises(ValueError, match="sparse_decode"):
        TrainConfig(sparse_decode="yes").validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("n_dead", [0, 40])
def test_training_forward_and_gradients_match_sae_lens(arch, rescale, n_dead):
    sparse, dense = pair(arch, rescale)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(128, D_IN, generator=g) * 2
    dead_mask = torch.zeros(D_SAE, dtype=torch.bool)
    dead_mask[torch.randperm(D_SAE, generator=g)[:n_dead]] = True
    out_s, grads_s = step(sparse, x, dead_mask)
    out_d, grads_d = step(dense, x, dead_mask)
    assert set(out_s.losses) == set(out_d.losses)
    for name in out_d.losses:
        torch.testing.assert_close(out_s.losses[name], out_d.losses[name], **TOL)
    if n_dead:
        assert float(out_d.losses["auxiliary_reconstruction_loss"].detach()) > 0
    torch.testing.assert_close(out_s.loss, out_d.loss, **TOL)
    torch.testing.assert_close(out_s.sae_out, out_d.sae_out, **TOL)
    torch.testing.assert_close(out_s.feature_acts, out_d.feature_acts, rtol=0, atol=0)
    assert set(grads_s) == set(grads_d) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in grads_d:
        assert grads_d[name].abs().max() > 1e-3, name  # the comparison is not vacuous
        torch.testing.assert_close(grads_s[name], grads_d[name], **TOL, msg=name)
    if arch == "batchtopk":
        assert float(sparse.topk_threshold) == float(dense.topk_threshold) > 0


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_decode_handles_extra_leading_dims(arch):
    sparse, dense = pair(arch, rescale=True)
    x = torch.randn(4, 8, D_IN, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sparse(x), dense(x), **TOL)


def test_batchtopk_decode_of_an_all_zero_code_is_the_bias():
    sparse, _ = pair("batchtopk", rescale=True)
    out_BD = sparse.decode(torch.zeros(5, D_SAE))
    torch.testing.assert_close(out_BD, sparse.b_dec.detach().expand(5, D_IN), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["nonzero", "topk"])
def test_active_latents_lists_each_tokens_nonzeros_and_passes_gradients(method):
    g = torch.Generator().manual_seed(2)
    pre_BF = torch.randn(3, 7, 40, generator=g, requires_grad=True)
    top = pre_BF.topk(5, dim=-1)
    acts_BF = torch.zeros_like(pre_BF).scatter(-1, top.indices, top.values.relu())
    idx_BM, vals_BM = active_latents(acts_BF, k=5, method=method)
    assert idx_BM.shape == vals_BM.shape and idx_BM.shape[:-1] == (3, 7)
    rebuilt_BF = torch.zeros_like(acts_BF).scatter_add(-1, idx_BM, vals_BM)
    torch.testing.assert_close(rebuilt_BF, acts_BF, rtol=0, atol=0)
    weights_BF = torch.randn(3, 7, 40, generator=g)
    (grad_sparse,) = torch.autograd.grad((rebuilt_BF * weights_BF).sum(), pre_BF, retain_graph=True)
    (grad_dense,) = torch.autograd.grad((acts_BF * weights_BF).sum(), pre_BF)
    torch.testing.assert_close(grad_sparse, grad_dense, rtol=0, atol=0)


def test_active_latents_pads_uneven_rows_and_empty_codes():
    acts_BF = torch.tensor([[0.0, 2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    idx_BM, vals_BM = active_latents(acts_BF)
    assert idx_BM.tolist() == [[1, 3], [0, 0], [0, 0]]
    assert vals_BM.tolist() == [[2.0, 3.0], [0.0, 0.0], [1.0, 0.0]]
    idx_BM, vals_BM = active_latents(torch.zeros(4, 2, 9))
    assert idx_BM.shape == vals_BM.shape == (4, 2, 0)
    with pytest.raises(ValueError, match="needs k"):
        active_latents(acts_BF, method="topk")
    with pytest.raises(ValueError, match="method"):
        active_latents(acts_BF, method="dense")  # type: ignore[arg-type]


def batches(seed: int = 0, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(3 * D_IN, D_IN, generator=g)
    while True:
        on = (torch.rand(n, 3 * D_IN, generator=g) < 0.1).float()
        yield (on * torch.rand(n, 3 * D_IN, generator=g)) @ dirs + 5.0


@pytest.mark.parametrize("arch,inference_cls", [("topk", TopKSAE), ("batchtopk", JumpReLUSAE)])
def test_short_training_run_matches_dense_decode(arch, inference_cls, tmp_path):
    """30 Adam steps (with dead-latent aux loss) give the same weights either way, and the saved
    SAE is sae-lens's own inference class, loadable from disk."""
    results = {}
    for sparse_decode in (True, False):
        cfg = TrainConfig(batch_size=64, lr=3e-3, progress=False, dead_feature_window_frac=0.1,
                          norm_estimate_batches=2, sparse_decode=sparse_decode)
        results[sparse_decode] = train_sae(arch, D_IN, D_SAE, K, batches(), 30 * 64, cfg)
    sparse_sae, dense_sae = results[True].sae, results[False].sae
    assert type(sparse_sae) is type(dense_sae) is inference_cls
    assert results[True].dead_fraction > 0  # the aux-loss decode ran too
    assert results[True].l0 == pytest.approx(results[False].l0, abs=1e-3)
    state_d = dense_sae.state_dict()
    for name, value in sparse_sae.state_dict().items():
        torch.testing.assert_close(value, state_d[name], rtol=1e-4, atol=1e-4, msg=name)
    sparse_sae.save_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is inference_cls
    x = next(batches(seed=5))
    torch.testing.assert_close(loaded.decode(loaded.encode(x)),
                               dense_sae.decode(dense_sae.encode(x)), rtol=1e-4, atol=1e-3)


def test_rescaled_decode_gradient_is_the_same_on_every_pass_with_two_threads():
    """TopK's aux loss decodes ~d/2 dead latents for every token, so a few hundred latents repeat
    across the whole batch. Gathering their 1 / ‖W_dec‖ by advanced indexing summed the repeats
    in a thread-dependent order in backward (9e-8 apart over 10 passes, and TopK SAEs at width
    2,048 differed between identical runs); the gather must give one gradient."""
    from types import SimpleNamespace

    from saelib.sae.sparse import _decode_picked

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        dead = torch.randperm(2048, generator=g)[:300]
        idx_BK = torch.stack([dead[torch.randperm(300, generator=g)[:288]] for _ in range(512)])
        vals_BK = torch.rand(512, 288, generator=g)
        grad_BD = torch.randn(512, 64, generator=g)
        W_dec = torch.randn(2048, 64, generator=g, requires_grad=True)
        sae = SimpleNamespace(rescales_code=True, W_dec=W_dec, b_dec=None)
        grads = []
        for _ in range(10):
            W_dec.grad = None
            _decode_picked(sae, vals_BK, idx_BK, with_bias=False).backward(grad_BD)
            grads.append(W_dec.grad.clone())
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(grads[0], x) for x in grads[1:])


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_a_training_step_checks_no_ids_against_the_decoder(arch, monkeypatch):
    """The training decode skips ``sparse_decode``'s id range check (a host sync per decode on a
    GPU): its ids are its own code's. The public call still checks by default, and skipping the
    check changes no number."""
    import importlib

    sd = importlib.import_module("saelib.kernels.sparse_decode")  # the module, not the function

    sparse, _ = pair(arch, rescale=True)
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(2))
    dead_mask = torch.zeros(D_SAE, dtype=torch.bool)
    dead_mask[:40] = True  # TopK's auxiliary loss decodes too
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(sd.torch, "aminmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    step(sparse, x, dead_mask)
    assert calls == []
    idx = torch.tensor([[0, 5], [7, D_SAE - 1]])
    vals = torch.randn(2, 2)
    checked = sd.sparse_decode(idx, vals, sparse.W_dec.detach())
    assert len(calls) == 1
    torch.testing.assert_close(sd.sparse_decode(idx, vals, sparse.W_dec.detach(), check_ids=False),
                               checked, rtol=0, atol=0)
    with pytest.raises(ValueError, match="idx_BK values must lie"):
        sd.sparse_decode(idx + D_SAE, vals, sparse.W_dec.detach())


@pytest.fixture
def ragged_calls(monkeypatch) -> list:
    """One entry per call of the unpadded decode from saelib.sae.sparse (which still runs)."""
    import saelib.sae.sparse as sp

    calls: list = []
    real = sp.sparse_decode_ragged
    monkeypatch.setattr(sp, "sparse_decode_ragged", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def sparse_regime(arch: str, share: float):
    """(saelib's SAE, sae-lens's) whose codes have about ``share`` of their entries non-zero: each
    latent's encoder bias (ReLU) or gate bias (Gated) is lowered to its (1 - share) quantile over
    the inputs ``x`` returned with them."""
    sparse, dense = pair(arch, rescale=False)
    x = torch.randn(128, D_IN, generator=torch.Generator().manual_seed(7)) * 2
    bias = sparse.b_gate if arch == "gated" else sparse.b_enc
    with torch.no_grad():
        pre_BF = (x - sparse.b_dec) @ sparse.W_enc
        bias.copy_(-torch.quantile(pre_BF, 1 - share, dim=0))
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense, x


@pytest.mark.parametrize("arch", ["relu", "gated"])
@pytest.mark.parametrize("share", [0.05, 0.5])
def test_relu_and_gated_decode_their_non_zeros_and_train_the_same(arch, share, ragged_calls):
    """A sparse ReLU / Gated code (5 % non-zero) is decoded through its non-zeros, for the code and
    Gated's reconstruction from its gate; a dense one (50 %, early training) by the matmul. Either
    way the losses, outputs and every gradient are sae-lens's."""
    import saelib.sae.sparse as sp

    ours, theirs, x = sparse_regime(arch, share)
    coeffs = {"l1": 0.3}
    outs, grads = [], []
    for sae in (ours, theirs):
        sae.zero_grad()
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients=coeffs, dead_neuron_mask=None, n_training_steps=0,
            is_logging_step=False))
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.detach().clone() for n, p in sae.named_parameters()
                      if p.grad is not None})
    density = float((outs[1].feature_acts != 0).float().mean())
    assert (density < sp.DENSE_ABOVE) == (share < sp.DENSE_ABOVE), density
    assert len(ragged_calls) == ((2 if arch == "gated" else 1) if share < sp.DENSE_ABOVE else 0)
    torch.testing.assert_close(outs[0].feature_acts, outs[1].feature_acts, rtol=0, atol=0)
    torch.testing.assert_close(outs[0].sae_out, outs[1].sae_out, **TOL)
    for name in outs[1].losses:
        torch.testing.assert_close(outs[0].losses[name], outs[1].losses[name], **TOL, msg=name)
    assert set(grads[0]) == set(grads[1])
    for name in grads[1]:
        assert grads[1][name].abs().max() > 1e-4, name  # the comparison is not vacuous
        torch.testing.assert_close(grads[0][name], grads[1][name], **TOL, msg=name)


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_relu_and_gated_runs_reach_the_sparse_decode_and_match_sae_lens(arch, ragged_calls):
    """60 Adam steps at an L1 strong enough to bring the code under DENSE_ABOVE: the run switches
    from the dense decode to the decode of the non-zeros and ends with sae-lens's SAE."""
    import saelib.sae.sparse as sp

    results = {}
    for ours in (True, False):
        cfg = TrainConfig(batch_size=64, lr=3e-3, progress=False, norm_estimate_batches=2,
                          sparse_decode=ours)
        results[ours] = train_sae(arch, D_IN, D_SAE, {"relu": 5.0, "gated": 10.0}[arch],
                                  batches(), 60 * 64, cfg)
    assert 1 < results[False].l0 < sp.DENSE_ABOVE * D_SAE
    assert 0 < len(ragged_calls)
    assert results[True].l0 == pytest.approx(results[False].l0, abs=1e-2)
    theirs = results[False].sae.state_dict()
    for name, value in results[True].sae.state_dict().items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-4, atol=1e-4, msg=name)


def test_ragged_decode_gradient_is_the_same_on_every_pass_with_two_threads():
    """The grid's SAEs are reproducible byte for byte, so the unpadded decode's backward must sum
    in a fixed order: a ReLU-like code at width 2,048, the same gradients over 10 passes."""
    from types import SimpleNamespace

    from saelib.sae.sparse import decode_nonzeros

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        pre_NF = torch.randn(512, 2048, generator=g) - 1.8
        W_dec = torch.randn(2048, 64, generator=g, requires_grad=True)
        b_dec = torch.zeros(64, requires_grad=True)
        grad_ND = torch.randn(512, 64, generator=g)
        sae = SimpleNamespace(W_dec=W_dec, b_dec=b_dec)
        grads = []
        for _ in range(10):
            W_dec.grad = None
            acts_NF = torch.relu(pre_NF).requires_grad_(True)
            out = decode_nonzeros(sae, acts_NF, with_bias=True)
            assert out is not None  # 3.6 % non-zero: decoded through the non-zeros
            out.backward(grad_ND)
            grads.append((W_dec.grad.clone(), acts_NF.grad.clone()))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(grads[0][0], w) and torch.equal(grads[0][1], a) for w, a in grads[1:])


@pytest.mark.parametrize("padded", [False, True])
def test_decode_nonzeros_in_both_forms_is_the_dense_decode_until_it_is_too_dense(padded):
    """Both forms (unpadded: the CPU's; padded to the busiest token: the Triton kernels' on CUDA)
    decode a 4 %-dense code as the matmul does, with the decoder's gradients and the code's at
    its non-zeros (elsewhere none: what a ReLU passes on there is zero either way); a
    code denser than DENSE_ABOVE (by its share of non-zeros, or its busiest token when padded)
    is left to the matmul."""
    from types import SimpleNamespace

    from saelib.sae.sparse import DENSE_ABOVE, decode_nonzeros

    g = torch.Generator().manual_seed(4)
    W = torch.randn(256, 16, generator=g, requires_grad=True)
    b = torch.randn(16, generator=g, requires_grad=True)
    sae = SimpleNamespace(W_dec=W, b_dec=b)
    pre_NF = torch.randn(40, 256, generator=g) - 1.75
    grad_ND = torch.randn(40, 16, generator=g)
    results = []
    for path in ("dense", "sparse"):
        acts_NF = torch.relu(pre_NF).requires_grad_(True)
        W.grad = b.grad = None
        out = (acts_NF @ W + b if path == "dense"
               else decode_nonzeros(sae, acts_NF, with_bias=True, padded=padded))
        out.backward(grad_ND)
        on_NF = pre_NF > 0
        results.append((out.detach(), acts_NF.grad[on_NF], W.grad.clone(), b.grad.clone()))
        assert path == "dense" or not acts_NF.grad[~on_NF].any()
    for dense, sparse in zip(*results):
        torch.testing.assert_close(sparse, dense, **TOL)
    dense_NF = torch.relu(torch.randn(40, 256, generator=g) + 0.5)
    assert float((dense_NF > 0).float().mean()) > DENSE_ABOVE
    assert decode_nonzeros(sae, dense_NF, with_bias=True, padded=padded) is None
    one_busy_NF = torch.zeros(40, 256)
    one_busy_NF[0, : int(DENSE_ABOVE * 256) + 1] = 1.0  # 0.3 % non-zero, one busy token
    out = decode_nonzeros(sae, one_busy_NF, with_bias=True, padded=padded)
    assert (out is None) == padded
