"""Tests of DeepSeekMoE: shapes, sorted dispatch vs the reference loop, routing, masking, balancing, state."""
import io
from pathlib import Path

import pytest
import torch

import report
from DeepSeekMoE import MoE, MoEConfig, MoEStats, Router, balance_stats
from moe_reference import forward_reference

STATE_KEYS = {'w_in', 'w_out', 'router.gate.weight', 'router.penalty', 'router.penalty_step', 'router.penalty_sign',
              'router.bias', 'router.usage'}
# moe_layer.pth states saved before the Router module existed (its keys at the top level), one case per
# balancing mode and 'seed_no_usage' from before the 'running' mode, each with an input and its output.
# Written by tests/fixtures/make_moe_layer_v1.py (git show 9a37bc8:tests/fixtures/make_moe_layer_v1.py).
PRE_ROUTER_FIXTURE = Path(__file__).parent / 'fixtures' / 'moe_layer_v1.pt'


def tiny(**kw) -> MoEConfig:
    base = dict(dim=16, n_routed_experts=6, n_shared_experts=1, n_activated=2, hidden=8, dropout=0.0)
    base.update(kw)
    return MoEConfig(**base)


def routed(moe: MoE, x, mask=None):
    """(y, MoEStats) of one input, through forward_parts as the model calls it."""
    ys, stats = moe.forward_parts([(x, mask)])
    return ys[0], stats


def right_padded_mask(lengths, length):
    return torch.arange(length) < torch.as_tensor(lengths)[:, None]


@pytest.fixture(scope='module')
def default_moe():
    torch.manual_seed(0)
    return MoE(MoEConfig())


def test_default_config_shapes(default_moe):
    x = torch.randn(2, 12, 128)
    mask = right_padded_mask([12, 5], 12)
    y, stats = routed(default_moe, x, mask)
    assert y.shape == x.shape
    assert isinstance(stats, MoEStats)
    assert stats.counts.shape == (100,) and stats.counts.dtype == torch.int64
    assert int(stats.tokens) == 17 and int(stats.counts.sum()) == 2 * 17
    assert default_moe(x).shape == x.shape                     # mask optional, tensor only by default


@pytest.mark.parametrize('dim', [16, 13])                     # 13: odd width, padded row strides
@pytest.mark.parametrize('shared', [0, 1, 2])
def test_sorted_dispatch_matches_reference_loop(dim, shared):
    torch.manual_seed(1)
    moe = MoE(tiny(dim=dim, n_shared_experts=shared))
    x = torch.randn(3, 7, dim, requires_grad=True)
    mask = right_padded_mask([7, 4, 1], 7)
    g = torch.randn(3, 7, dim)
    params = [x] + list(moe.parameters())
    y = moe(x, mask)
    grads = torch.autograd.grad((y * g).sum(), params)
    y_ref = forward_reference(moe, x, mask)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), params)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(['x'] + [n for n, _ in moe.named_parameters()], grads, grads_ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert grads[1].abs().sum() > 0                           # the router learns through the mixing weights



@pytest.mark.parametrize('dim', [16, 13])
def test_forward_parts_matches_the_calls_one_by_one_and_the_reference(dim):
    """One dispatch for several inputs (the training step's long and short sequences) = each input alone:
    outputs, every gradient and the counts; with padded tokens, a fully padded row, an input without a
    mask, and experts that no token of one part (or of any) chooses."""
    torch.manual_seed(6)
    moe = MoE(tiny(dim=dim, n_routed_experts=12, n_shared_experts=1, balance='bias')).train()   # dropout 0
    with torch.no_grad():
        moe.router.bias[:3] = -10.0                                      # experts 0..2: never chosen
    xa = torch.randn(3, 9, dim, requires_grad=True)
    ma = right_padded_mask([9, 2, 0], 9)
    xb = torch.randn(2, 4, dim, requires_grad=True)
    xc = torch.randn(1, 3, dim, requires_grad=True)
    ga, gb, gc = torch.randn(3, 9, dim), torch.randn(2, 4, dim), torch.randn(1, 3, dim)
    params = [xa, xb, xc] + list(moe.parameters())
    (ya, yb, yc), stats = moe.forward_parts([(xa, ma), (xb, None), (xc, right_padded_mask([1], 3))])
    counts = moe.router.step_counts.clone()
    grads = torch.autograd.grad((ya * ga).sum() + (yb * gb).sum() + (yc * gc).sum(), params)
    moe.router.step_counts.zero_()
    refs, ref_counts = [], 0
    for x, m in ((xa, ma), (xb, None), (xc, right_padded_mask([1], 3))):
        y, st = routed(moe, x, m)
        refs.append(y)
        ref_counts = ref_counts + st.counts
    assert torch.equal(stats.counts, ref_counts) and torch.equal(counts, ref_counts)
    assert torch.equal(moe.router.step_counts, ref_counts)               # tracked as the calls one by one
    assert int(stats.tokens) == 11 + 8 + 1
    assert (ref_counts[:3] == 0).all() and (ref_counts[3:] > 0).any()   # empty experts
    ref_grads = torch.autograd.grad((refs[0] * ga).sum() + (refs[1] * gb).sum() + (refs[2] * gc).sum(), params)
    loop = [forward_reference(moe, x, m) for x, m in ((xa, ma), (xb, None), (xc, right_padded_mask([1], 3)))]
    loop_grads = torch.autograd.grad((loop[0] * ga).sum() + (loop[1] * gb).sum() + (loop[2] * gc).sum(), params)
    for y, r, l in zip((ya, yb, yc), refs, loop):
        torch.testing.assert_close(y, r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y, l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ya[~ma], xa[~ma])                          # padded tokens pass through
    names = ['xa', 'xb', 'xc'] + [n for n, _ in moe.named_parameters()]
    for name, a, b, c in zip(names, grads, ref_grads, loop_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4, msg=name)

def test_split_fallback_matches_grouped():
    torch.manual_seed(2)
    moe = MoE(tiny(dim=13))
    x = torch.randn(2, 9, 13)
    mask = right_padded_mask([9, 3], 9)
    y = moe(x, mask)
    y64 = moe.double()(x.double(), mask)                       # float64: no grouped matmul -> split path
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)


def test_topk_respects_k_and_weights_sum_to_one():
    torch.manual_seed(3)
    for k in (1, 2, 3):
        moe = MoE(tiny(n_activated=k))
        xn = torch.nn.functional.layer_norm(torch.randn(40, 16), (16,))
        weights, indices = moe.router(xn)
        assert indices.shape == (40, k) and weights.shape == (40, k)
        assert all(len(set(row)) == k for row in indices.tolist())      # k distinct experts per token
        torch.testing.assert_close(weights.sum(-1), torch.ones(40))
        _, stats = routed(moe, xn.view(4, 10, 16))
        assert int(stats.counts.sum()) == 40 * k


def test_padded_tokens_never_counted_and_pass_through():
    torch.manual_seed(4)
    moe = MoE(tiny()).train()
    mask = right_padded_mask([8, 3, 0], 8)
    x = torch.randn(3, 8, 16)
    y, stats = routed(moe, x, mask)
    _, ref = routed(moe, x[mask].view(1, -1, 16))             # the real tokens alone
    assert torch.equal(stats.counts, ref.counts)
    assert int(stats.tokens) == 11 and int(stats.counts.sum()) == 2 * 11
    torch.testing.assert_close(y[~mask], x[~mask])                        # residual passthrough at pads
    x2 = x.clone()
    x2[~mask] = 1e6 * torch.randn_like(x2[~mask])                         # garbage at padded positions
    y2, stats2 = routed(moe, x2, mask)
    assert torch.equal(stats2.counts, stats.counts)
    torch.testing.assert_close(y2[mask], y[mask])
    assert int(moe.router.epoch_counts.sum()) == 3 * 2 * 11               # three training calls, pads excluded


def test_all_padding_batch_and_finite_gradients():
    torch.manual_seed(5)
    moe = MoE(tiny(dim=13))
    x = torch.randn(2, 5, 13, requires_grad=True)
    y, stats = routed(moe, x, torch.zeros(2, 5, dtype=torch.bool))
    y.sum().backward()
    assert int(stats.counts.sum()) == 0 and int(stats.tokens) == 0
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in moe.parameters())


def skewed_moe(balance, n_experts=8, **kw):
    """A router whose first expert wins for almost every token (all inputs share a direction)."""
    torch.manual_seed(6)
    moe = MoE(tiny(n_routed_experts=n_experts, balance=balance, **kw))
    u = torch.nn.functional.normalize(torch.randn(16), dim=0)
    with torch.no_grad():
        moe.router.gate.weight[0] += 4 * u
    batches = [torch.randn(4, 32, 16) + u for _ in range(6)]
    return moe, batches


def run_epochs(moe, batches, epochs):
    history = []
    moe.train()
    for _ in range(epochs):
        for x in batches:
            with torch.no_grad():
                moe(x)
            moe.after_step()                                   # the training loop's call per step
        history.append(moe.end_epoch())
    return history


@pytest.mark.parametrize('balance,kw', [('running', {}), ('seed', {}), ('bias', {'bias_update_speed': 1e-2})])
def test_balancing_moves_skewed_router_toward_uniform(balance, kw):
    moe, batches = skewed_moe(balance, **kw)
    history = run_epochs(moe, batches, 8)
    violation = [h['max_violation'] for h in history]
    skew = history[0]['step_max_violation'][0]                 # the first step routes before any update
    assert skew > 1.9                                          # deliberately skewed
    assert max(violation[1:]) < violation[0]                   # never worse than the first epoch ...
    assert max(violation[-3:]) < 0.25 * skew                   # ... and pulled toward uniform
    assert history[-1]['dead'] == 0
    # balancing changes the selection only: mixing weights are the chosen experts' unbiased scores
    xn = torch.nn.functional.layer_norm(batches[0].view(-1, 16), (16,))
    weights, indices = moe.router(xn)
    scores = torch.sigmoid(moe.router.gate(xn)).gather(1, indices)
    torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True))
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(xn)))


def test_no_balancing_keeps_the_skew():
    moe, batches = skewed_moe('none')
    history = run_epochs(moe, batches, 3)
    assert history[0]['max_violation'] == history[-1]['max_violation']
    assert torch.equal(moe.router.penalty, torch.ones(8)) and torch.equal(moe.router.bias, torch.zeros(8))


def test_end_epoch_resets_and_reports():
    moe, batches = skewed_moe('seed')
    moe.train()
    moe(batches[0])
    report = moe.end_epoch()
    assert {'activations', 'load', 'max_violation', 'cv', 'dead', 'entropy'} <= set(report)
    assert report['activations'] == 4 * 32 * 2 and len(report['load']) == 8
    assert int(moe.router.epoch_counts.sum()) == 0
    assert moe.router.penalty.max() > 1 >= moe.router.penalty.min()  # the busy expert is penalised
    moe.eval()
    moe(batches[0])
    assert int(moe.router.epoch_counts.sum()) == 0             # eval calls are not counted


def test_balance_stats_on_known_counts():
    s = balance_stats(torch.tensor([4, 0, 2, 2]))
    assert s['activations'] == 8 and s['dead'] == 1
    assert s['load'] == [2.0, 0.0, 1.0, 1.0]
    assert s['max_violation'] == pytest.approx(1.0)
    assert s['cv'] == pytest.approx((2 ** 0.5) / 2)
    assert balance_stats([5, 5, 5, 5])['entropy'] == pytest.approx(1.0)


@pytest.mark.parametrize('balance', ['running', 'seed', 'bias'])
def test_eval_deterministic_and_state_dict_round_trip(balance):
    moe, batches = skewed_moe(balance, bias_update_speed=1e-2)
    moe.cfg.dropout = 0.1
    run_epochs(moe, batches, 2)                                # non-trivial penalty / bias
    moe.eval()
    x, mask = batches[1], right_padded_mask([32, 20, 7, 1], 32)
    y1, s1 = routed(moe, x, mask)
    y2, s2 = routed(moe, x, mask)
    assert torch.equal(y1, y2) and torch.equal(s1.counts, s2.counts)
    state = moe.state_dict()
    assert set(state) == STATE_KEYS                            # transient counters are not saved
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh = MoE(moe.cfg)
    fresh.load_state_dict(torch.load(buf))
    fresh.eval()
    y3, s3 = routed(fresh, x, mask)
    assert torch.equal(y1, y3) and torch.equal(s1.counts, s3.counts)
    for key in ('router.penalty', 'router.usage', 'router.bias'):
        assert torch.equal(fresh.state_dict()[key], state[key]), key


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match='balance'):
        MoEConfig(balance='aux')
    with pytest.raises(ValueError, match='n_activated'):
        MoEConfig(n_routed_experts=4, n_activated=5)
    with pytest.raises(ValueError, match='hidden'):
        MoEConfig(hidden=12)
    with pytest.raises(ValueError, match='width'):
        MoE(tiny())(torch.randn(1, 2, 8))


def test_bias_moves_once_per_after_step():
    moe, batches = skewed_moe('bias', bias_update_speed=1e-2)
    moe.train()
    with torch.no_grad():
        moe(batches[0])
        moe(batches[1])
    assert torch.equal(moe.router.bias, torch.zeros(8))        # forward alone never moves it
    moe.after_step()
    assert moe.router.bias[0] == pytest.approx(-1e-2)          # the over-loaded expert is pushed down
    assert (moe.router.bias > 0).any() and int(moe.router.step_counts.sum()) == 0
    seed_moe, _ = skewed_moe('seed')
    seed_moe.train()
    seed_moe(batches[0])
    seed_moe.after_step()
    assert torch.equal(seed_moe.router.bias, torch.zeros(8)) and torch.equal(seed_moe.router.penalty, torch.ones(8))


def dead_experts_moe(balance):
    """Expert 0 ranks first for every token and experts 6, 7 score ~1e-2 (others >= 0.3): never chosen."""
    torch.manual_seed(7)
    moe = MoE(tiny(n_routed_experts=8, balance=balance))
    u = torch.nn.functional.layer_norm(torch.randn(16), (16,))   # a direction every token shares
    with torch.no_grad():
        moe.router.gate.weight[0] += u / 16
        moe.router.gate.weight[6:] -= 8 * u / 16
    batches = [torch.randn(8, 64, 16) + 2 * u for _ in range(6)]
    return moe, batches


def test_running_balances_within_steps_and_revives_dead_experts():
    moe, batches = dead_experts_moe('running')
    history = run_epochs(moe, batches, 5)                      # 30 steps
    assert history[0]['dead'] == 2 and history[0]['step_max_violation'][0] > 2.5    # expert 0 takes every token
    assert history[1]['dead'] == 0 and history[2]['max_violation'] < 0.15          # within 12 / 18 steps
    assert history[-1]['dead'] == 0 and history[-1]['max_violation'] < 0.05
    assert max(history[-1]['step_max_violation']) < 0.3      # every single step, not just the epoch's sum
    assert moe.router.penalty[6:].max() < 0.1 < 2 < moe.router.penalty[0]  # far beyond the seed's [0.5, 4] clamps
    seed, _ = dead_experts_moe('seed')                         # the epoch rule leaves them dead
    assert run_epochs(seed, batches, 5)[-1]['dead'] == 2


def test_running_updates_every_step_and_keeps_mixing_weights():
    moe, batches = dead_experts_moe('running')
    moe.train()
    xn = torch.nn.functional.layer_norm(batches[0].view(-1, 16), (16,))
    w0, i0 = moe.router(xn)
    with torch.no_grad():
        moe(batches[0])
    assert torch.equal(moe.router.penalty, torch.ones(8))      # forward alone never moves it
    moe.after_step()
    assert moe.router.penalty[0] > 1 > moe.router.penalty[6]   # busy up, dead down, after one step
    assert moe.router.penalty.log().mean().abs() < 1e-5        # re-centred: only ratios matter
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    moe.after_step()                                           # a step without tokens changes nothing
    for key, value in moe.state_dict().items():
        assert torch.equal(value, before[key]), key
    for x in batches * 3:
        with torch.no_grad():
            moe(x)
        moe.after_step()
    w1, i1 = moe.router(xn)
    assert not torch.equal(i0, i1)                             # the penalty changed the selection ...
    scores = torch.sigmoid(moe.router.gate(xn)).gather(1, i1)
    torch.testing.assert_close(w1, scores / scores.sum(-1, keepdim=True))   # ... not the mixing weights
    stats = moe.end_epoch()
    assert len(stats['step_max_violation']) == 2 + 3 * len(batches)
    assert stats['step_max_violation'][1] == 0.0               # the empty step
    assert moe.end_epoch()['step_max_violation'] == []         # reset at every epoch end


def test_step_max_violation_is_the_steps_global_counts():
    moe, batches = skewed_moe('none')
    moe.train()
    expected = []
    for x in batches[:3]:
        _, stats = routed(moe, x)
        expected.append(balance_stats(stats.counts)['max_violation'])
        moe.after_step()
    assert moe.end_epoch()['step_max_violation'] == pytest.approx(expected, rel=1e-5)


def test_seed_updates_only_at_end_epoch_with_the_epoch_rule():
    moe, batches = skewed_moe('seed')
    moe.train()
    counts = torch.zeros(8, dtype=torch.long)
    for x in batches:
        with torch.no_grad():
            _, stats = routed(moe, x)
        counts += stats.counts
        moe.after_step()
        assert torch.equal(moe.router.penalty, torch.ones(8))  # after_step leaves the seed penalty alone
    moe.end_epoch()
    load = counts.float() / counts.float().mean()
    torch.testing.assert_close(moe.router.penalty, load.clamp(0.5, 4.0).sqrt().clamp(0.5, 4.0))  # first epoch's rule


@pytest.mark.parametrize('case', ['running', 'seed', 'bias', 'seed_no_usage'])
def test_pre_router_state_dict_loads_strictly_and_reproduces_its_output(case):
    saved = torch.load(PRE_ROUTER_FIXTURE, weights_only=True)[case]
    state = saved['state']
    keys = list(state)
    assert 'gate.weight' in keys and ('usage' in keys) == (case != 'seed_no_usage')
    moe = MoE(MoEConfig(**saved['config']))
    with torch.no_grad():
        moe.router.usage.fill_(3.0)                            # replaced, by the empty window if the file has none
    moe.load_state_dict(state)                                 # strict
    assert list(state) == keys                                 # the caller's dict is left as it was
    for key in ('gate.weight', 'penalty', 'penalty_step', 'penalty_sign', 'bias', 'usage'):
        assert torch.equal(moe.router.state_dict()[key], state.get(key, torch.zeros(4))), key
    nested = torch.nn.ModuleDict({'moe_layer': MoE(MoEConfig(**saved['config']))})   # a whole model's state_dict
    nested.load_state_dict({'moe_layer.' + k: v for k, v in state.items()})
    for layer in (moe, nested['moe_layer']):
        layer.eval()
        with torch.no_grad():
            y, stats = routed(layer, saved['x'], saved['mask'])
        # routing (counts) must match exactly; the output to rounding, which another CPU's kernels may change
        assert torch.equal(stats.counts, saved['counts'])
        torch.testing.assert_close(y, saved['y'], atol=1e-6, rtol=1e-6)


def test_router_selects_with_the_balancing_state_and_mixes_with_the_scores():
    """Hand-made scores (identity gate on logits): the penalty / bias changes the choice, not the weights."""
    scores = torch.tensor([[0.9, 0.8, 0.3, 0.1],
                           [0.2, 0.7, 0.6, 0.5]])

    def route(balance, **state):
        router = Router(MoEConfig(dim=4, n_routed_experts=4, n_activated=2, hidden=8, balance=balance))
        with torch.no_grad():
            router.gate.weight.copy_(torch.eye(4))
            for name, value in state.items():
                getattr(router, name).copy_(torch.tensor(value))
        weights, indices = router(torch.logit(scores))
        indices, order = indices.sort(-1)
        return indices.tolist(), weights.gather(1, order)

    def mixed(rows):                                           # the chosen scores, normalised per token
        w = scores.gather(1, torch.tensor(rows))
        return w / w.sum(-1, keepdim=True)

    cases = [(('none', {}), [[0, 1], [1, 2]]),
             (('running', {'penalty': [4.0, 1.0, 1.0, 1.0]}), [[1, 2], [1, 2]]),     # score 0.9 / 4 loses
             (('seed', {'penalty': [1.0, 1.0, 0.25, 1.0]}), [[0, 2], [1, 2]]),       # 0.3 / 0.25 wins
             (('bias', {'bias': [0.0, 0.0, -0.5, 0.5]}), [[0, 1], [1, 3]]),          # 0.5 + 0.5 wins
             (('none', {'penalty': [4.0, 1.0, 1.0, 1.0], 'bias': [0.0, 0.0, 0.0, 9.0]}), [[0, 1], [1, 2]])]
    for (balance, state), expected in cases:
        indices, weights = route(balance, **state)
        assert indices == expected, balance
        torch.testing.assert_close(weights, mixed(expected))


def test_layer_delegates_balancing_to_its_router():
    torch.manual_seed(8)
    moe = MoE(tiny())
    assert [n for n, _ in moe.named_parameters()] == ['w_in', 'w_out', 'router.gate.weight']   # optimizer order
    moe.process_group = 'group'                                # what distributed.wrap sets on the layer
    assert moe.router.process_group == 'group' == moe.process_group
    moe.process_group = None
    moe.train()
    _, stats = routed(moe, torch.randn(2, 5, 16))
    assert torch.equal(moe.router.step_counts, stats.counts)
    moe.after_step()
    assert int(moe.router.step_counts.sum()) == 0 and not torch.equal(moe.router.penalty, torch.ones(6))
    assert moe.end_epoch()['activations'] == 2 * 10 and int(moe.router.epoch_counts.sum()) == 0


def test_expert_report_plots_step_violations_when_present(tmp_path):
    base = {'load': [1.5, 0.5, 1.0, 1.0], 'max_violation': 0.5, 'cv': 0.3, 'dead': 0}
    old = [{'epoch': i + 1, 'moe': dict(base)} for i in range(2)]
    new = [{'epoch': i + 1, 'moe': {**base, 'step_max_violation': [3.0, 0.4, 0.0]}} for i in range(2)]
    for name, history in (('old', old), ('new', new)):
        path = tmp_path / f'{name}.png'
        report.plot_experts(history, path)
        assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert (tmp_path / 'new.png').stat().st_size > (tmp_path / 'old.png').stat().st_size   # the third panel
