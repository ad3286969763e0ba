"""Tests for saelib.kernels: the torch paths, and the Triton kernels under Triton's interpreter.

``TRITON_INTERPRET=1`` is set here before anything imports the Triton kernel modules (they are
imported lazily on the first Triton call, and ``@triton.jit`` reads the variable then), so
``backend='triton'`` runs the real kernels on CPU tensors. Every path is compared with a float64
dense reference; tolerances are float32 rounding (atol/rtol 1e-5 on O(1) values).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from saelib.kernels import (  # noqa: E402
    LatentTopK,
    batch_topk_encode,
    sparse_decode,
    topk_encode,
    triton_available,
)
from saelib.kernels import backend as kbackend  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
needs_interp = pytest.mark.skipif(
    not (triton_available() and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton and TRITON_INTERPRET=1 set before the first Triton import",
)


def _dense_reference(idx_BK, vals_BK, W_dec_FD, b_dec_D):
    """float64 dense decode: scatter the codes into (B, F), then matmul (duplicates add up)."""
    codes_BF = torch.zeros(idx_BK.shape[0], W_dec_FD.shape[0], dtype=torch.float64)
    codes_BF = codes_BF.scatter_add(1, idx_BK.long(), vals_BK)
    return codes_BF @ W_dec_FD + b_dec_D


def _decode_case(B, K, F, D, seed):
    g = torch.Generator().manual_seed(seed)
    idx_BK = torch.randint(0, F, (B, K), generator=g)
    vals_BK = torch.randn(B, K, generator=g, dtype=torch.float64)
    W_dec_FD = torch.randn(F, D, generator=g, dtype=torch.float64)
    b_dec_D = torch.randn(D, generator=g, dtype=torch.float64)
    grad_BD = torch.randn(B, D, generator=g, dtype=torch.float64)
    return idx_BK, vals_BK, W_dec_FD, b_dec_D, grad_BD


def _grads(fn, idx_BK, vals_BK, W_dec_FD, b_dec_D, grad_BD, dtype):
    vals = vals_BK.detach().to(dtype).clone().requires_grad_()
    W = W_dec_FD.detach().to(dtype).clone().requires_grad_()
    b = b_dec_D.detach().to(dtype).clone().requires_grad_()
    x_BD = fn(idx_BK, vals, W, b)
    x_BD.backward(grad_BD.to(dtype))
    return x_BD.detach().double(), vals.grad.double(), W.grad.double(), b.grad.double()


# Awkward sizes: non-powers of two, k = 1, k = 0 (every row empty), one row, no rows, k > F
# (so indices repeat within a row), D smaller than a block and D spanning several blocks.
DECODE_SIZES = [(7, 5, 37, 19), (1, 1, 3, 1), (9, 1, 11, 130), (5, 0, 13, 6), (0, 3, 8, 5), (4, 9, 3, 7)]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interp)])
@pytest.mark.parametrize("B,K,F,D", DECODE_SIZES)
def test_sparse_decode_matches_float64_dense(backend, B, K, F, D):
    case = _decode_case(B, K, F, D, seed=B * 1000 + K * 100 + F)
    ref = _grads(_dense_reference, *case, dtype=torch.float64)
    got = _grads(lambda *a: sparse_decode(*a, backend=backend), *case, dtype=torch.float32)
    for name, r, x in zip(["x", "grad_vals", "grad_W_dec", "grad_b_dec"], ref, got):
        torch.testing.assert_close(x, r, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@needs_interp
def test_sparse_decode_triton_equals_torch_int32_ids_no_bias():
    idx_BK, vals_BK, W_dec_FD, _, _ = _decode_case(6, 4, 21, 33, seed=3)
    args = (idx_BK.int(), vals_BK.float(), W_dec_FD.float())
    torch.testing.assert_close(
        sparse_decode(*args, backend="triton"), sparse_decode(*args, backend="torch"), **TOL
    )


def test_sparse_decode_leading_dims_and_auto_backend():
    idx_BK, vals_BK, W_dec_FD, b_dec_D, _ = _decode_case(6, 3, 10, 4, seed=5)
    x_BD = sparse_decode(idx_BK, vals_BK.float(), W_dec_FD.float(), b_dec_D.float())
    x_23D = sparse_decode(
        idx_BK.reshape(2, 3, 3), vals_BK.float().reshape(2, 3, 3), W_dec_FD.float(), b_dec_D.float()
    )
    assert x_23D.shape == (2, 3, 4)
    torch.testing.assert_close(x_23D.reshape(6, 4), x_BD)


def test_sparse_decode_rejects_bad_input():
    W = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        sparse_decode(torch.tensor([[5]]), torch.ones(1, 1), W)
    with pytest.raises(ValueError, match="same shape"):
        sparse_decode(torch.tensor([[1, 2]]), torch.ones(1, 1), W)
    with pytest.raises(ValueError, match="b_dec_D"):
        sparse_decode(torch.tensor([[1]]), torch.ones(1, 1), W, torch.zeros(4))
    with pytest.raises(ValueError, match="int32 or int64"):
        sparse_decode(torch.tensor([[1.0]]), torch.ones(1, 1), W)
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_decode(torch.tensor([[1]]), torch.ones(1, 1), W, backend="cuda")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # without triton (it is an optional extra) the error names the missing package instead
    match = "TRITON_INTERPRET=1" if kbackend.triton_available() else "needs the optional 'triton'"
    with pytest.raises(ValueError, match=match):
        kbackend.resolve_backend("triton", torch.zeros(1))
    assert kbackend.resolve_backend("auto", torch.zeros(1)) == "torch"


def test_import_and_dispatch_without_triton(monkeypatch):
    """Triton is optional: with it unimportable, 'auto' runs torch and 'triton' says why not."""
    monkeypatch.setitem(__import__("sys").modules, "triton", None)
    kbackend.triton_available.cache_clear()
    try:
        assert not kbackend.triton_available()
        assert kbackend.resolve_backend("auto", torch.zeros(1)) == "torch"
        with pytest.raises(ValueError, match="optional 'triton' package"):
            kbackend.resolve_backend("triton", torch.zeros(1))
    finally:
        kbackend.triton_available.cache_clear()


def test_topk_encode_matches_sae_lens_topk_and_its_gradient():
    from sae_lens.saes.topk_sae import TopK

    g = torch.Generator().manual_seed(0)
    pre_BF = torch.randn(9, 23, generator=g, dtype=torch.float64) - 0.5
    W_dec_FD = torch.randn(23, 6, generator=g, dtype=torch.float64)
    for k in (1, 4, 23):
        codes = topk_encode(pre_BF, k)
        torch.testing.assert_close(codes.to_dense(23), TopK(k)(pre_BF))
        pre_a = pre_BF.clone().requires_grad_()
        c = topk_encode(pre_a, k)
        sparse_decode(c.idx_BK, c.vals_BK, W_dec_FD).pow(2).sum().backward()
        pre_b = pre_BF.clone().requires_grad_()
        (TopK(k)(pre_b) @ W_dec_FD).pow(2).sum().backward()
        torch.testing.assert_close(pre_a.grad, pre_b.grad)
    with pytest.raises(ValueError, match=r"\[1, 23\]"):
        topk_encode(pre_BF, 24)


def test_batch_topk_encode_matches_sae_lens_batchtopk_and_its_gradient():
    from sae_lens.saes.batchtopk_sae import BatchTopK

    g = torch.Generator().manual_seed(1)
    pre_BF = torch.randn(11, 17, generator=g, dtype=torch.float64)
    pre_BF[3] = -1.0  # a token with no active latent: an empty row after padding
    W_dec_FD = torch.randn(17, 5, generator=g, dtype=torch.float64)
    for k in (1, 2.5, 6):
        codes = batch_topk_encode(pre_BF, k)
        torch.testing.assert_close(codes.to_dense(17), BatchTopK(k)(pre_BF))
        assert codes.to_dense(17)[3].abs().sum() == 0
        pre_a = pre_BF.clone().requires_grad_()
        c = batch_topk_encode(pre_a, k)
        sparse_decode(c.idx_BK, c.vals_BK, W_dec_FD).pow(2).sum().backward()
        pre_b = pre_BF.clone().requires_grad_()
        (BatchTopK(k)(pre_b) @ W_dec_FD).pow(2).sum().backward()
        torch.testing.assert_close(pre_a.grad, pre_b.grad)


def _check_latent_topk(acts_NF, k, chunk_sizes, backend, device="cpu"):
    """Chunks streamed into a LatentTopK (on ``device``, e.g. CUDA) give the global top-k."""
    N, F = acts_NF.shape
    positions_N = torch.arange(N) * 7 + 3  # caller coordinates, not 0..N-1
    table = LatentTopK(F, k, device=device, backend=backend)
    start = 0
    for size in chunk_sizes:
        table.update(acts_NF[start : start + size].to(device),
                     positions_N[start : start + size].to(device))
        start += size
    assert start == N
    res = table.result()
    vals_KF, pos_KF = res.vals_KF.cpu(), res.pos_KF.cpu()
    assert res.n_tokens == N and vals_KF.shape == (k, F) and pos_KF.shape == (k, F)
    kk = min(k, N)
    ref_vals, ref_rows = torch.topk(acts_NF.double(), kk, dim=0)
    torch.testing.assert_close(vals_KF[:kk].double(), ref_vals, **TOL)
    # Continuous random values have no ties, so the positions must agree exactly.
    assert torch.equal(pos_KF[:kk], positions_N[ref_rows])
    assert torch.all(vals_KF[kk:] == float("-inf")) and torch.all(pos_KF[kk:] == -1)


@pytest.mark.parametrize(
    "N,F,k,chunks",
    [(50, 13, 3, [17, 0, 33]), (23, 7, 1, [23]), (9, 5, 12, [4, 5]), (61, 3, 5, [2, 59])],
)
def test_latent_topk_torch_streams_like_a_global_topk(N, F, k, chunks):
    acts_NF = torch.randn(N, F, generator=torch.Generator().manual_seed(N + F + k))
    _check_latent_topk(acts_NF, k, chunks, backend="torch")


@needs_interp
@pytest.mark.parametrize("N,F,k,chunks", [(40, 11, 3, [17, 23]), (19, 5, 1, [19]), (6, 3, 4, [2, 4])])
def test_latent_topk_triton_streams_like_a_global_topk(N, F, k, chunks):
    acts_NF = torch.randn(N, F, generator=torch.Generator().manual_seed(N * F + k))
    _check_latent_topk(acts_NF, k, chunks, backend="triton")


@needs_interp
def test_latent_topk_triton_ties_and_sparse_codes_keep_earliest_tokens():
    """Mostly-zero codes (the SAE case): zeros tie, and the Triton kernel keeps the earliest.

    The torch path breaks ties as ``torch.topk`` does (unspecified), so for it only the values
    and the firing positions are checked.
    """
    acts_NF = torch.zeros(70, 4)
    acts_NF[[5, 40, 66], 1] = torch.tensor([0.5, 2.0, 0.5])
    acts_NF[::9, 2] = 1.0
    results = {}
    for backend in ("triton", "torch"):
        table = LatentTopK(4, 3, backend=backend)
        table.update(acts_NF[:35])
        table.update(acts_NF[35:])
        results[backend] = table.result()
    tri, tor = results["triton"], results["torch"]
    torch.testing.assert_close(tri.vals_KF, tor.vals_KF)
    assert tri.vals_KF[:, 1].tolist() == [2.0, 0.5, 0.5]
    assert tri.pos_KF[:, 0].tolist() == [0, 1, 2]
    assert tri.pos_KF[:, 1].tolist() == [40, 5, 66]
    assert tri.pos_KF[:, 2].tolist() == [0, 9, 18]
    assert tor.pos_KF[0, 1] == 40 and set(tor.pos_KF[1:, 1].tolist()) == {5, 66}
    assert all(p % 9 == 0 for p in tor.pos_KF[:, 2].tolist())


def test_latent_topk_rejects_bad_input():
    with pytest.raises(ValueError, match="n_latents"):
        LatentTopK(0, 3)
    with pytest.raises(ValueError, match="k must be"):
        LatentTopK(4, 0)
    table = LatentTopK(4, 2)
    with pytest.raises(ValueError, match=r"\(n_tokens, 4\)"):
        table.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="positions_N"):
        table.update(torch.zeros(3, 4), torch.arange(2))


@pytest.mark.slow
@needs_interp
def test_latent_topk_triton_larger_k_and_many_tiles():
    """k = 33 (a 64-slot list), 300 tokens in 5 tiles of 64 (the last ones partial) over 40
    latents (one 64-latent block, its tail masked): one program, ~half a minute under the
    interpreter."""
    acts_NF = torch.randn(300, 40, generator=torch.Generator().manual_seed(9))
    _check_latent_topk(acts_NF, 33, [128, 172], backend="triton")


# The compiled Triton kernels on a GPU (``bench/device/check.sh`` runs these with
# TRITON_INTERPRET=0); skipped on machines without CUDA, where the interpreted tests above run the
# same kernels. Sizes: the awkward ones above, and the paper's (batch 2,048, width 16,384,
# d_model 2,304, k = 50 and 820). float32 against the float64 reference: each output sums at most
# k products, so the tolerance grows with it.
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_available()
         and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="compiled Triton kernels need a CUDA device and TRITON_INTERPRET=0",
)


@needs_cuda
@pytest.mark.parametrize("B,K,F,D", DECODE_SIZES + [(2048, 50, 16384, 2304), (256, 820, 16384, 2304)])
def test_sparse_decode_triton_on_cuda_matches_float64_dense(B, K, F, D):
    case = _decode_case(B, K, F, D, seed=B + K + F)
    ref = _grads(_dense_reference, *case, dtype=torch.float64)
    cuda = [t.cuda() for t in case]
    got = _grads(lambda *a: sparse_decode(*a, backend="triton"), *cuda, dtype=torch.float32)
    tol = dict(atol=1e-5 * max(1, K) ** 0.5 * 10, rtol=1e-4)
    for name, r, x in zip(["x", "grad_vals", "grad_W_dec", "grad_b_dec"], ref, got):
        torch.testing.assert_close(x.cpu(), r, **tol, msg=lambda m, n=name: f"{n}: {m}")


@needs_cuda
@pytest.mark.parametrize("N,F,k,chunks", [(40, 11, 3, [17, 23]), (300, 40, 33, [128, 172]),
                                          (8192, 16384, 252, [4096, 4096])])
def test_latent_topk_triton_on_cuda_streams_like_a_global_topk(N, F, k, chunks):
    acts_NF = torch.randn(N, F, generator=torch.Generator().manual_seed(N + F + k))
    _check_latent_topk(acts_NF, k, chunks, backend="triton", device="cuda")


@needs_cuda
def test_topk_encodes_on_cuda_give_the_cpu_codes():
    """Same codes as on the CPU, compared densely (``topk(sorted=False)`` orders rows freely)."""
    pre_BF = torch.randn(512, 16384, generator=torch.Generator().manual_seed(1))

    def dense(c, F=16384):
        return torch.zeros(c.idx_BK.shape[0], F, dtype=c.vals_BK.dtype, device=c.vals_BK.device
                           ).scatter_add(1, c.idx_BK.long(), c.vals_BK).cpu()

    for fn in (lambda p: topk_encode(p, 50), lambda p: batch_topk_encode(p, 50)):
        torch.testing.assert_close(dense(fn(pre_BF.cuda())), dense(fn(pre_BF)))


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0], [0, 0, 0], [7], [2, 2, 9, 1, 4, 0, 6]])
def test_sparse_decode_ragged_matches_float64_dense(counts):
    """Tokens with different counts, empty ones included, decode as the dense matmul of their
    code, with the same gradients for the values, the decoder and its bias."""
    from saelib.kernels import sparse_decode_ragged

    g = torch.Generator().manual_seed(len(counts) * 10 + sum(counts))
    F_, D = 13, 6
    counts_B = torch.tensor(counts)
    ids_Z = torch.cat([torch.randperm(F_, generator=g)[:c] for c in counts]).long()
    offsets_B = counts_B.cumsum(0) - counts_B
    vals_Z = torch.randn(ids_Z.numel(), generator=g, dtype=torch.float64)
    W = torch.randn(F_, D, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    grad_BD = torch.randn(len(counts), D, generator=g, dtype=torch.float64)
    rows_Z = torch.repeat_interleave(torch.arange(len(counts)), counts_B)

    def ragged(_, vals, W_, b_):
        return sparse_decode_ragged(ids_Z, vals, offsets_B, W_, b_)

    def dense(_, vals, W_, b_):
        codes_BF = torch.zeros(len(counts), F_, dtype=vals.dtype).index_put((rows_Z, ids_Z), vals)
        return codes_BF @ W_ + b_

    ref = _grads(dense, None, vals_Z, W, b, grad_BD, dtype=torch.float64)
    got = _grads(ragged, None, vals_Z, W, b, grad_BD, dtype=torch.float32)
    for name, r, x in zip(["x", "grad_vals", "grad_W_dec", "grad_b_dec"], ref, got):
        torch.testing.assert_close(x, r, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    empty = counts_B == 0
    torch.testing.assert_close(got[0][empty], b.float().double().expand(int(empty.sum()), D))


def test_sparse_decode_ragged_rejects_bad_input():
    from saelib.kernels import sparse_decode_ragged

    W = torch.randn(5, 3)
    ids, vals = torch.tensor([1, 4, 2]), torch.ones(3)
    with pytest.raises(ValueError, match="must lie"):
        sparse_decode_ragged(ids + 1, vals, torch.tensor([0, 2]), W)
    with pytest.raises(ValueError, match="offsets_B must rise"):
        sparse_decode_ragged(ids, vals, torch.tensor([0, 2, 1]), W)
    with pytest.raises(ValueError, match="offsets_B must rise"):
        sparse_decode_ragged(ids, vals, torch.tensor([1, 2]), W)
    with pytest.raises(ValueError, match="offsets_B must rise"):
        sparse_decode_ragged(ids, vals, torch.tensor([0, 4]), W)
    with pytest.raises(ValueError, match="dtype"):
        sparse_decode_ragged(ids, vals, torch.tensor([0, 2], dtype=torch.int32), W)
    with pytest.raises(ValueError, match="1-D"):
        sparse_decode_ragged(ids[None], vals[None], torch.tensor([0]), W)
