"""evaluate.py and report.py: metrics by hand, no leakage, determinism, trained beats random, report files."""
import json
import shutil
import math

import numpy as np
import pandas as pd
import pytest
import torch

import data
import demo_data
import evaluate
import model_io
import report
import train
from DeepSeekMoE import MoEConfig
from LongTermInterestModel import LongTermInterestModel, ModelConfig

TINY = ["--item_embedding_dim", "16", "--category_embedding_dim", "8", "--width", "16", "--hidden_dim", "8",
        "--depth", "1", "--heads", "2", "--head_dim", "8", "--moe_experts", "4", "--moe_activated", "2",
        "--moe_hidden", "16", "--n_min", "8", "--n_max", "24", "--k_min", "2", "--k_max", "6",
        "--batch_size", "64", "--export_batch_size", "128", "--no-progress"]
LENGTHS = dict(n_min=8, n_max=24, k_min=2, k_max=6)


# ---------------------------------------------------------------------------------------------- metrics

def test_ranks_recall_ndcg_by_hand():
    scores = np.array([[0.9, 0.1, 0.5, 0.7, 0.3],      # user 0: relevant 2 (rank 3) and 4 (rank 4)
                       [0.1, 0.2, 0.3, 0.4, 0.5]])     # user 1: relevant 4 (rank 1)
    rows, cols = np.array([0, 0, 1]), np.array([2, 4, 4])
    ranks = evaluate.ranks_of_targets(scores, rows, cols, np.arange(5))
    assert ranks.tolist() == [3, 4, 1]
    m = evaluate.topk_metrics(ranks, rows, 2, ks=(3, 5))
    ideal2 = 1 + 1 / math.log2(3)
    assert m["recall@3"] == pytest.approx((0.5 + 1) / 2)
    assert m["ndcg@3"] == pytest.approx((0.5 / ideal2 + 1) / 2)                      # 1/log2(3+1) = 0.5
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["ndcg@5"] == pytest.approx(((0.5 + 1 / math.log2(5)) / ideal2 + 1) / 2)
    assert m["users"] == 2


def test_ties_are_broken_by_the_fixed_priority():
    scores = np.zeros((1, 4))
    prio = np.array([2, 0, 3, 1])
    ranks = evaluate.ranks_of_targets(scores, np.zeros(4, int), np.arange(4), prio)
    assert ranks.tolist() == [3, 1, 4, 2]


def test_reid_metrics_by_hand():
    m = evaluate.reid_metrics(np.array([1, 2, 4, 20]))
    assert m["mrr"] == pytest.approx((1 + 0.5 + 0.25 + 0.05) / 4)
    assert m["recall@1"] == 0.25 and m["recall@10"] == 0.75 and m["users"] == 4
    # the diagonal of a similarity matrix is each user's own short vector
    long_v = np.eye(3, dtype=np.float32)
    short_v = np.array([[1, 0, 0], [1, 0.1, 0], [0, 0, 1]], np.float32)
    assert evaluate.reid_ranks(long_v, short_v, np.arange(3)).tolist() == [1, 1, 1]
    assert evaluate.reid_ranks(long_v, short_v[[1, 0, 2]], np.arange(3)).tolist() == [2, 2, 1]


def _events(rows):
    return pd.DataFrame(rows, columns=data.EVENT_COLUMNS).astype(np.int64)


def test_filtered_short_removes_long_items_and_counts_empty_users():
    base = 390_000
    rows = []
    # user 1: long part items 10..18, short part [10 (overlap), 99 (new)] -> keeps 99
    for i, item in enumerate([10, 11, 12, 13, 14, 15, 16, 17, 18, 10, 99]):
        rows.append((1, item, 5, 1, base + i))
    # user 2: 10 events, short part [21] which is also in the long part -> empty after filtering
    for i, item in enumerate([21, 22, 23, 24, 25, 26, 27, 28, 29, 21]):
        rows.append((2, item, 6, 1, base + i))
    ev = _events(rows)
    vocab = data.Vocab.fit(ev, min_item_count=1)
    seqs = data.build_sequences(ev, vocab)
    fs, kept = evaluate.filtered_short(seqs, np.array([0, 1]))
    assert kept.tolist() == [0] and fs.user_ids.tolist() == [1]
    b = fs.batch(np.arange(fs.n_users), "all", 1, 5)
    assert b["item"][b["mask"]].tolist() == vocab.encode_items([99]).tolist()



def _probe_data(planted: bool, n: int = 1200, d: int = 16, p: int = 5, seed: int = 0):
    """Train / held-out vectors and 0/1 labels; planted: each label is a thresholded linear function of the vector."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n, d))
    if planted:
        logits = x @ rng.normal(size=(d, p))
        y = logits > np.quantile(logits, 0.8, axis=0)                  # ~20% positives per column, as categories
    else:
        y = rng.random((2 * n, p)) < 0.2
    return x[:n], y[:n], x[n:], y[n:]


def test_linear_probe_finds_planted_labels_and_is_at_chance_on_noise():
    planted = evaluate.linear_probe(*_probe_data(True))
    assert planted["auc"] > 0.95 and planted["ap"] > 0.8 and planted["users"] == 1200
    noise = evaluate.linear_probe(*_probe_data(False))
    assert abs(noise["auc"] - 0.5) < 0.1 and noise["ap"] < 0.35
    assert evaluate.linear_probe(*_probe_data(True)) == planted             # deterministic


def test_linear_probe_skips_one_class_columns_and_refuses_when_none_is_left():
    tx, ty, hx, hy = _probe_data(True)
    ty, hy = ty.copy(), hy.copy()
    ty[:, 0] = True                                                         # cannot be fitted
    hy[:, 1] = False                                                        # AUC undefined
    assert evaluate.linear_probe(tx, ty, hx, hy) == evaluate.linear_probe(tx, ty[:, 2:], hx, hy[:, 2:])
    with pytest.raises(ValueError, match="both classes"):
        evaluate.linear_probe(tx, ty[:, :2], hx, hy[:, :2])


# ---------------------------------------------------------------------------------------------- demo data

@pytest.fixture(scope="module")
def demo_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("evlog") / data.TIANCHI_FILE
    demo_data.write_log(path, n_users=300, n_days=8, seed=3)
    return path


@pytest.fixture(scope="module")
def split(demo_log):
    events, _ = data.read_events(str(demo_log), progress=False)
    cutoff = data.last_days_cutoff(events, 1)
    history, target = data.split_at_hour(events, cutoff)
    vocab = data.Vocab.fit(history, min_item_count=3)
    return events, history, target, cutoff, vocab, data.build_sequences(history, vocab)


def _tiny_model(vocab, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_items=vocab.n_items, n_categories=vocab.n_categories, item_embedding_dim=16,
                      category_embedding_dim=8, width=16, depth=1, heads=2, head_dim=8, hidden_dim=8, max_positions=24)
    return LongTermInterestModel(cfg, MoEConfig(dim=16, n_routed_experts=4, n_activated=2, hidden=16)).eval()


def test_no_target_day_event_reaches_a_sequence(split):
    events, history, target, cutoff, vocab, seqs = split
    assert len(target) > 0 and (target["hour"] >= cutoff).all()
    assert int(seqs.abs_hour.max()) < cutoff and seqs.n_events == len(history)
    # every input the evaluation builds from the sequences: all / long / short parts and the filtered short part
    users = seqs.trainable
    for part in ("all", "long", "short"):
        s, e = seqs.part_bounds(users, part)
        pos, _ = data.expand_ranges(s, e)
        assert (seqs.abs_hour[pos] < cutoff).all()
    fs, _ = evaluate.filtered_short(seqs, users)
    assert fs.n_events and int(fs.abs_hour.max()) < cutoff
    # target-day (user, hour) pairs are absent from the history
    t_keys = set(zip(target["user_id"], target["hour"]))
    h_keys = set(zip(seqs.user_ids[np.repeat(np.arange(seqs.n_users), seqs.lengths)], seqs.abs_hour))
    assert not t_keys & h_keys
    # sequences built from the whole log are refused
    leaky = data.build_sequences(events, vocab)
    with pytest.raises(ValueError, match="target day"):
        evaluate.evaluate(_tiny_model(vocab), leaky, target, vocab, {"all": np.arange(leaky.n_users)}, **LENGTHS)


def test_evaluation_is_deterministic_and_complete(split):
    _, _, target, _, vocab, seqs = split
    model = _tiny_model(vocab)
    groups = {"a": np.arange(0, seqs.n_users, 2), "b": np.arange(1, seqs.n_users, 2)}
    m1 = evaluate.evaluate(model, seqs, target, vocab, groups, seed=5, **LENGTHS)
    m2 = evaluate.evaluate(model, seqs, target, vocab, groups, seed=5, **LENGTHS)
    m1["_info"].pop("seconds"), m2["_info"].pop("seconds")
    assert m1 == m2
    json.dumps(m1)                                                      # JSON-serialisable as is
    for g in groups:
        assert set(m1[g]) == set(evaluate.TASKS)
        assert set(m1[g]["next_item"]) == set(evaluate.METHODS)
        # the model's category half is the pool alone: categories are scored by decoding it, cosine beside
        assert set(m1[g]["next_category"]) == set(evaluate.METHODS) | {"model_cosine", "random_init_cosine"}
        assert set(m1[g]["reid"]) == {"model", "random_init", "mean_emb"}
        for task in ("next_category", "next_item"):
            for row in m1[g][task].values():
                assert all(0 <= row[k] <= 1 for k in ("recall@10", "ndcg@10", "recall@50", "ndcg@50"))
    table = evaluate.format_table(m1)
    assert "[a] reid_filtered" in table and "user_freq" in table




def test_probe_labels_take_the_categories_most_training_users_touch():
    # (user row, category) events; rows 0-2 train, row 3 held out; category 1 is the unknown one
    user = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2])
    cat = np.array([9, 9, 5, 5, 9, 7, 1, 7, 8, 1, 1, 3])
    top, labels = evaluate.probe_labels(user, cat, 4, np.array([0, 1, 2]), n_labels=2)
    assert top.tolist() == [5, 9]                   # 5 and 9: two training users each; 1 is never a label
    assert labels.tolist() == [[True, True], [True, True], [False, False], [False, False]]
    top, labels = evaluate.probe_labels(user, cat, 4, np.array([0, 1, 2]), n_labels=3)
    assert top.tolist() == [3, 5, 9]                # ties among one-user categories: the lower index (3 < 7)
    assert labels[:, 0].tolist() == [False, False, True, False]

def test_probe_runs_on_heldout_only_with_counts(split):
    _, _, target, _, vocab, seqs = split
    groups = {"train": np.arange(0, seqs.n_users, 2), "heldout": np.arange(1, seqs.n_users, 2)}
    m = evaluate.evaluate(_tiny_model(vocab), seqs, target, vocab, groups, seed=5, **LENGTHS)
    probe = m["heldout"]["probe_category"]
    cnt = m["_info"]["counts"]["heldout"]["probe_category"]
    assert "probe_category" not in m["train"]
    assert set(probe) == {"model", "random_init", "mean_emb"}
    assert cnt["categories"] == evaluate.PROBE_CATEGORIES and 0 < cnt["scored_categories"] <= cnt["categories"]
    assert 0 < cnt["users"] < len(groups["heldout"]) and 0 < cnt["train_users"] < len(groups["train"])
    assert all(0 <= row["auc"] <= 1 and row["users"] == cnt["users"] for row in probe.values())
    assert "[heldout] probe_category" in evaluate.format_table(m)


# ---------------------------------------------------------------------------------------------- trained model

@pytest.fixture(scope="module")
def trained(demo_log, tmp_path_factory):
    """train.py with evaluation on: last day and 30% of users held out; writes the report too."""
    save_dir = tmp_path_factory.mktemp("evsaved")
    # batch 16: ~13 steps an epoch on 210 training users (at 64 a handful of steps barely moves the model);
    # hidden 32: with 8 numbers the item half of a vector (4) cannot tell items apart; fp32 on every machine: the
    # margins below were measured with it (bf16 vs fp32 is compared over seeds in the README, not here)
    code = train.main(["--data_path", str(demo_log), "--save_dir", str(save_dir), "--no_redis", *TINY, "--epochs", "8",
                       "--hidden_dim", "32", "--precision", "fp32",
                       "--batch_size", "16", "--lr", "0.003", "--test_fraction", "0.3", "--seed", "1"])
    assert code == 0
    return save_dir


def test_trained_model_beats_random_weights_held_out(trained):
    """Random weights are a strong baseline here: the default model pools its events' target vectors, with the
    same recency prior on the category half, so an untrained model already matches a user's own items and
    categories. What training adds on held-out users is measured on re-identification: MRR 0.386 trained vs
    0.358 random here (+0.028; +0.011, +0.034, +0.013 with --seed 2, 3, 4, each its own held-out users). The
    cosine ranking of next-day categories by the learned codes used to be the clearer signal, but with the
    category half weighted towards recent events (--category_half_life 10) it is not on every seed (-0.013 here,
    +0.043..+0.065 on seeds 2-4); the decoded score reads back event counts, which random codes give as well."""
    model, vocab, config = model_io.load_model(trained)
    events, _ = data.read_events(config["train"]["data_path"], progress=False)
    history, target = data.split_at_hour(events, data.last_days_cutoff(events, 1))
    seqs = data.build_sequences(history, vocab)
    heldout = seqs.user_index(config["eval"]["heldout_users"])
    assert len(heldout) >= 50 and (heldout >= 0).all()
    m = evaluate.evaluate(model, seqs, target, vocab, {"heldout": heldout}, seed=0, **LENGTHS)
    reid = m["heldout"]["reid"]
    assert reid["model"]["users"] == reid["random_init"]["users"] == len(heldout)
    assert reid["model"]["mrr"] > 5 * sum(1 / np.arange(1, len(heldout) + 1)) / len(heldout)   # 5x chance
    assert reid["model"]["mrr"] > reid["random_init"]["mrr"] + 0.01


def test_cli_uses_saved_heldout_users(trained, demo_log, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert evaluate.main(["--save_dir", str(trained), "--data_path", str(demo_log), "--no-progress",
                          "--json", str(out)]) == 0
    m = json.loads(out.read_text())
    assert set(m) == {"train", "heldout", "_info"}
    assert "[heldout] next_category" in capsys.readouterr().out


def test_training_run_writes_valid_report(trained):
    for name in ("report_loss.png", "report_experts.png", "report_users.png"):
        assert (trained / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    blob = json.loads((trained / "metrics.json").read_text())
    assert "heldout" in blob["metrics"] and len(blob["history"]) == 8


def test_write_report_directly_handles_nan_and_empty_inputs(tmp_path):
    hist = [{"epoch": i + 1, "train_loss": 0.7 - 0.1 * i, "val_loss": float("nan") if i == 0 else 0.6, "val_mrr": 0.1,
             "moe": {"load": [1.5, 0.5, 1.0, 1.0], "max_violation": 0.5, "cv": 0.3, "dead": 0}} for i in range(3)]
    rng = np.random.default_rng(0)
    paths = report.write_report(tmp_path / "a", history=hist, metrics={"g": {"t": {"m": {"x": np.float32(0.5)}}}},
                                user_vectors=rng.normal(size=(40, 8)).astype(np.float32),
                                top_category=rng.integers(0, 15, 40))
    for key in ("loss", "experts", "users"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    blob = json.loads(paths["metrics"].read_text())
    assert blob["history"][0]["val_loss"] is None and blob["metrics"]["g"]["t"]["m"]["x"] == 0.5
    empty = report.write_report(tmp_path / "b")
    assert all(p.exists() for p in empty.values())
    assert not list((tmp_path / "a").glob(".*.tmp"))                     # atomic writes leave no temp files


@pytest.mark.parametrize("cache", ["--cache", "--no-cache"])
def test_cli_reads_the_log_as_the_model_was_trained_on_it(trained, demo_log, tmp_path, capsys, cache):
    """A model trained with --dedupe is evaluated on the deduplicated log (its training read), not the raw one."""
    saved = tmp_path / "saved"
    shutil.copytree(trained, saved)
    config = json.loads((saved / "config.json").read_text())
    config["train"]["dedupe"] = True
    (saved / "config.json").write_text(json.dumps(config))
    log = tmp_path / "log" / demo_log.name
    log.parent.mkdir()
    shutil.copyfile(demo_log, log)
    assert evaluate.main(["--save_dir", str(saved), "--data_path", str(log), "--no-progress", cache]) == 0
    assert "dropped (--dedupe)" in capsys.readouterr().out
