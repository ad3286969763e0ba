"""The windows AutoInterp shows the judge: top, importance-weighted and random (protocol §3).

Why a module of its own: the sampling rules decide what the judge sees, so they must be exact,
seeded and testable on hand-made activations, apart from any judge. Protocol §3 (SAEBench's
AutoInterp), per latent:

* 21-token windows, 10 tokens either side of a centre. BOS/PAD/EOS are never centres, and their
  activations are set to 0 everywhere (SAEBench masks them), so they never count towards the
  latent's maximum, the explainer's marks or the detection truth.
* **Edges: windows are shifted, not clipped.** A centre nearer than 10 tokens to a context edge
  gets the 21-token window that lies inside the context and contains it (``window_bounds``), so
  every window has 21 tokens; a context shorter than 21 tokens gives windows of the whole
  context.
* 12 **top** windows: greedily the largest remaining activation; after each pick, centres inside
  the picked window (same context) are excluded ("non-overlapping peaks", SAEBench's rule: windows
  may share edge tokens, but no window contains another top window's centre). Only activations
  > 0 are peaks, so a rarely firing latent can have fewer than 12.
* 7 **importance-weighted** (IW) windows: sampled without replacement with probability ∝
  activation among positions with 0 < activation < the smallest top peak whose centre lies in no
  top window; after each draw, centres inside the drawn window are excluded too.
* 10 **random** windows: uniform without replacement over all valid centres, any activation
  (zero included); they may coincide with top or IW windows, as in SAEBench.

Determinism: IW sampling uses Efraimidis–Spirakis keys ``log(u) / a`` whose uniform ``u`` is a
hash of (seed, latent, corpus position), so the sample depends only on the seed and the data —
not on chunk sizes, device or the other latents in the batch. Random windows and the latent
choice use NumPy generators seeded with ``[seed, stream, latent]``.

Memory: the eval corpus is 1e5–2e6 tokens and the SAE 2k–16k wide, so tokens × width is never
built. ``scan_top`` streams the codes once through :class:`saelib.kernels.latent_topk.LatentTopK`
(k = 12 · 21 = 252 candidates per latent, enough for 12 greedy non-overlapping peaks: each pick
excludes at most 21 positions), giving every latent's maximum (liveness) and top peaks;
``stream_windows`` streams them a second time for the chosen latents only, keeping per latent the
IW keys (7 · 21 candidates suffice for the same reason) and the activations of every window it
will need. ``sample_windows`` is the reference implementation on a dense ``acts_NL`` array; the
streamed result equals it (tests), up to the order of exactly tied activations.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from saelib.kernels.latent_topk import LatentTopK, LatentTopKResult

#: Roles a window can play (protocol §3).
ROLES = ("top", "iw", "random")

#: NumPy seed-sequence streams, so that each use of the seed draws independent numbers.
STREAM_LATENTS, STREAM_RANDOM, STREAM_CONCEPTS, STREAM_SPLIT = 0, 1, 2, 3

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class WindowSpec:
    """How many windows of each kind, their half-width and the seed (protocol §3 defaults)."""

    radius: int = 10
    n_top: int = 12
    n_iw: int = 7
    n_random: int = 10
    seed: int = 0

    def validate(self) -> None:
        for name in ("radius", "n_top", "n_iw", "n_random"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"WindowSpec.{name} must be an int >= 0, got {value!r}")
        if self.n_top < 1:
            raise ValueError(f"WindowSpec.n_top must be >= 1, got {self.n_top}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"WindowSpec.seed must be an int >= 0, got {self.seed!r}")

    def width(self, context_len: int) -> int:
        """Tokens per window: 2·radius + 1, or the whole context when it is shorter."""
        return min(2 * self.radius + 1, context_len)


@dataclass(frozen=True)
class Window:
    """One window of one latent: where it is, its token ids and the latent's activations on them.

    ``start``/``end`` are the half-open token range in context ``context``; ``centre`` is the
    position the window was chosen for. ``acts`` are 0 at BOS/PAD/EOS positions.
    """

    role: str
    context: int
    centre: int
    start: int
    end: int
    token_ids: tuple[int, ...]
    acts: tuple[float, ...]

    @property
    def peak(self) -> float:
        """The activation at the centre (what the top/IW rules ranked)."""
        return self.acts[self.centre - self.start]

    @property
    def max_act(self) -> float:
        """The largest activation in the window (what the detection truth tests)."""
        return max(self.acts) if self.acts else 0.0


@dataclass(frozen=True)
class LatentWindows:
    """All windows of one latent plus its maximum activation over the corpus (m_f, §3–4)."""

    latent: int
    max_act: float
    top: tuple[Window, ...]
    iw: tuple[Window, ...]
    random: tuple[Window, ...]


def window_bounds(centre: int, context_len: int, radius: int) -> tuple[int, int]:
    """The half-open range of the window around ``centre``, shifted to lie inside the context."""
    if not 0 <= centre < context_len:
        raise ValueError(f"centre must be in [0, {context_len}), got {centre}")
    width = min(2 * radius + 1, context_len)
    start = min(max(centre - radius, 0), context_len - width)
    return start, start + width


def centre_mask_NL(tokens_NL: np.ndarray, special_ids: Iterable[int] = (),
                   bos_at_start: bool = True) -> np.ndarray:
    """True where a token may be a window centre: not a special token (BOS/PAD/EOS).

    ``bos_at_start`` also excludes position 0 of every context, where the protocol's corpus puts
    BOS, whatever its id.
    """
    tokens_NL = _check_tokens(tokens_NL)
    special = np.fromiter((int(t) for t in special_ids), dtype=np.int64)
    valid_NL = ~np.isin(tokens_NL, special)
    if bos_at_start:
        valid_NL[:, 0] = False
    return valid_NL


def _check_tokens(tokens_NL: np.ndarray) -> np.ndarray:
    tokens_NL = np.asarray(tokens_NL)
    if tokens_NL.ndim != 2 or tokens_NL.shape[0] < 1 or tokens_NL.shape[1] < 1:
        raise ValueError(f"tokens_NL must be a non-empty 2-D array (contexts × positions), "
                         f"got shape {tokens_NL.shape}")
    if not np.issubdtype(tokens_NL.dtype, np.integer):
        raise ValueError(f"tokens_NL must hold integer token ids, got dtype {tokens_NL.dtype}")
    return tokens_NL


# ----------------------------------------------------------------------------- codes sources


class CodesSource(ABC):
    """The SAE's codes over the eval corpus, chunk by chunk, in context order.

    Each chunk is a tensor ``codes_bLF`` (b whole contexts × L positions × width F); the chunks
    together cover the ``tokens_NL`` the caller passes alongside. Iterating twice must give the
    same codes (AutoInterp streams twice).
    """

    width: int

    @abstractmethod
    def chunks(self) -> Iterator[torch.Tensor]:
        """Yield ``codes_bLF`` chunks covering the corpus in order."""


class ArrayCodes(CodesSource):
    """Codes already in memory (``codes_NLF``): small corpora, tests, notebooks."""

    def __init__(self, codes_NLF: np.ndarray | torch.Tensor, contexts_per_chunk: int = 64) -> None:
        codes_NLF = torch.as_tensor(codes_NLF)
        if codes_NLF.ndim != 3 or not codes_NLF.is_floating_point():
            raise ValueError(f"codes_NLF must be a 3-D float array (contexts × positions × "
                             f"latents), got {codes_NLF.dtype} {tuple(codes_NLF.shape)}")
        if contexts_per_chunk < 1:
            raise ValueError(f"contexts_per_chunk must be >= 1, got {contexts_per_chunk}")
        self.codes_NLF = codes_NLF
        self.width = int(codes_NLF.shape[2])
        self.contexts_per_chunk = contexts_per_chunk

    def chunks(self) -> Iterator[torch.Tensor]:
        for c0 in range(0, self.codes_NLF.shape[0], self.contexts_per_chunk):
            yield self.codes_NLF[c0:c0 + self.contexts_per_chunk]


class EncodedCodes(CodesSource):
    """Codes computed on the fly: ``encode_fn(acts_BD) -> codes_BF`` over eval activation chunks.

    ``acts_chunks`` returns a fresh iterable of activation chunks each time it is called, each of
    shape ``(b, L, D)`` or ``(b·L, D)`` (whole contexts, in order). Encoding runs under
    ``torch.inference_mode``; activations are moved to ``device`` when given.
    """

    def __init__(self, encode_fn: Callable[[torch.Tensor], torch.Tensor],
                 acts_chunks: Callable[[], Iterable[torch.Tensor | np.ndarray]],
                 context_len: int, width: int, device: str | torch.device | None = None) -> None:
        if context_len < 1 or width < 1:
            raise ValueError(f"context_len and width must be >= 1, got {context_len}, {width}")
        self.encode_fn = encode_fn
        self.acts_chunks = acts_chunks
        self.context_len = context_len
        self.width = width
        self.device = device

    def chunks(self) -> Iterator[torch.Tensor]:
        L = self.context_len
        for acts in self.acts_chunks():
            acts = torch.as_tensor(acts)
            if self.device is not None:
                acts = acts.to(self.device)
            if acts.ndim == 3:
                if acts.shape[1] != L:
                    raise ValueError(f"activation chunk has context length {acts.shape[1]}, "
                                     f"expected {L}")
                acts_BD = acts.reshape(-1, acts.shape[2])
            elif acts.ndim == 2 and acts.shape[0] % L == 0:
                acts_BD = acts
            else:
                raise ValueError(f"activation chunks must be (b, {L}, D) or (b·{L}, D), "
                                 f"got shape {tuple(acts.shape)}")
            with torch.inference_mode():
                codes_BF = self.encode_fn(acts_BD)
            if codes_BF.shape != (acts_BD.shape[0], self.width):
                raise ValueError(f"encode_fn returned shape {tuple(codes_BF.shape)}, expected "
                                 f"({acts_BD.shape[0]}, {self.width})")
            yield codes_BF.reshape(-1, L, self.width)


def _iter_checked(source: CodesSource, N: int, L: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first context index, codes_bLF) and check the chunks tile the corpus exactly."""
    c0 = 0
    for codes_bLF in source.chunks():
        codes_bLF = torch.as_tensor(codes_bLF)
        if codes_bLF.ndim != 3 or codes_bLF.shape[1] != L or codes_bLF.shape[2] != source.width:
            raise ValueError(f"codes chunk must have shape (b, {L}, {source.width}), "
                             f"got {tuple(codes_bLF.shape)}")
        if c0 + codes_bLF.shape[0] > N:
            raise ValueError(f"codes source yields more than the {N} contexts of tokens_NL")
        yield c0, codes_bLF
        c0 += codes_bLF.shape[0]
    if c0 != N:
        raise ValueError(f"codes source yielded {c0} contexts but tokens_NL has {N}")


def gather_codes(source: CodesSource, latents: Sequence[int], n_contexts: int,
                 context_len: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense codes ``codes_SNL`` of a few latents (plots, checks): one pass, S × N × L."""
    lat = torch.as_tensor(list(latents), dtype=torch.int64)
    out_SNL = torch.zeros((len(lat), n_contexts, context_len), dtype=dtype)
    for c0, codes_bLF in _iter_checked(source, n_contexts, context_len):
        b = codes_bLF.shape[0]
        out_SNL[:, c0:c0 + b] = codes_bLF[..., lat.to(codes_bLF.device)].permute(2, 0, 1).to(
            device="cpu", dtype=dtype)
    return out_SNL


# ----------------------------------------------------------------------------- randomness


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors; every product stays below 2**63."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def hashed_uniform(seed: int, latents: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A uniform in (0, 1) per (seed, latent, corpus position), float64: chunk-independent."""
    seed_t = torch.tensor([seed & _MASK32, (seed >> 32) & _MASK32], dtype=torch.int64)
    s = _mix32(seed_t[0:1] ^ _mix32(seed_t[1:2])).to(positions.device)
    pos = positions.to(torch.int64)
    h = _mix32(latents.to(torch.int64) ^ s)
    h = _mix32((pos >> 32) ^ h)
    h = _mix32((pos & _MASK32) ^ h)
    return (h.double() + 0.5) / 2.0**32


def iw_keys(seed: int, latents: torch.Tensor, positions: torch.Tensor,
            acts: torch.Tensor) -> torch.Tensor:
    """Efraimidis–Spirakis keys log(u)/a: descending key order = sampling ∝ a, no replacement."""
    return torch.log(hashed_uniform(seed, latents, positions)) / acts.double()


def random_positions(valid_flat: np.ndarray, n_random: int, seed: int, latent: int) -> np.ndarray:
    """``n_random`` flat positions drawn uniformly without replacement among valid centres."""
    rng = np.random.default_rng([seed, STREAM_RANDOM, latent])
    k = min(n_random, len(valid_flat))
    return valid_flat[rng.choice(len(valid_flat), size=k, replace=False)]


# ----------------------------------------------------------------------------- selection rules


def _greedy(order_pos: Iterable[int], L: int, radius: int, n: int,
            blocked: dict[int, list[tuple[int, int]]] | None = None) -> list[int]:
    """Take positions in the given order, skipping centres inside a taken (or blocked) window.

    Positions are flat (context · L + position); returns at most ``n`` of them, in order.
    """
    taken: list[int] = []
    windows: dict[int, list[tuple[int, int]]] = {}
    for p in order_pos:
        if len(taken) >= n:
            break
        ctx, c = divmod(int(p), L)
        if any(s <= c < e for s, e in windows.get(ctx, ())):
            continue
        if blocked is not None and any(s <= c < e for s, e in blocked.get(ctx, ())):
            continue
        taken.append(int(p))
        windows.setdefault(ctx, []).append(window_bounds(c, L, radius))
    return taken


def _windows_by_context(positions: Iterable[int], L: int,
                        radius: int) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {}
    for p in positions:
        ctx, c = divmod(int(p), L)
        out.setdefault(ctx, []).append(window_bounds(c, L, radius))
    return out


def _make_window(role: str, pos: int, tokens_NL: np.ndarray, radius: int,
                 acts: Sequence[float]) -> Window:
    L = tokens_NL.shape[1]
    ctx, c = divmod(int(pos), L)
    s, e = window_bounds(c, L, radius)
    return Window(role=role, context=ctx, centre=c, start=s, end=e,
                  token_ids=tuple(int(t) for t in tokens_NL[ctx, s:e]),
                  acts=tuple(float(a) for a in acts))


def sample_windows(acts_NL: np.ndarray, tokens_NL: np.ndarray, latent: int,
                   spec: WindowSpec = WindowSpec(), special_ids: Iterable[int] = (),
                   bos_at_start: bool = True) -> LatentWindows:
    """Reference sampler for one latent from its dense activations ``acts_NL`` (protocol §3).

    ``latent`` only seeds the randomness (so a latent gets the same windows here and in
    :func:`stream_windows`). Activations at special positions are zeroed first.
    """
    spec.validate()
    tokens_NL = _check_tokens(tokens_NL)
    acts_NL = np.asarray(acts_NL, dtype=np.float32)
    if acts_NL.shape != tokens_NL.shape:
        raise ValueError(f"acts_NL shape {acts_NL.shape} differs from tokens_NL {tokens_NL.shape}")
    N, L = tokens_NL.shape
    valid_NL = centre_mask_NL(tokens_NL, special_ids, bos_at_start)
    acts_NL = np.where(valid_NL, acts_NL, np.float32(0.0))
    flat = acts_NL.ravel()
    max_act = float(max(flat.max(), 0.0))

    order = np.argsort(-flat, kind="stable")
    order = order[flat[order] > 0]
    top = _greedy(order, L, spec.radius, spec.n_top)

    iw: list[int] = []
    if top:
        threshold = min(flat[p] for p in top)
        blocked = _windows_by_context(top, L, spec.radius)
        cand = np.flatnonzero((flat > 0) & (flat < threshold))
        if len(cand):
            keys = iw_keys(spec.seed, torch.full((len(cand),), latent, dtype=torch.int64),
                           torch.as_tensor(cand), torch.as_tensor(flat[cand])).numpy()
            iw = _greedy(cand[np.argsort(-keys, kind="stable")], L, spec.radius, spec.n_iw,
                         blocked=blocked)

    rnd = random_positions(np.flatnonzero(valid_NL.ravel()), spec.n_random, spec.seed, latent)

    def build(role: str, positions: Iterable[int]) -> tuple[Window, ...]:
        out = []
        for p in positions:
            ctx, c = divmod(int(p), L)
            s, e = window_bounds(c, L, spec.radius)
            out.append(_make_window(role, p, tokens_NL, spec.radius, acts_NL[ctx, s:e]))
        return tuple(out)

    return LatentWindows(latent=int(latent), max_act=max_act, top=build("top", top),
                         iw=build("iw", iw), random=build("random", rnd))


# ----------------------------------------------------------------------------- streaming


def scan_top(source: CodesSource, valid_NL: np.ndarray, spec: WindowSpec = WindowSpec(),
             backend: str = "auto") -> LatentTopKResult:
    """Pass 1 over all latents: each latent's ``(2r+1)·n_top`` largest activations and positions.

    Positions are flat corpus indices (context · L + position); special positions count 0.
    ``vals_KF[0]`` is every latent's maximum: > 0 means live on this corpus.
    """
    N, L = valid_NL.shape
    k = spec.width(L) * spec.n_top
    topk: LatentTopK | None = None
    for c0, codes_bLF in _iter_checked(source, N, L):
        b = codes_bLF.shape[0]
        dev = codes_bLF.device
        if topk is None:
            topk = LatentTopK(source.width, k, device=dev, backend=backend)
        valid_bL = torch.as_tensor(valid_NL[c0:c0 + b], device=dev)
        codes_BF = (codes_bLF.float() * valid_bL[..., None]).reshape(b * L, source.width)
        topk.update(codes_BF, torch.arange(c0 * L, (c0 + b) * L, device=dev))
    assert topk is not None  # _iter_checked guarantees at least one chunk (N >= 1)
    return topk.result()


def stream_windows(source: CodesSource, tokens_NL: np.ndarray, valid_NL: np.ndarray,
                   latents: Sequence[int], top: LatentTopKResult,
                   spec: WindowSpec = WindowSpec()) -> list[LatentWindows]:
    """Pass 2 for the chosen latents: top peaks from ``top`` (pass 1), IW keys and window acts.

    Memory: per latent ``n_iw·(2r+1)`` IW candidates and their windows, plus its ≤ n_top +
    n_random requested windows; per chunk, the codes and IW keys of the chosen latents (b·L × S,
    float32 and float64).
    """
    spec.validate()
    tokens_NL = _check_tokens(tokens_NL)
    N, L = tokens_NL.shape
    W = spec.width(L)
    S = len(latents)
    lat_np = np.asarray(latents, dtype=np.int64)
    vals_KS = top.vals_KF[:, lat_np].cpu().numpy()
    pos_KS = top.pos_KF[:, lat_np].cpu().numpy()
    valid_flat = np.flatnonzero(valid_NL.ravel())
    if S == 0:
        return []

    # Top peaks (greedy on pass-1 candidates), IW thresholds and the windows to fetch.
    top_pos: list[list[int]] = []
    rnd_pos: list[np.ndarray] = []
    threshold_S = np.zeros(S, dtype=np.float32)
    req_s, req_p = [], []
    blk_s, blk_p = [], []
    for s in range(S):
        keep = vals_KS[:, s] > 0
        peak_val = dict(zip(pos_KS[keep, s].tolist(), vals_KS[keep, s].tolist()))
        peaks = _greedy(pos_KS[keep, s], L, spec.radius, spec.n_top)
        top_pos.append(peaks)
        if peaks:
            threshold_S[s] = min(peak_val[p] for p in peaks)
        rnd = random_positions(valid_flat, spec.n_random, spec.seed, int(lat_np[s]))
        rnd_pos.append(rnd)
        for p in list(peaks) + list(rnd):
            req_s.append(s)
            req_p.append(p)
        for p in peaks:
            blk_s.append(s)
            blk_p.append(p)

    device = None
    req_s_t = torch.as_tensor(req_s, dtype=torch.int64)
    req_p_t = torch.as_tensor(req_p, dtype=torch.int64)
    req_win = torch.zeros((len(req_s), W), dtype=torch.float32)
    blk_s_t = torch.as_tensor(blk_s, dtype=torch.int64)
    blk_p_t = torch.as_tensor(blk_p, dtype=torch.int64)
    K2 = max(spec.n_iw * W, 1)
    iw_key = iw_pos = iw_win = None
    arange_W = torch.arange(W)

    def starts(pos_flat: torch.Tensor) -> torch.Tensor:
        """Flat index of each window's first token (shifted windows, see window_bounds)."""
        ctx, c = pos_flat // L, pos_flat % L
        return ctx * L + (c - spec.radius).clamp(0, L - W)

    for c0, codes_bLF in _iter_checked(source, N, L):
        b = codes_bLF.shape[0]
        dev = codes_bLF.device
        if device is None:
            device = dev
            lat_t = torch.as_tensor(lat_np, device=dev)
            thr_t = torch.as_tensor(threshold_S, device=dev)
            iw_key = torch.full((S, K2), float("-inf"), dtype=torch.float64, device=dev)
            iw_pos = torch.full((S, K2), -1, dtype=torch.int64, device=dev)
            iw_win = torch.zeros((S, K2, W), dtype=torch.float32, device=dev)
            arange_W = arange_W.to(dev)
        valid_bL = torch.as_tensor(valid_NL[c0:c0 + b], device=dev)
        v_SB = (codes_bLF[..., lat_t].float() * valid_bL[..., None]).reshape(b * L, S).T
        v_SB = v_SB.contiguous()
        lo, hi = c0 * L, (c0 + b) * L

        # Windows of top peaks and random centres that lie in this chunk.
        in_chunk = (req_p_t >= lo) & (req_p_t < hi)
        if in_chunk.any():
            rows = req_s_t[in_chunk].to(dev)
            idx = (starts(req_p_t[in_chunk].to(dev)) - lo)[:, None] + arange_W
            req_win[in_chunk] = v_SB[rows[:, None], idx].cpu()

        # IW candidates: 0 < a < smallest top peak, centre in no top window, valid centre.
        elig_SB = (v_SB > 0) & (v_SB < thr_t[:, None])
        in_chunk = (blk_p_t >= lo) & (blk_p_t < hi)
        if in_chunk.any():
            rows = blk_s_t[in_chunk].to(dev)
            idx = (starts(blk_p_t[in_chunk].to(dev)) - lo)[:, None] + arange_W
            elig_SB[rows[:, None].expand_as(idx), idx] = False
        s_i, b_i = elig_SB.nonzero(as_tuple=True)
        if s_i.numel() == 0:
            continue
        key_SB = torch.full((S, b * L), float("-inf"), dtype=torch.float64, device=dev)
        key_SB[s_i, b_i] = iw_keys(spec.seed, lat_t[s_i], b_i + lo, v_SB[s_i, b_i])
        kk = min(K2, b * L)
        cand_key, cand_b = torch.topk(key_SB, kk, dim=1)
        cand_idx = (starts(cand_b + lo) - lo)[..., None] + arange_W
        cand_win = torch.gather(v_SB, 1, cand_idx.reshape(S, -1)).reshape(S, kk, W)
        cand_pos = torch.where(torch.isinf(cand_key), torch.full_like(cand_b, -1), cand_b + lo)
        all_key = torch.cat([iw_key, cand_key], dim=1)
        iw_key, take = torch.topk(all_key, K2, dim=1)
        iw_pos = torch.gather(torch.cat([iw_pos, cand_pos], dim=1), 1, take)
        iw_win = torch.gather(torch.cat([iw_win, cand_win], dim=1), 1,
                              take[..., None].expand(S, K2, W))

    assert iw_key is not None and iw_pos is not None and iw_win is not None
    iw_key_np = iw_key.cpu().numpy()
    iw_pos_np = iw_pos.cpu().numpy()
    iw_win_np = iw_win.cpu().numpy()
    req_win_np = req_win.numpy()

    out: list[LatentWindows] = []
    r = 0
    for s in range(S):
        latent = int(lat_np[s])
        n_top, n_rnd = len(top_pos[s]), len(rnd_pos[s])
        top_w = tuple(_make_window("top", p, tokens_NL, spec.radius, req_win_np[r + j])
                      for j, p in enumerate(top_pos[s]))
        rnd_w = tuple(_make_window("random", p, tokens_NL, spec.radius,
                                   req_win_np[r + n_top + j])
                      for j, p in enumerate(rnd_pos[s]))
        r += n_top + n_rnd
        live = np.isfinite(iw_key_np[s])
        by_pos = {int(p): j for j, p in enumerate(iw_pos_np[s]) if live[j]}
        iw = _greedy(iw_pos_np[s][live], L, spec.radius, spec.n_iw,
                     blocked=_windows_by_context(top_pos[s], L, spec.radius))
        iw_w = tuple(_make_window("iw", p, tokens_NL, spec.radius, iw_win_np[s, by_pos[p]])
                     for p in iw)
        max_act = float(max(vals_KS[0, s], 0.0)) if np.isfinite(vals_KS[0, s]) else 0.0
        out.append(LatentWindows(latent=latent, max_act=max_act, top=top_w, iw=iw_w,
                                 random=rnd_w))
    return out
