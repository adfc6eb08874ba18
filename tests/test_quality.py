"""quality.py: aggregation of per-run metrics into the quality table, its flags, and the capacity oracles
(no training here)."""
import numpy as np
import pytest

import quality


def _run(log, seed, model_mrr, mean_emb_mrr, probe=True, violation=1.5):
    """A metrics.json blob as train.py writes it, with a few tasks."""
    heldout = {
        "reid": {"model": {"mrr": model_mrr, "users": 150}, "mean_emb": {"mrr": mean_emb_mrr, "users": 150},
                 "random_init": {"mrr": 0.04, "users": 150}},
        "next_category": {m: {"recall@10": r, "ndcg@10": r / 2, "users": 120} for m, r in
                          (("model", 0.5), ("mean_emb", 0.4), ("user_freq", 0.8), ("popular", 0.3))},
    }
    if probe:
        heldout["probe_category"] = {"model": {"auc": 0.7, "users": 110}, "mean_emb": {"auc": 0.6, "users": 110}}
    history = [{"epoch": 1, "moe": {"max_violation": 9.0, "dead": 3}},
               {"epoch": 2, "moe": {"max_violation": violation, "dead": 0}}]
    return {"log": log, "seed": seed, "metrics": {"metrics": {"heldout": heldout, "train": {}}, "history": history}}


def _row(rows, task, metric):
    return next(r for r in rows if r["task"] == task and r["metric"] == metric)


def test_aggregate_means_spreads_and_verdicts():
    runs = [_run("demo", 1337, 0.2, 0.6, violation=1.0), _run("demo", 1, 0.4, 0.5, violation=2.0),
            _run("ub", 1337, 0.3, 0.1, probe=False)]
    table = quality.aggregate(runs)
    assert list(table) == ["demo", "ub"] and len(table["demo"]) == len(quality.ROWS)
    reid = _row(table["demo"], "reid", "mrr")
    assert reid["stats"]["model"] == pytest.approx({"mean": 0.3, "min": 0.2, "max": 0.4, "seeds": 2})
    assert reid["best_baseline"] == "mean_emb" and reid["model_beats"] is False and reid["users"] == 150
    assert _row(table["ub"], "reid", "mrr")["model_beats"] is True                 # 0.3 > mean_emb 0.1
    cat = _row(table["demo"], "next_category", "ndcg@10")
    assert cat["best_baseline"] == "user_freq" and cat["stats"]["user_freq"]["mean"] == pytest.approx(0.4)
    moe = _row(table["demo"], "moe", "max_violation")
    assert moe["stats"] == {"model": {"mean": 1.5, "min": 1.0, "max": 2.0, "seeds": 2}}   # the last epoch only
    assert moe["model_beats"] is None and moe["users"] is None
    # tasks and methods a run lacks are absent, not zero
    missing = _row(table["ub"], "probe_category", "auc")
    assert missing["stats"] == {} and missing["model_beats"] is None
    assert "user_freq" not in reid["stats"]


def test_markdown_shows_spread_dashes_and_provenance():
    runs = [_run("demo", 1337, 0.2, 0.6), _run("demo", 1, 0.4, 0.5), _run("ub", 1337, 0.3, 0.1, probe=False)]
    header = {"name": "x", "date": "2025-01-01 00:00 UTC", "commit": "abc1234+dirty", "command": "python quality.py",
              "seeds": [1337, 1], "flags": ["--loss", "bpr"], "failed": ["ub seed 1: train.py exited with status 1"],
              "logs": {"demo": {"path": "d.csv", "commands": ["python train.py --data_path d.csv"], "wall_s": [61.0]}}}
    text = quality.markdown_report(quality.aggregate(runs), header)
    assert "abc1234+dirty" in text and "`--loss bpr`" in text and "python train.py --data_path d.csv" in text
    assert "1m01s" in text and "**failed**: ub seed 1" in text
    assert ("| re-identification | mrr | 150 | 0.300 (0.200–0.400) | **0.550** (0.500–0.600) | – | – | "
            "0.040 (0.040–0.040) | no (mean_emb) |") in text
    ub = text.split("## ub")[1]
    assert "| category probe (linear) | auc | – | – | – | – | – | – | – |" in ub
    assert "| re-identification | mrr | 150 | **0.300** | 0.100 | – | – | 0.040 | yes (mean_emb) |" in ub


def test_scaling_points_are_ordered_by_size():
    runs = [dict(_run("demo_400", 1337, 0.4, 0.5), users=400), dict(_run("demo_200", 1337, 0.2, 0.6), users=200)]
    points = quality.scaling_points(runs)
    assert [p["users"] for p in points] == [200, 400]
    assert points[0]["values"]["reid mrr"] == {"model": 0.2, "mean_emb": 0.6, "random_init": 0.04}
    assert points[0]["values"]["next_item recall@10"] == {} and points[0]["heldout_users"]["reid mrr"] == 150


def test_flags_pass_through_and_reserved_flags_are_refused(capsys):
    args, flags = quality.parse_args(["--logs", "demo", "--", "--epochs", "1", "--name", "x"])
    assert args.logs == "demo" and args.name == "" and flags == ["--epochs", "1", "--name", "x"]
    for bad in (["--", "--seed", "3"], ["--", "--save_dir=x"], ["--seeds", "1", "--", "--no-evaluate"]):
        with pytest.raises(SystemExit):
            quality.parse_args(bad)
        assert "set by quality.py" in capsys.readouterr().err


def _tiny_log(path, n_users=60, n_cats=30, seed=0):
    """A UserBehavior-format log: each user views categories from their own skewed mix for 6 days, then on the
    last day (the target day) from the same mix; items are category * 100 + 0..4."""
    rng = np.random.default_rng(seed)
    day0 = 1512057600                                       # 2017-12-01 00:00 China time, in seconds
    lines = []
    for u in range(1, n_users + 1):
        mix = rng.dirichlet(np.full(n_cats, 0.3))
        for day, n in [(d, 25) for d in range(6)] + [(6, 6)]:
            for c in rng.choice(n_cats, n, p=mix):
                t = day0 + day * 86400 + int(rng.integers(0, 86400))
                lines.append(f'{u},{(c + 1) * 100 + int(rng.integers(0, 5))},{c + 1},pv,{t}')
    path.write_text('\n'.join(lines) + '\n')
    return path


def test_capacity_svd_matches_counts_at_full_rank_and_loses_below(tmp_path):
    log = _tiny_log(tmp_path / 'tiny.csv')
    kw = dict(dims=(1, 64), top_dims=(8,), seed=0, event_half_lives=(10, float('inf')), event_dims=(1, 64))
    res = quality.capacity_bounds(log, **kw)
    cat, item = res['tasks']['category'], res['tasks']['item']
    # categories: 30 < 60 users (basis from the category Gram); items: > 60 users (basis from the user Gram)
    assert cat['candidates'] == 30 and cat['users'] == 60 and cat['svd_rank'] == 30
    assert item['candidates'] > 64 and item['svd_rank'] == 60
    for task in (cat, item):
        rows = {(r['method'], r['dim']): r for r in task['rows']}
        decoded = [('random code, decoded', 1), ('random code, decoded', 64)]
        for h in ('10', 'inf'):
            decoded += [(f'event half-life {h}', None), (f'event half-life {h}, decoded', 1),
                        (f'event half-life {h}, decoded', 64)]
        decoded = decoded if task is cat else []
        assert list(rows) == [('user_freq', None), ('counts', None), ('random code', 1), ('random code', 64),
                              ('SVD', 1), ('SVD', 64), ('top-10 indicator', 8)] + decoded
        counts = rows[('counts', None)]
        # d >= the rank of the profiles: the SVD basis spans every user's profile, so it ranks as the counts do
        for m in ('recall@10', 'ndcg@10'):
            assert rows[('SVD', 64)][m] == pytest.approx(counts[m], abs=1e-12)
            # one dimension ranks every user's candidates along the same axis: clearly worse than the counts
            assert rows[('SVD', 1)][m] < counts[m] - 0.05
            assert rows[('random code', 1)][m] < counts[m] - 0.05
            assert all(0.0 <= r[m] <= 1.0 for r in rows.values())
    # decoding a 64-float sketch of 30 categories gives user_freq's scores back: the same ranking; one float cannot
    rows = {(r['method'], r['dim']): r for r in cat['rows']}
    for m in ('recall@10', 'ndcg@10'):
        assert rows[('random code, decoded', 64)][m] == pytest.approx(rows[('user_freq', None)][m], abs=1e-12)
        assert rows[('random code, decoded', 1)][m] < rows[('user_freq', None)][m] - 0.05
        # the model's pool: an endless half-life weighs every event alike (the counts); 64 floats decode it exactly
        assert rows[('event half-life inf', None)][m] == pytest.approx(rows[('counts', None)][m], abs=1e-12)
        exact = rows[('event half-life 10', None)][m]
        assert rows[('event half-life 10, decoded', 64)][m] == pytest.approx(exact, abs=1e-12)
        assert rows[('event half-life 10, decoded', 1)][m] < exact - 0.05
    again = quality.capacity_bounds(log, **kw)                                      # seeded: the same numbers
    assert [t['rows'] for t in again['tasks'].values()] == [t['rows'] for t in res['tasks'].values()]
    text = quality.capacity_markdown({'tiny': res}, {'date': 'd', 'commit': 'c', 'command': 'python quality.py'})
    assert '| SVD | 64 | ' + format(cat['rows'][1]['recall@10'], '.3f') in text


def test_capacity_flag_refuses_training_flags(capsys):
    assert quality.parse_args(['--capacity'])[0].capacity
    with pytest.raises(SystemExit):
        quality.parse_args(['--capacity', '--', '--epochs', '1'])
    assert 'trains nothing' in capsys.readouterr().err
