"""decode.py: a user's category shares read back out of the vector's category half."""
import numpy as np
import pytest
import torch

import decode
from DeepSeekMoE import MoEConfig
from LongTermInterestModel import LongTermInterestModel, ModelConfig

N_CATS = 40                     # table rows: 0 padding, 1 unknown, 2..39 real categories


def planted(n_users=200, n_codes=300, dim=32, support=4, seed=0):
    """Random unit codes, each user a few random positive weights; (vectors with a random item half, codes,
    the true shares)."""
    rng = np.random.default_rng(seed)
    codes = rng.standard_normal((n_codes, dim))
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    w = np.zeros((n_users, n_codes))
    for row in w:
        row[rng.choice(n_codes, support, replace=False)] = rng.uniform(0.1, 1.0, support)
    vectors = np.concatenate([rng.standard_normal((n_users, dim)), 3.0 * w @ codes], axis=1)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)        # scale and item half do not matter
    return vectors, codes, w / w.sum(1, keepdims=True)


def with_weak_direction(codes, scale, seed):
    """codes (C, d) plus one more direction with entries ~ scale (a trace of it, as a LayerNorm leaves), all turned
    by a random rotation so that direction is no axis: (C, d + 1)."""
    rng = np.random.default_rng(seed)
    weak = np.concatenate([codes, scale * rng.standard_normal((len(codes), 1))], 1)
    return weak @ np.linalg.qr(rng.standard_normal((weak.shape[1], weak.shape[1])))[0]


def test_sparse_shares_are_recovered_where_cosine_blurs_them():
    vectors, codes, shares = planted()
    got = decode.category_weights(vectors, codes)
    assert np.allclose(got, shares, atol=1e-6)
    assert np.allclose(got.sum(1), 1.0)
    # the order of the users' categories: decoding gets every user's right, a dot product with the codes does not
    half = decode.category_half(vectors)
    cos_order_ok = [(np.argsort(-(h @ codes.T))[:4] == np.argsort(-s)[:4]).all() for h, s in zip(half, shares)]
    dec_order_ok = [(np.argsort(-g)[:4] == np.argsort(-s)[:4]).all() for g, s in zip(got, shares)]
    assert all(dec_order_ok) and np.mean(cos_order_ok) < 0.5


def test_zero_half_decodes_to_zero_and_sizes_must_match():
    _, codes, _ = planted(n_users=1)
    got = decode.category_weights(np.zeros((2, 64)), codes)
    assert got.shape == (2, 300) and not got.any()
    with pytest.raises(ValueError, match="32 floats: too few for a 32-float category half"):
        decode.category_weights(np.ones((1, 32)), codes)
    with pytest.raises(ValueError, match="16-float category half, codes 32"):
        decode.shares(np.ones((1, 16)), codes)


def _model(exact: bool, category_dim: int = 32, fixed: bool = False, half_life: float = 0.0,
           half: int = 0, top: int = 0, idf: float = 0.0) -> LongTermInterestModel:
    """category_dim: the category embedding's size; half: ModelConfig.category_dim (0: 24 of the 48 floats)."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=30, n_categories=N_CATS, item_embedding_dim=16, category_embedding_dim=category_dim,
                      small_embedding_dim=4, width=16, depth=1, heads=2, head_dim=8, hidden_dim=48, category_dim=half,
                      dropout=0.0,
                      max_positions=16, exact_categories=exact, fixed_category_codes=fixed,
                      category_half_life=half_life, category_top=top, category_idf=idf)
    model = LongTermInterestModel(cfg, MoEConfig(dim=16, n_routed_experts=4, n_activated=2, hidden=8, dropout=0.0))
    with torch.no_grad():   # a trained-looking [CLS] head: it writes into the vector (the item half only, if exact)
        model.long_term.head.weight.normal_(0, 0.1)
        model.long_term.head.bias.normal_(0, 0.1)
    return model.eval()


def _batch(rows: list[list[int]], length: int = 12) -> dict:
    """Sequences with the given categories (right-padded), other features fixed and valid."""
    b = len(rows)
    mask = torch.zeros(b, length, dtype=torch.bool)
    cat = torch.zeros(b, length, dtype=torch.long)
    for i, r in enumerate(rows):
        mask[i, :len(r)] = True
        cat[i, :len(r)] = torch.tensor(r)
    m = mask.long()
    return {'item': (torch.arange(length) % 25 + 2) * m, 'category': cat, 'weekday': 3 * m, 'hour': 5 * m,
            'weekend': m, 'behavior': m, 'time': 0.5 * mask.unsqueeze(-1).float().expand(b, length, 2),
            'mask': mask}


# 24 = the half: the LayerNorm before the square projection centres the codes, so an untrained model's span
# only 23 directions (as the default 64-float half's do) and float32 noise off that span must not count
# fixed: random codes (ModelConfig.fixed_category_codes), 38 of them in the 24-float half
# half: a category half of 32 or 40 of the 48 floats (ModelConfig.category_dim), the item half the other 16 or 8
@pytest.mark.parametrize('category_dim, fixed, half', [(32, False, 0), (24, False, 0), (32, True, 0), (32, False, 32),
                                                       (32, True, 40)])
def test_a_users_vector_decodes_to_the_categories_of_its_events(category_dim, fixed, half):
    rows = [[5, 5, 9], [2, 7, 7, 7, 7, 30, 30, 2], [12], [39, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]]
    model = _model(exact=True, category_dim=category_dim, fixed=fixed, half=half)
    with torch.no_grad():
        vectors = model.encode(_batch(rows), 'long').numpy()
    codes = decode.category_codes(model)
    assert codes.shape == (N_CATS - 2, half or 24)
    got = decode.category_weights(vectors, codes)
    want = np.zeros((len(rows), N_CATS - 2))
    for i, r in enumerate(rows):       # the untrained pool weighs every event alike: shares are event counts
        for c in r:
            want[i, c - decode.FIRST] += 1.0 / len(r)
    assert np.allclose(got, want, atol=1e-4)
    # the model mixing its [CLS] head into the whole vector cannot be decoded, and says so
    with pytest.raises(ValueError, match="exact_categories is off"):
        decode.category_codes(_model(exact=False))


def test_category_half_life_weighs_recent_events_and_leaves_the_item_half_alone():
    rows = [[5, 5, 9], [2, 7, 7, 7, 7, 30, 30, 2], [39, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]]
    batch = _batch(rows)
    with torch.no_grad():
        plain = _model(exact=True).encode(batch, 'long').numpy()
        recent = _model(exact=True, half_life=2.0).encode(batch, 'long').numpy()
    got = decode.category_weights(recent, decode.category_codes(_model(exact=True, half_life=2.0)))
    want = np.zeros((len(rows), N_CATS - 2))
    for i, r in enumerate(rows):       # the last event weighs 1, the one 2 events older 1/2, ...
        for pos, c in enumerate(r):
            want[i, c - decode.FIRST] += 0.5 ** ((len(r) - 1 - pos) / 2.0)
    assert np.allclose(got, want / want.sum(1, keepdims=True), atol=1e-4)
    # the item half is pooled as without the prior (the vector is renormalised as a whole)
    split = plain.shape[1] - decode.category_half(plain).shape[1]
    item = lambda v: v[:, :split] / np.linalg.norm(v[:, :split], axis=1, keepdims=True)
    assert np.allclose(item(recent), item(plain), atol=1e-5)
    with pytest.raises(ValueError, match="category_half_life must be >= 0"):
        ModelConfig(n_items=5, n_categories=5, category_half_life=-1.0)


def test_exact_categories_follows_skip_pool_and_needs_it():
    assert ModelConfig(n_items=5, n_categories=5).exact_categories is True
    assert ModelConfig(n_items=5, n_categories=5, skip_pool=False, target_head=False).exact_categories is False
    with pytest.raises(ValueError, match="needs skip_pool"):
        ModelConfig(n_items=5, n_categories=5, skip_pool=False, exact_categories=True)


def test_noise_off_the_codes_span_is_ignored():
    # codes that all but lack one direction (singular value 1e-7: an untrained model's, whose LayerNorm centres
    # them), turned so it is no axis; a float32 sketch has rounding noise along it, which must not count
    vectors, codes, shares = planted(dim=32)
    codes = with_weak_direction(codes, 1e-7, seed=5)
    got = decode.shares(((shares * 3.0) @ codes).astype(np.float32), codes)
    assert np.allclose(got, shares, atol=1e-6)


def test_float_noise_along_a_weakly_spanned_direction_is_dropped():
    """Trained codes keep a trace (~1e-4 of the largest singular value, above SPAN) of the direction their LayerNorm
    centres away. Float32 rounding along it decodes to tiny weights on categories the user never had, which would
    outrank the popularity tie-break; decoding returns exactly the user's categories instead."""
    _, codes, shares = planted(n_users=100, n_codes=200, dim=48, support=4, seed=7)
    codes = with_weak_direction(codes, 1e-4, seed=8)
    sv = np.linalg.svd(codes, compute_uv=False)
    assert decode.SPAN < sv[-1] / sv[0] < 1e-2                        # the direction counts: it is kept
    got = decode.shares((shares @ codes).astype(np.float32), codes)
    assert ((got > 0) == (shares > 0)).all()
    assert np.allclose(got, shares, atol=1e-4)


def test_tiny_real_shares_survive_well_conditioned_codes():
    """The noise floor follows the codes' conditioning: with well-spread codes a category weighing 1e-4 of the user's
    largest (an old event under a short half-life) is still decoded, ahead of the categories the user never had."""
    _, codes, shares = planted(n_users=60, n_codes=200, dim=48, support=4, seed=9)
    for row in shares:
        row[np.flatnonzero(row)[0]] = 1e-4 * row.max()
    shares /= shares.sum(1, keepdims=True)
    got = decode.shares((shares @ codes).astype(np.float32), codes)
    assert ((got > 0) == (shares > 0)).all()


@pytest.mark.parametrize('search', ['beam', 'linear programme'])
def test_a_sparser_exact_solution_replaces_a_dense_one_from_nnls(monkeypatch, search):
    """Two codes make the sketch, but nnls's active set ends on an exact solution with 6 of 12 codes (more than
    half the 6 dimensions: not necessarily the sparsest). Decoding finds the 2 planted categories, as it must for
    UserBehavior's users whose 10 categories nnls spread over ~60 codes: the beam search over supports of at most
    max_categories codes finds them, and so does the linear programme it falls back on (each tried alone)."""
    if search == 'beam':
        monkeypatch.setattr(decode, '_sparser', lambda a, y, w, floor: w)
    else:
        monkeypatch.setattr(decode, '_sparsest', lambda a, y, k: None)
    rng = np.random.default_rng(25)
    codes = rng.standard_normal((12, 6))
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    want = np.r_[0.6, 0.4, np.zeros(10)]
    sketch = want @ codes
    dense = decode.nnls(codes.T, sketch)[0]
    assert np.count_nonzero(dense > 1e-9) > 3                       # the premise: nnls alone gets it wrong
    assert np.allclose(decode.shares(sketch[None], codes, max_categories=2)[0], want, atol=1e-6)
    # without knowing how many categories a sketch holds, decoding is nnls alone (a sketch of many, e.g. a model
    # without category_top, would take the linear programme every time)
    assert np.allclose(decode.shares(sketch[None], codes)[0], dense / dense.sum(), atol=1e-6)


def test_decoding_never_returns_more_weights_than_nnls_and_stays_exact():
    rng = np.random.default_rng(0)
    replaced = 0
    for _ in range(60):
        codes = rng.standard_normal((12, 6))
        codes /= np.linalg.norm(codes, axis=1, keepdims=True)
        w = np.zeros(12)
        w[rng.choice(12, 2, replace=False)] = rng.uniform(0.1, 1.0, 2)
        sketch = w @ codes
        got = decode.shares(sketch[None], codes, max_categories=2)[0]
        plain = decode.nnls(codes.T, sketch)[0]
        plain /= plain.sum()
        assert np.count_nonzero(got) <= np.count_nonzero(plain > 1e-9)
        scale = np.linalg.norm(sketch) / np.linalg.norm(got @ codes)
        assert np.allclose(scale * got @ codes, sketch, atol=1e-6)   # still a combination that makes the sketch
        replaced += np.count_nonzero(got) < np.count_nonzero(plain > 1e-9)
    assert replaced > 0


def test_worker_processes_give_the_same_shares(monkeypatch):
    vectors, codes, want = planted(n_users=40, seed=3)
    vectors[5] = 0.0                                                 # a user with no events stays all-zero
    monkeypatch.setattr(decode, 'PARALLEL_MIN_WORK', 0)              # small enough to run in this process otherwise
    parallel = decode.category_weights(vectors, codes, max_categories=4, workers=2, progress=True)
    assert np.array_equal(parallel, decode.category_weights(vectors, codes, max_categories=4))
    assert not parallel[5].any()
    assert np.allclose(np.delete(parallel, 5, 0), np.delete(want, 5, 0), atol=1e-6)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        decode.category_weights(vectors, codes, workers=0)


def test_failing_worker_processes_fall_back_to_this_process(monkeypatch):
    vectors, codes, _ = planted(n_users=12, seed=4)

    class NoProcesses:              # as where processes cannot start: the pool breaks on first use
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, *args):
            raise decode.BrokenProcessPool('no processes here')
    monkeypatch.setattr(decode, 'PARALLEL_MIN_WORK', 0)
    monkeypatch.setattr(decode, 'ProcessPoolExecutor', NoProcesses)
    with pytest.warns(UserWarning, match='worker processes failed .*solving in this process'):
        got = decode.category_weights(vectors, codes, workers=2)
    assert np.array_equal(got, decode.category_weights(vectors, codes))


def test_category_top_keeps_only_each_users_heaviest_categories():
    rows = [[5, 5, 9, 7, 7, 7, 30], [2, 7, 7, 30, 30, 2], [12], [39, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]]
    model = _model(exact=True, top=2)
    with torch.no_grad():
        vectors = model.encode(_batch(rows), 'long').numpy()
        longer = model.encode(_batch(rows, length=20), 'long').numpy()          # more padding: the same vectors
        plain = _model(exact=True).encode(_batch(rows), 'long').numpy()
    np.testing.assert_allclose(longer, vectors, atol=1e-6)
    got = decode.category_weights(vectors, decode.category_codes(model))
    want = np.zeros((len(rows), N_CATS - 2))
    # untrained pool weights are alike: the two most frequent categories keep their shares; ties at the cut all stay
    for i, kept in enumerate([{7: 3, 5: 2}, {2: 2, 7: 2, 30: 2}, {12: 1}, {3: 11, 39: 1}]):
        for c, n in kept.items():
            want[i, c - decode.FIRST] = n / sum(kept.values())
    assert np.allclose(got, want, atol=1e-4)
    # the item half does not change (the vector is renormalised as a whole)
    split = model.cfg.item_size
    item = lambda v: v[:, :split] / np.linalg.norm(v[:, :split], axis=1, keepdims=True)
    assert np.allclose(item(vectors), item(plain), atol=1e-5)
    with pytest.raises(ValueError, match="category_top must be >= 0"):
        ModelConfig(n_items=5, n_categories=5, category_top=-1)
    # a tower called without `known` pools every event into the item half: category_top still leaves it alone
    with torch.no_grad():
        b = _batch(rows)
        x = model.moe_layer(model.feature_embedding(b), b['mask'])
        t = model.feature_embedding.target(b['item'], b['category'])
        alone = model.long_term(x, b['mask'], t, None, b['category']).numpy()
        every = _model(exact=True).long_term(x, b['mask'], t, None, b['category']).numpy()
    assert np.allclose(item(alone), item(every), atol=1e-5)
    with pytest.raises(ValueError, match="needs the events' category ids"):
        model.long_term(x, b['mask'], t)


def test_category_idf_weighs_rare_categories_and_decoding_divides_it_out():
    rows = [[3, 3, 3, 5], [3, 3, 9, 9], [12], [3, 3, 3, 3, 3, 7]]
    users_with = np.full(N_CATS, 2)
    users_with[3] = 99                          # nearly every one of 100 training users has category 3
    model = _model(exact=True, idf=1.0)
    model.feature_embedding.set_category_frequencies(users_with, 100)
    scale = decode.category_scale(model)
    rare, common = np.log(101 / 3) + 1, np.log(101 / 100) + 1
    assert np.allclose(scale[[0, 1, 3, 7]], [rare, common, rare, rare])
    with torch.no_grad():
        vectors = model.encode(_batch(rows), 'long').numpy()
        plain = _model(exact=True).encode(_batch(rows), 'long').numpy()
    counts = np.zeros((len(rows), N_CATS - 2))
    for i, r in enumerate(rows):
        for c in r:
            counts[i, c - decode.FIRST] += 1.0
    # the pool sums each event's code times its category's scale: decoded with the codes alone, that is what comes out
    unit = decode.category_codes(model) / scale[:, None]
    weighted = counts * scale
    assert np.allclose(decode.category_weights(vectors, unit), weighted / weighted.sum(1, keepdims=True), atol=1e-4)
    # the model's codes carry the scale, and decoding divides it back out: the plain shares
    assert np.allclose(decode.category_weights(vectors, decode.category_codes(model)),
                       counts / counts.sum(1, keepdims=True), atol=1e-4)
    # user 1 (3, 3, 9, 9) is closer to a 9-only user than to a 3-only user once the common category counts less
    half = lambda v: decode.category_half(v) / np.linalg.norm(decode.category_half(v), axis=1, keepdims=True)
    with torch.no_grad():
        only = model.encode(_batch([[3, 3], [9, 9]]), 'long').numpy()
    assert half(vectors[1:2]) @ half(only[1:2]).T > half(vectors[1:2]) @ half(only[0:1]).T + 0.5
    # the item half is pooled as without it
    split = model.cfg.item_size
    item = lambda v: v[:, :split] / np.linalg.norm(v[:, :split], axis=1, keepdims=True)
    assert np.allclose(item(vectors), item(plain), atol=1e-5)
    # the heaviest categories are chosen by the plain weights: 3 stays over 7 in user 3 however common it is
    top1 = _model(exact=True, idf=1.0, top=1)
    top1.feature_embedding.set_category_frequencies(users_with, 100)
    with torch.no_grad():
        v = top1.encode(_batch(rows[3:]), 'long').numpy()
    got = decode.category_weights(v, decode.category_codes(top1), max_categories=1)
    assert got[0, 3 - decode.FIRST] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="category_idf must be >= 0"):
        ModelConfig(n_items=5, n_categories=5, category_idf=-1.0)
    with pytest.raises(ValueError, match="needs ModelConfig.category_idf"):
        _model(exact=True).feature_embedding.set_category_frequencies(users_with, 100)
    with pytest.raises(ValueError, match="non-negative counts"):
        model.feature_embedding.set_category_frequencies(users_with[:-1], 100)
