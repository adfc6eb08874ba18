"""Tests of LongTermInterestModel: embedding, towers, padding invariance, losses, gradients, overfitting."""
import io
import math

import pytest
import numpy as np
import torch
import torch.nn.functional as F

from DeepSeekMoE import MoE, MoEConfig
from LongTermInterestModel import (FeatureEmbedding, InterestTower, LongTermInterestModel, ModelConfig, batch_loss,
                                   bpr_loss, future_loss, info_nce_loss)

N_ITEMS, N_CATS = 60, 12


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(n_items=N_ITEMS, n_categories=N_CATS, item_embedding_dim=16, category_embedding_dim=8,
                small_embedding_dim=4, width=16, depth=2, heads=2, head_dim=8, mlp_ratio=2, hidden_dim=8,
                dropout=0.1, max_positions=32)
    base.update(kw)
    return ModelConfig(**base)


def tiny_moe_cfg(**kw) -> MoEConfig:
    base = dict(dim=16, n_routed_experts=4, n_shared_experts=1, n_activated=2, hidden=8, dropout=0.1)
    base.update(kw)
    return MoEConfig(**base)


def make_batch(lengths, length, seed=0, items=None):
    """Right-padded random batch in the data.py contract (0 = padding everywhere)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = torch.arange(length) < torch.as_tensor(lengths)[:, None]
    m = mask.long()

    def ints(lo, hi):
        return torch.randint(lo, hi, (b, length), generator=g) * m

    batch = {'item': ints(1, N_ITEMS) if items is None else items * m, 'category': ints(1, N_CATS),
             'weekday': ints(1, 8), 'hour': ints(1, 25), 'weekend': ints(1, 3), 'behavior': ints(1, 5),
             'time': torch.rand(b, length, 2, generator=g) * mask.unsqueeze(-1), 'mask': mask}
    return batch


def repad(batch, length):
    """The same users with the batch padded (or cut, if only padding goes) to `length`."""
    out = {}
    for key, t in batch.items():
        cur = t.shape[1]
        if length <= cur:
            out[key] = t[:, :length]
        else:
            pad = [0, 0] * (t.dim() - 2) + [0, length - cur]
            out[key] = F.pad(t, pad)
    return out


@pytest.fixture(scope='module')
def tiny_model():
    torch.manual_seed(0)
    return LongTermInterestModel(tiny_cfg(), tiny_moe_cfg())


def test_default_config_shapes():
    torch.manual_seed(0)
    model = LongTermInterestModel(ModelConfig(n_items=N_ITEMS, n_categories=N_CATS)).eval()
    assert model.moe_layer.cfg.n_routed_experts == 100 and model.cfg.width == 128
    long_b, short_b = make_batch([7, 3], 10), make_batch([2, 1], 4, seed=1)
    x = model.feature_embedding(long_b)
    assert x.shape == (2, 10, 128)
    y = model.moe_layer(x, long_b['mask'])
    assert y.shape == (2, 10, 128)
    t = model.feature_embedding.target(long_b['item'], long_b['category'])
    assert t.shape == (2, 10, 128)
    v = model.long_term(y, long_b['mask'], t)
    assert v.shape == (2, 128)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(2))
    assert model.encode(short_b, 'short').shape == (2, 128)


def test_tiny_config_shapes_and_names(tiny_model):
    b = make_batch([5, 2, 1], 6)
    for tower in ('long', 'short'):
        assert tiny_model.encode(b, tower).shape == (3, 8)
    long_v, short_v, cands = tiny_model(b, make_batch([2, 1, 1], 2), [(b['item'][:, 0], b['category'][:, 0])])
    assert long_v.shape == short_v.shape == (3, 8) and len(cands) == 1 and cands[0].shape == (3, 8)
    names = {n for n, _ in tiny_model.named_children()}
    assert names == {'feature_embedding', 'moe_layer', 'long_term', 'short_term'}


def test_feature_embedding_zero_at_padding(tiny_model):
    fe = tiny_model.feature_embedding
    for emb in (fe.item, fe.category, fe.weekday, fe.hour, fe.weekend, fe.behavior):
        assert emb.padding_idx == 0 and torch.all(emb.weight[0] == 0)
    b = make_batch([4, 1], 6)
    x = fe(b)
    assert torch.all(x[~b['mask']] == 0) and torch.all(x[b['mask']].abs().sum(-1) > 0)


@pytest.mark.parametrize('pooling, feature_norm, skip_pool, half_life, idf', [
    ('cls', True, True, 0.0, 0.0), ('mean', True, True, 0.0, 0.0), ('cls', False, False, 0.0, 0.0),
    ('cls', True, False, 0.0, 0.0), ('cls', True, True, 2.0, 0.0), ('cls', True, True, 2.0, 0.5)])
def test_padding_does_not_change_a_users_vector(pooling, feature_norm, skip_pool, half_life, idf):
    torch.manual_seed(1)
    model = LongTermInterestModel(tiny_cfg(pooling=pooling, feature_norm=feature_norm, skip_pool=skip_pool,
                                           category_half_life=half_life, category_idf=idf), tiny_moe_cfg()).eval()
    if idf:   # categories of very different weights in the pool
        n = model.cfg.n_categories
        model.feature_embedding.set_category_frequencies(np.random.default_rng(0).integers(0, 50, n), 50)
    for tower in (model.long_term, model.short_term):   # a trained [CLS] path, not the zero head it starts with
        torch.nn.init.normal_(tower.head.weight, std=0.1)
        if skip_pool:
            torch.nn.init.normal_(tower.pool_logit.weight)
    b = make_batch([6, 3, 1], 6)
    with torch.no_grad():
        v = model.encode(b)
        v_more = model.encode(repad(b, 23))                    # same users, much more padding
        v_alone = model.encode({k: t[1:2, :3] for k, t in b.items()})   # user 1 alone, no padding
        garbage = {k: t.clone() for k, t in repad(b, 9).items()}
        garbage['time'][:, 6:] = 5.0                             # even non-zero junk under the mask
        v_junk = model.encode(garbage)
    torch.testing.assert_close(v_more, v, atol=1e-5, rtol=0)
    torch.testing.assert_close(v_alone, v[1:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(v_junk, v, atol=1e-5, rtol=0)


def test_recency_positions_matter():
    """Order carries information: the same events in another order give another vector."""
    torch.manual_seed(2)
    tower = InterestTower(tiny_cfg(skip_pool=False)).eval()
    x = torch.randn(1, 5, 16)
    mask = torch.ones(1, 5, dtype=torch.bool)
    assert not torch.allclose(tower(x, mask), tower(x.flip(1), mask), atol=1e-4)


def test_eval_deterministic_and_save_load_reproduces_vectors(tiny_model):
    model = tiny_model
    model.train()
    model.encode(make_batch([6, 6], 6))
    model.moe_layer.end_epoch()                                 # non-trivial balancing state
    model.eval()
    b = make_batch([6, 4, 2], 6, seed=3)
    with torch.no_grad():
        v1, v2 = model.encode(b), model.encode(b)
    assert torch.equal(v1, v2)
    blobs = {}
    for name in ('feature_embedding', 'moe_layer', 'long_term', 'short_term'):
        buf = io.BytesIO()
        torch.save(getattr(model, name).state_dict(), buf)
        blobs[name] = buf.getvalue()
    fresh = LongTermInterestModel(model.cfg, model.moe_cfg)
    for name, blob in blobs.items():
        getattr(fresh, name).load_state_dict(torch.load(io.BytesIO(blob)))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh.encode(b), v1)
        assert torch.equal(fresh.encode(b, 'short'), model.encode(b, 'short'))


def test_bpr_tau_one_equals_hand_computation():
    torch.manual_seed(3)
    a, p, n = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    loss, metrics = bpr_loss(a, p, n)
    cos_p = [float(a[i] @ p[i] / (a[i].norm() * p[i].norm())) for i in range(5)]
    cos_n = [float(a[i] @ n[i] / (a[i].norm() * n[i].norm())) for i in range(5)]
    hand = sum(-math.log(1 / (1 + math.exp(-(cp - cn)))) for cp, cn in zip(cos_p, cos_n)) / 5
    assert float(loss) == pytest.approx(hand, abs=1e-6)
    assert float(metrics['acc']) == pytest.approx(sum(cp > cn for cp, cn in zip(cos_p, cos_n)) / 5)
    assert float(metrics['cos_pos']) == pytest.approx(sum(cos_p) / 5, abs=1e-6)
    loss_t, _ = bpr_loss(a, p, n, tau=0.5)
    hand_t = sum(-math.log(1 / (1 + math.exp(-(cp - cn) / 0.5))) for cp, cn in zip(cos_p, cos_n)) / 5
    assert float(loss_t) == pytest.approx(hand_t, abs=1e-6)


def test_info_nce_matches_cross_entropy_and_shares_metric_keys():
    torch.manual_seed(4)
    a, s, n = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1), torch.randn(3, 8)
    loss, metrics = info_nce_loss(a, s, tau=0.1)
    assert float(loss) == pytest.approx(float(F.cross_entropy(a @ s.t() / 0.1, torch.arange(4))), abs=1e-5)
    _, bpr_metrics = bpr_loss(a, s, s.roll(1, 0))
    assert set(metrics) == set(bpr_metrics) == {'loss', 'cos_pos', 'cos_neg', 'acc'}
    loss_n, _ = info_nce_loss(a, s, tau=0.1, neg_v=n)
    assert loss_n > loss                                       # extra negatives make it harder
    assert float(info_nce_loss(a[:1], s[:1])[0]) == pytest.approx(0.0, abs=1e-6)   # batch of one


def test_gradients_reach_every_parameter_group():
    torch.manual_seed(5)   # the seed's recipe: no target head (the allaction test covers it)
    model = LongTermInterestModel(tiny_cfg(target_head=False, skip_pool=False), tiny_moe_cfg(n_routed_experts=3)).train()
    long_b, short_b = make_batch([9, 7, 5, 8], 9), make_batch([3, 2, 1, 2], 3, 1)
    loss, metrics = batch_loss(*model(long_b, short_b)[:2], 'bpr', 1.0)
    loss.backward()
    assert torch.isfinite(loss)
    sparse, dense = model.param_groups()
    listed = sparse + dense
    assert len(listed) == len(set(map(id, listed))) == len(list(model.parameters()))
    assert sparse == [model.feature_embedding.item.weight]
    assert model.feature_embedding.item.weight.grad.is_sparse
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        grad = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_an_empty_batch_gives_empty_vectors_and_zero_gradients():
    """Distributed training from each rank's own users can leave a rank without a user in a step: its forward
    of an empty batch must still run (DDP needs every rank's backward) and give every parameter a zero
    gradient."""
    torch.manual_seed(6)
    model = LongTermInterestModel(tiny_cfg(), tiny_moe_cfg()).train()
    cands = [(torch.tensor([1, 1]), torch.tensor([2, 3]))]
    long_v, short_v, cand_v = model(make_batch([], 8), make_batch([], 3), cands)
    assert long_v.shape == short_v.shape == (0, 8) and cand_v[0].shape == (2, 8)
    (0.0 * (long_v.sum() + short_v.sum() + cand_v[0].sum())).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert not (p.grad.coalesce().values() if p.grad.is_sparse else p.grad).any(), name


def test_tiny_model_overfits_a_handful_of_users():
    """Eight users with their own items: BPR with other users' short sequences as negatives."""
    torch.manual_seed(6)
    users, n_long, n_short = 8, 12, 4
    items = torch.stack([torch.randint(2 + 7 * u, 2 + 7 * (u + 1), (n_long + n_short,)) for u in range(users)])
    model = LongTermInterestModel(tiny_cfg(dropout=0.0), tiny_moe_cfg(dropout=0.0))
    long_b = make_batch([n_long] * users, n_long, seed=7, items=items[:, :n_long])
    short_b = make_batch([n_short] * users, n_short, seed=8, items=items[:, n_long:])
    sparse_params, dense_params = model.param_groups()
    dense = torch.optim.Adam(dense_params, lr=3e-3)
    sparse = torch.optim.SparseAdam(sparse_params, lr=3e-3)
    model.train()
    for step in range(120):
        loss, metrics = batch_loss(*model(long_b, short_b)[:2], 'bpr', 1.0, neg_shift=1)
        dense.zero_grad()
        sparse.zero_grad()
        loss.backward()
        dense.step()
        sparse.step()
        model.moe_layer.after_step()
    assert loss.item() < 0.5 * math.log(2)
    assert float(metrics['acc']) == 1.0


def test_config_validation():
    with pytest.raises(ValueError, match='pooling'):
        tiny_cfg(pooling='max')
    for bad in (-1, 8):                                           # the item half needs at least one float
        with pytest.raises(ValueError, match=r'category_dim must be in \[0, hidden_dim = 8\)'):
            tiny_cfg(category_dim=bad)
    with pytest.raises(ValueError, match='must equal'):
        LongTermInterestModel(tiny_cfg(), tiny_moe_cfg(dim=32))
    assert isinstance(LongTermInterestModel(tiny_cfg()).moe_layer, MoE)
    with pytest.raises(ValueError, match='tower'):
        LongTermInterestModel(tiny_cfg(), tiny_moe_cfg()).encode(make_batch([2], 2), 'mid')


def test_feature_embedding_standalone_without_mask_key():
    fe = FeatureEmbedding(tiny_cfg())
    b = make_batch([3, 1], 4)
    without = {k: v for k, v in b.items() if k != 'mask'}
    fe.eval()
    assert torch.equal(fe(without), fe(b))


def test_feature_groups_enter_at_the_same_scale():
    """Each feature group is layer-normed before the projection: at init the time features (a Linear with a
    bias, nearly the same for every event) no longer outweigh the item embedding, so tokens of different
    items differ. Without it, different users' tokens are nearly parallel."""
    b = make_batch([6, 6, 6, 6], 6)
    b['item'] = torch.randint(2, N_ITEMS, b['item'].shape)
    cos = {}
    for norm in (False, True):
        torch.manual_seed(0)
        emb = FeatureEmbedding(tiny_cfg(feature_norm=norm)).eval()
        with torch.no_grad():
            x = torch.nn.functional.normalize(emb(b).reshape(-1, emb.cfg.width), dim=-1)
        cos[norm] = float((x @ x.t()).mean())
    assert cos[False] > 0.8 and cos[True] < 0.6


def test_future_loss_is_per_user_cross_entropy_with_logq():
    torch.manual_seed(9)
    u = F.normalize(torch.randn(3, 8), dim=-1)
    c = F.normalize(torch.randn(5, 8), dim=-1)
    pair_user, pair_cand = torch.tensor([0, 0, 0, 1, 2]), torch.tensor([1, 1, 4, 0, 3])
    loss = future_loss(u, c, pair_user, pair_cand, tau=0.5)
    logp = (u @ c.t() / 0.5).log_softmax(-1)
    want = torch.stack([-(2 * logp[0, 1] + logp[0, 4]) / 3, -logp[1, 0], -logp[2, 3]]).mean()   # users weigh alike
    torch.testing.assert_close(loss, want)
    log_q = torch.log(torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1]))
    logp_q = (u @ c.t() / 0.5 - log_q).log_softmax(-1)
    want_q = torch.stack([-(2 * logp_q[0, 1] + logp_q[0, 4]) / 3, -logp_q[1, 0], -logp_q[2, 3]]).mean()
    torch.testing.assert_close(future_loss(u, c, pair_user, pair_cand, 0.5, log_q), want_q)


def test_the_model_leaves_out_the_same_unknown_row_that_data_encodes_rare_items_to():
    import data
    import LongTermInterestModel as ltm
    assert ltm.UNKNOWN_ITEM == data.UNKNOWN


@pytest.mark.parametrize('category_dim', [0, 6])   # the category half: 4 (half) or 6 of the 8 floats
def test_skip_pool_starts_as_the_pool_of_target_vectors(category_dim):
    """At init the [CLS] head is zero: the long vector is the mean of the events' target vectors - item
    halves over the known items only, category halves over every event, each normalised (mean_emb's recipe) -
    so the model starts where mean pooling is and the towers learn what it misses."""
    torch.manual_seed(10)
    model = LongTermInterestModel(tiny_cfg(dropout=0.0, category_dim=category_dim), tiny_moe_cfg(dropout=0.0)).eval()
    b = make_batch([5, 3], 5)
    b['item'][0, :2] = 1                                                      # two unknown items
    with torch.no_grad():
        t = model.feature_embedding.target(b['item'], b['category'])          # (B, L, D)
        h = 8 - (category_dim or 4)                                           # where the item half ends
        assert (model.cfg.item_size, model.cfg.category_size) == (h, 8 - h)
        assert model.long_term.head.out_features == h                        # exact_categories: the item half
        torch.testing.assert_close(t[..., :h].norm(dim=-1), b['mask'].float() * 2 ** -0.5)   # halves alike
        torch.testing.assert_close(t.norm(dim=-1), b['mask'].float())        # unit events, zero padding

        def mean(x, m):
            return F.normalize((x * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True), dim=-1)
        known = (b['mask'] & (b['item'] > 1)).float()
        want = torch.cat([mean(t[..., :h], known), mean(t[..., h:], b['mask'].float())], -1) * 2 ** -0.5
        torch.testing.assert_close(model.encode(b), want, atol=1e-6, rtol=0)
        cands = model.candidate_vectors({k: v[:, :1] for k, v in b.items()})
        torch.testing.assert_close(cands, t[:, 0])


@pytest.mark.parametrize('category_dim', [0, 6])
def test_item_category_weight_scales_only_item_candidates_category_half(category_dim):
    """Scoring items against a user vector u ranks by u_item . t_item + w * u_cat . t_cat (w =
    item_category_weight); category candidates (item = unknown) and the target vectors stay as trained."""
    torch.manual_seed(12)
    model = LongTermInterestModel(tiny_cfg(item_category_weight=0.5, category_dim=category_dim), tiny_moe_cfg()).eval()
    items = torch.tensor([[5], [6], [1], [7], [8]])
    batch = {'item': items, 'category': torch.tensor([[2], [3], [4], [3], [5]])}
    with torch.no_grad():
        t = model.feature_embedding.target(items[:, 0], batch['category'][:, 0])
        cands = model.candidate_vectors(batch)
        h = 8 - (category_dim or 4)
        torch.testing.assert_close(cands.norm(dim=-1), torch.ones(5))
        torch.testing.assert_close(cands[2], t[2])                       # a category candidate: unchanged
        item_rows = [0, 1, 3, 4]
        want = torch.cat([t[item_rows, :h], 0.5 * t[item_rows, h:]], -1)
        torch.testing.assert_close(cands[item_rows], F.normalize(want, dim=-1))
        u = F.normalize(torch.randn(64, t.shape[-1]), dim=-1)
        score = u[:, :h] @ t[item_rows, :h].T + 0.5 * u[:, h:] @ t[item_rows, h:].T
        assert torch.equal((u @ cands[item_rows].T).argsort(-1), score.argsort(-1))
        model.cfg.item_category_weight = 0.0                              # the item half alone
        assert model.candidate_vectors(batch)[item_rows, h:].abs().max() == 0
        model.cfg.item_category_weight = 1.0                              # the target vectors as trained
        torch.testing.assert_close(model.candidate_vectors(batch), t)
    with pytest.raises(ValueError, match="item_category_weight must be >= 0"):
        tiny_cfg(item_category_weight=-0.5)


def test_allaction_loss_gradients_reach_the_target_head_and_towers():
    torch.manual_seed(11)
    model = LongTermInterestModel(tiny_cfg(), tiny_moe_cfg()).train()
    long_b, short_b = make_batch([9, 7, 5, 8], 9), make_batch([3, 2, 1, 2], 3, 1)
    with torch.no_grad():
        model.long_term.head.weight.normal_(std=0.1)   # as after the first step (it starts at zero)
        model.short_term.head.weight.normal_(std=0.1)
    fe = model.feature_embedding
    cats = torch.arange(2, N_CATS)
    cand_v = fe.target(torch.ones_like(cats), cats)
    mask = short_b['mask']
    pair_user = mask.nonzero()[:, 0]
    pair_cand = short_b['category'][mask] - 2
    keep = pair_cand >= 0
    loss, metrics = batch_loss(model.encode(long_b), model.encode(short_b, 'short'), 'allaction', 0.1,
                               future=[(cand_v, pair_user[keep], pair_cand[keep], None)])
    loss.backward()
    assert torch.isfinite(loss) and {'loss_category', 'loss'} <= set(metrics)
    for name in ('feature_embedding.target_item.weight', 'feature_embedding.target_category.weight',
                 'long_term.pool_logit.weight', 'long_term.head.weight',
                 'long_term.blocks.0.qkv.weight', 'moe_layer.w_in', 'short_term.head.weight'):
        p = dict(model.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fixed_category_codes_are_random_unit_vectors_never_trained_and_saved(tmp_path):
    torch.manual_seed(3)
    cfg = tiny_cfg(fixed_category_codes=True)
    model = LongTermInterestModel(cfg, tiny_moe_cfg()).train()
    fe = model.feature_embedding
    codes = fe.category_code.clone()
    assert codes.shape == (N_CATS, cfg.hidden_dim // 2) and not codes[0].any()
    assert torch.allclose(codes[1:].norm(dim=1), torch.ones(N_CATS - 1))
    assert not hasattr(fe, 'target_category') and 'feature_embedding.category_code' not in dict(model.named_parameters())
    # the category half of a target vector is the code itself (scaled like the item half)
    cats = torch.arange(2, N_CATS)
    t = fe.target(torch.ones_like(cats), cats)
    assert torch.allclose(t[:, cfg.hidden_dim - cfg.hidden_dim // 2:], codes[2:] * 2 ** -0.5)
    # a training step moves the category embedding (it still feeds the towers) but not the codes
    with torch.no_grad():
        model.long_term.head.weight.normal_(std=0.1)   # as after the first step (it starts at zero)
    opt = torch.optim.Adam(model.param_groups()[1], lr=0.1)
    long_b, short_b = make_batch([9, 7, 5, 8], 9), make_batch([3, 2, 1, 2], 3, 1)
    before = fe.category.weight.detach().clone()
    loss, _ = batch_loss(model.encode(long_b), model.encode(short_b, 'short'), 'infonce', 0.1)
    loss.backward()
    opt.step()
    assert torch.equal(fe.category_code, codes) and not torch.equal(fe.category.weight, before)
    # the codes travel with the weights: a fresh model with another seed loads them back
    torch.save(model.state_dict(), tmp_path / 'm.pth')
    torch.manual_seed(4)
    other = LongTermInterestModel(cfg, tiny_moe_cfg())
    assert not torch.equal(other.feature_embedding.category_code, codes)
    other.load_state_dict(torch.load(tmp_path / 'm.pth'))
    assert torch.equal(other.feature_embedding.category_code, codes)
    with pytest.raises(ValueError, match="needs target_head"):
        ModelConfig(n_items=5, n_categories=5, skip_pool=False, target_head=False, fixed_category_codes=True)


def test_cpu_attention_dropout_is_sdpa_in_expectation_and_respects_the_mask():
    from LongTermInterestModel import _attention_dropout, _dropout_scale
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(3))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(_attention_dropout(q, k, v, mask, 0.0), want, atol=1e-5, rtol=0)
    v_junk = v.clone()
    v_junk[1, :, 3:] = 1e6                                     # masked keys' values never reach the output
    torch.manual_seed(0)
    mean = sum(_attention_dropout(q, k, v_junk, mask, 0.3) for _ in range(4000)) / 4000
    torch.testing.assert_close(mean, want, atol=0.05, rtol=0)  # inverted dropout: unbiased
    keep = _dropout_scale((200_000,), 0.3, torch.float32, torch.device('cpu'))
    assert keep.unique().tolist() == pytest.approx([0.0, 1 / 0.7])
    assert float((keep > 0).float().mean()) == pytest.approx(0.7, abs=0.005)


@pytest.mark.parametrize('skip_pool', [True, False])
def test_training_forward_equals_encoding_each_part_alone(skip_pool):
    """forward() sends the long and short batches through the MoE in one dispatch (MoE.forward_parts):
    without dropout its vectors and every gradient equal encode() of each batch alone, and the expert
    counts tracked for the step are the same."""
    torch.manual_seed(9)
    model = LongTermInterestModel(tiny_cfg(dropout=0.0, skip_pool=skip_pool, target_head=skip_pool),
                                  tiny_moe_cfg(dropout=0.0, n_routed_experts=6)).train()
    long_b, short_b = make_batch([9, 7, 0, 8], 9), make_batch([3, 2, 1, 0], 3, 1)
    gl, gs = torch.randn(4, 8), torch.randn(4, 8)
    params = [p for p in model.parameters()]
    long_v, short_v, _ = model(long_b, short_b)
    counts = model.moe_layer.router.step_counts.clone()
    grads = torch.autograd.grad((long_v * gl).sum() + (short_v * gs).sum(), params, allow_unused=True)
    model.moe_layer.router.step_counts.zero_()
    ref_l, ref_s = model.encode(long_b, 'long'), model.encode(short_b, 'short')
    assert torch.equal(model.moe_layer.router.step_counts, counts)
    ref_grads = torch.autograd.grad((ref_l * gl).sum() + (ref_s * gs).sum(), params, allow_unused=True)
    torch.testing.assert_close(long_v, ref_l, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(short_v, ref_s, atol=1e-6, rtol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            a, b = (a.to_dense(), b.to_dense()) if a.is_sparse else (a, b)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize('training', [True, False])
def test_block_first_only_is_the_first_row_of_the_full_layer(training):
    """Block(first_only=True) = Block(...)[:, :1] (outputs and gradients; padded keys masked), which is
    what a [CLS]-pooled tower's last layer computes; mean pooling still runs every row."""
    from LongTermInterestModel import Block
    torch.manual_seed(11)
    block = Block(tiny_cfg(dropout=0.0)).train(training)
    x = torch.randn(3, 6, 16, requires_grad=True)
    keys = F.pad(torch.arange(5) < torch.tensor([[5], [2], [0]]), (1, 0), value=True)[:, None, None, :]
    g = torch.randn(3, 1, 16)
    params = [x] + list(block.parameters())
    full = block(x, keys)[:, :1]
    first = block(x, keys, first_only=True)
    assert first.shape == (3, 1, 16)
    torch.testing.assert_close(first, full, atol=1e-6, rtol=1e-5)
    for a, b in zip(torch.autograd.grad((first * g).sum(), params), torch.autograd.grad((full * g).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    tower = InterestTower(tiny_cfg(dropout=0.0, pooling='mean', skip_pool=False, target_head=False))
    calls = []
    tower.blocks[-1].register_forward_hook(lambda m, args, kwargs, out: calls.append(out.shape), with_kwargs=True)
    tower(torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool))
    assert calls == [(2, 6, 16)]
