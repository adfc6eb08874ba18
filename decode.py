"""
Read a user's category interests back out of an exported user vector.

With `ModelConfig.exact_categories` (the default), the category half of a user vector (its last
`cfg.category_size` entries: `ModelConfig.category_dim`, half of them by default) is the pool alone: the
normalised sum, over the user's recent events, of each event's category code (the category half of
`FeatureEmbedding.target`) times a recency weight (learned, times 2 ** -(age / category_half_life)
with `ModelConfig.category_half_life`, the default), over the events of the user's `ModelConfig.category_top`
heaviest categories only (10 by default; 0: all). That is a non-negative combination of a few of the many codes,
so non-negative least squares over the codes recovers each category's pooled weight - exactly while the
categories in the sketch are few for the half's size (64 floats carry 10 of them; with every recent category
in the sketch, UserBehavior's users have 18 in the median, and decoding blurs), approximately beyond. Where the
least-squares solution uses more codes than the sketch holds (`max_categories`) and than half the dimensions, the
sketch has another exact solution, the user's: a search for it follows (see _sparsest, _sparser). A dot product with
the codes (cosine scoring) can only blur those weights: `quality.py --capacity` measures both. With
`ModelConfig.category_idf` the pool also weighs each category's events by a scale (an IDF over the training users);
`category_codes` returns the codes times it and `shares` divides it back out, so the shares are the plain ones.

    import decode, model_io
    model, vocab, _ = model_io.load_model('saved_models')
    user_ids, vectors, _ = model_io.load_vectors('saved_models')     # or vectors read from Redis
    codes = decode.category_codes(model)                     # once per model: (categories, model.cfg.category_size)
    shares = decode.category_weights(vectors, codes, max_categories=model.cfg.category_top)   # (users, categories)
    top = vocab.categories[shares[0].argsort()[::-1][:10]]   # user 0's 10 heaviest raw category ids

Column j of `codes` / `shares` is vocabulary index j + 2 (0 is padding, 1 the unknown category), i.e. the raw
category id vocab.categories[j].
"""
from __future__ import annotations

import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from scipy.optimize import linprog, nnls
from tqdm.auto import tqdm

FIRST = 2           # vocabulary index of the first real category (0: padding, 1: unknown)
# Decoded weights below a noise floor (a share of the row's largest) are set to 0, so the categories a user never had
# tie at 0 and rankings break the tie by popularity, as user_freq does. The floor is DROP, or the float32 rounding of the
# vectors (ROUNDOFF: the model exports float32, and JSON in Redis keeps float32's digits) amplified by the codes'
# conditioning (largest / smallest kept singular value), whichever is larger. Trained codes keep a trace (~1e-4 of the
# largest singular value, above SPAN) of the direction their LayerNorm centres away: the floor is then ~5e-4, where
# trained demo models' noise reached 5e-5 (~20 such weights per user, which outranked the popularity tie-break); real
# shares at the defaults are >= ~2.3e-3 of the largest (the oldest of 100 events, 2 ** (-99 / 30) of the newest,
# against all 100). Well-conditioned codes keep DROP, so tiny real shares (long half-lives in hours) survive.
DROP = 1e-6
ROUNDOFF = 2.0 ** -24
ROUND = 9           # shares are rounded to 1e-9, so float noise cannot reorder equal weights
# a sketch of few categories decoded densely: a beam of BEAM supports searches for an exact one (residual under EXACT
# of the sketch; float32 rounding leaves ~2e-7 on UserBehavior's users), see _sparsest
BEAM = 10
EXACT = 1e-5
UNEQUAL = 1e-4      # codes whose lengths differ by more than this share are solved at one length (see shares)
SPAN = 1e-4         # directions where the codes' singular value is below this share of the largest do not count
# below this many sketches x categories (~10 s of solving) everything is solved in this process: a worker's start-up
# (a fresh interpreter that imports the calling script's modules, e.g. torch: 1-3 s) would cost more than it saves
PARALLEL_MIN_WORK = 1_000_000
MAX_WORKERS = 8     # worker processes at most
CHUNKS_PER_WORKER = 4


def category_half(vectors: np.ndarray, size: int | None = None) -> np.ndarray:
    """The category half of user (or target) vectors (..., hidden_dim): their last `size` entries (the model's
    cfg.category_size; default hidden_dim // 2, the size before `ModelConfig.category_dim`)."""
    vectors = np.asarray(vectors)
    size = vectors.shape[-1] // 2 if size is None else size
    return vectors[..., vectors.shape[-1] - size:]


def category_codes(model) -> np.ndarray:
    """(n_categories - 2, cfg.category_size) float64: the category half of the target vector of every real
    category (vocabulary index 2.., an unknown item), as the pool sums them. Raises ValueError for models whose
    category half is not the pool alone (saved before `exact_categories`, or trained without it)."""
    import torch    # here, not at the top: decoding workers import this module and need only numpy and scipy
    cfg = model.cfg
    if not getattr(cfg, 'exact_categories', False):
        raise ValueError('this model mixes its [CLS] output into the category half (exact_categories is off): '
                         'its vectors cannot be decoded; score categories by cosine instead')
    fe = model.feature_embedding
    index = torch.arange(FIRST, cfg.n_categories, device=fe.category.weight.device)
    with torch.no_grad():
        target = fe.target(torch.ones_like(index), index)                  # item 1: the unknown item
    return scaled(category_half(target.float().cpu().numpy(), cfg.category_size).astype(np.float64), model)


def category_scale(model) -> np.ndarray | None:
    """(n_categories - 2,) float64: the weight the model's pool gives each real category's events (its
    ModelConfig.category_idf weighting), or None for models without one."""
    if not getattr(model.cfg, 'category_idf', 0.0):
        return None
    return model.feature_embedding.category_scale[FIRST:].detach().double().cpu().numpy()


def scaled(codes: np.ndarray, model) -> np.ndarray:
    """codes (n_categories - 2, d) of the model's real categories (the category half of their target vectors) as
    its pool sums them: times category_scale, when the model has one."""
    scale = category_scale(model)
    return codes if scale is None else np.asarray(codes, np.float64) * scale[:, None]


def category_weights(vectors: np.ndarray, codes: np.ndarray, *, max_categories: int = 0, workers: int = 1,
                     progress: bool = False, desc: str = 'decoding categories') -> np.ndarray:
    """(N, C) each user's category shares decoded from vectors (N, hidden_dim) with codes (C, d), d the size of
    the category half: `shares` of the vectors' last d entries (max_categories, workers, progress, desc: as there;
    pass the model's cfg.category_top as max_categories)."""
    vectors, d = np.asarray(vectors), np.shape(codes)[-1]
    if vectors.shape[-1] <= d:
        raise ValueError(f'vectors have {vectors.shape[-1]} floats: too few for a {d}-float category half '
                         f'beside an item half')
    return shares(category_half(vectors, d), codes, max_categories=max_categories, workers=workers,
                  progress=progress, desc=desc)


def default_workers() -> int:
    """Worker processes for decoding: the CPUs this process may run on, at most MAX_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:              # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def _solve(a: np.ndarray, ys: np.ndarray, floor: float = DROP, max_categories: int = 0) -> np.ndarray:
    """(len(ys), C) a non-negative solution w of a @ w = y for each row y of ys (len(ys) >= 1): the least-squares one
    (nnls), or, where it has more weights than max_categories (when given) and than half the rank of a, an exact one
    of at most max_categories columns (_sparsest), else the minimum-sum exact one if it has fewer weights (_sparser);
    weights under floor x the row's largest are 0."""
    out = []
    for y in ys:
        w = _above(nnls(a, y, maxiter=20 * a.shape[1])[0], floor)
        if max_categories and np.count_nonzero(w) > max(max_categories, a.shape[0] // 2):
            x = _sparsest(a, y, max_categories)
            w = _above(x, floor) if x is not None else _sparser(a, y, w, floor)
        out.append(w)
    return np.stack(out)


def _sparsest(a: np.ndarray, y: np.ndarray, k: int, width: int = BEAM) -> np.ndarray | None:
    """An exact non-negative combination of at most k columns of a (residual under EXACT x |y|), or None when the
    search finds none. A beam search over supports: each step grows each of the `width` supports with the smallest
    residuals by one of the `width` columns most correlated with its residual. Where k <= rank / 2 such a
    combination is the only one (codes in general position), so whatever it finds is the user's."""
    limit = EXACT * np.linalg.norm(y)
    beams: dict[tuple, np.ndarray] = {(): y}                    # support -> its residual
    for _ in range(k):
        grown: dict[tuple, tuple[float, np.ndarray]] = {}
        for support, residual in beams.items():
            corr = a.T @ residual
            corr[list(support)] = -np.inf
            for j in np.argsort(-corr)[:width]:
                wider = tuple(sorted(support + (int(j),)))
                if corr[j] <= 0 or wider in grown:
                    continue
                z, norm = nnls(a[:, wider], y)
                if (z <= 0).any():                                # a column that does not help
                    continue
                if norm <= limit:
                    x = np.zeros(a.shape[1])
                    x[list(wider)] = z
                    return x
                grown[wider] = (norm, y - a[:, wider] @ z)
        if not grown:
            return None
        best = sorted(grown, key=lambda support: grown[support][0])[:width]
        beams = {support: grown[support][1] for support in best}
    return None


def _above(w: np.ndarray, floor: float) -> np.ndarray:
    """w with the weights under floor x its largest set to 0."""
    return np.where(w >= floor * w.max(initial=0.0), w, 0.0)


def _sparser(a: np.ndarray, y: np.ndarray, w: np.ndarray, floor: float) -> np.ndarray:
    """The minimum-sum non-negative exact solution of a @ x = y (a linear programme) when it has fewer weights above
    the floor than w, else w.

    A sketch of k codes is the only non-negative combination of at most r / 2 of them (r the rank of a, codes in
    general position): two different exact solutions would together need r + 1 codes. nnls returns one exact
    solution; when it has more than r / 2 weights, a sparser one may exist, and the user's real k categories are it.
    nnls's active set then wanders onto a dense one (UserBehavior, learned codes: 2-5% of users, with 54-64
    weights instead of 10). The minimum-sum solution is a vertex with few weights and often the planted one.
    """
    res = linprog(np.ones(a.shape[1]), A_eq=a, b_eq=y, bounds=(0, None), method='highs')
    if res.status != 0:                 # e.g. float noise left no exact solution: keep nnls's
        return w
    x = _above(np.maximum(res.x, 0.0), floor)
    return x if np.count_nonzero(x) < np.count_nonzero(w) else w


def shares(sketches: np.ndarray, codes: np.ndarray, *, max_categories: int = 0, workers: int = 1,
           progress: bool = False, desc: str = 'decoding categories') -> np.ndarray:
    """(N, C) the non-negative least-squares solution w of codes.T @ w = sketch for each of sketches (N, d),
    codes (C, d), scaled to sum 1 (all-zero for an all-zero sketch: a user with no events). Exact when the
    sketch is a non-negative combination of few enough codes; otherwise the closest such combination. Weights under
    the float noise floor (see ROUNDOFF) are 0: categories the user does not have tie there.

    max_categories: the most categories a sketch holds (the model's cfg.category_top; 0: not known). Where the
    solution has more weights than that and than half the codes' rank, it is not the user's: a beam search looks for
    an exact combination of at most max_categories codes (_sparsest; the only one there is), and failing that the
    minimum-sum exact solution replaces it when it has fewer weights (_sparser).

    One solve per sketch: ~2 ms with 448 categories, ~35 ms with UserBehavior's 2,758 (learned codes), more with
    more; with max_categories, the search (and at times a linear programme, ~0.2 s with 2,758) for each sketch whose
    solution is too dense (2-5% of UserBehavior's users at the defaults). Without it, sketches of more categories than half the rank
    (e.g. a model without category_top) would almost all take that second solve. workers > 1 spreads them over
    that many processes (default_workers(): the CPUs, at most MAX_WORKERS) when there are at least
    PARALLEL_MIN_WORK sketches x categories; the result does not depend on it. The workers are spawned, so a script that calls this with workers > 1 needs the `if __name__ == '__main__':`
    guard (a notebook does not). progress: a progress bar over the sketches, labelled desc."""
    if workers < 1:
        raise ValueError(f'workers must be >= 1, got {workers}')
    sketches = np.asarray(sketches, np.float64)
    codes = np.asarray(codes, np.float64)
    if sketches.shape[-1] != codes.shape[-1]:
        raise ValueError(f'vectors have a {sketches.shape[-1]}-float category half, codes {codes.shape[-1]} floats')
    # codes of different lengths (a model with category_idf: the pool weighs each category's events by its scale)
    # are solved for at one length and the scale divided back out, so the shares are the users' plain ones and the
    # floors below act as they do for equal codes
    norms = np.linalg.norm(codes, axis=1)
    scale = np.where(norms > 0, norms / max(norms.max(initial=0.0), np.finfo(np.float64).tiny), 1.0)
    if np.abs(scale - 1.0).max(initial=0.0) > UNEQUAL:
        codes = codes / scale[:, None]
    else:                   # unit codes up to float32 rounding: solved as they are
        scale = np.ones(len(codes))
    # solve inside the span of the codes: an untrained model's codes, for one, span only d - 1 directions (the
    # LayerNorm before the projection centres them), and float32 noise off that span would need huge weights
    u, sv, _ = np.linalg.svd(codes.T, full_matrices=False)
    kept = sv > SPAN * sv.max(initial=0.0)
    basis = u[:, kept]                                                      # (d, r)
    floor = max(DROP, ROUNDOFF * sv.max() / sv[kept].min()) if kept.any() else DROP
    a = np.ascontiguousarray(basis.T @ codes.T)                             # (r, C)
    ys = sketches @ basis                                                   # (N, r)
    rows = np.flatnonzero(np.any(ys != 0, axis=1))                         # all-zero sketches stay zero
    out = np.zeros((len(sketches), len(codes)))
    bar = tqdm(total=len(rows), desc=desc, unit='user', disable=not progress)
    in_workers = workers > 1 and len(rows) * len(codes) >= PARALLEL_MIN_WORK
    if in_workers:   # spawn, not fork: the caller may hold torch's threads, which a forked child can deadlock on
        chunks = [c for c in np.array_split(rows, workers * CHUNKS_PER_WORKER) if len(c)]
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn')) as pool:
                for chunk, solved in zip(chunks, pool.map(_solve, [a] * len(chunks), [ys[c] for c in chunks],
                                                          [floor] * len(chunks), [max_categories] * len(chunks))):
                    out[chunk] = solved
                    bar.update(len(chunk))
        except (BrokenProcessPool, OSError) as e:   # e.g. no way to start processes here: the same, slower
            warnings.warn(f'decode: worker processes failed ({type(e).__name__}: {e}); solving in this process')
            bar.reset()
            in_workers = False
    if not in_workers:
        for i in rows:
            out[i] = _solve(a, ys[i:i + 1], floor, max_categories)[0]
            bar.update(1)
    bar.close()
    out /= scale
    total = out.sum(1, keepdims=True)
    return np.round(np.divide(out, total, out=np.zeros_like(out), where=total > 0), ROUND)
