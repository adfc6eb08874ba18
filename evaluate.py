"""Held-out evaluation of the user vectors against baselines, on a split in time and in users.

Protocol: the log's last day is the target day; every sequence is built
from the earlier events only (the history). Users are evaluated in groups (e.g. 'train' and 'heldout', the
latter never trained on), each task within one group:

- reid / reid_filtered: each user's long-tower vector of their 'long' part must find their own short-tower
  vector of the 'short' part among all group users' (MRR, Recall@1, Recall@10). The filtered variant first
  removes from every short part the items that also occur in the same user's long part (item-id overlap
  otherwise solves the task); users left with an empty short part are dropped from it and counted.
- next_category / next_item (and *_buy: behaviour 4 only): for every user with target-day events, rank the
  categories / items they touch on the target day over the full candidate set (every known category, every
  known item up to `max_items`), no sampled negatives: Recall@K = hits in the top K / relevant candidates,
  NDCG@K with binary gains. Target-day items outside the vocabulary cannot be ranked by any method and are
  left out of the relevant set (counted as 'unrankable').
- probe_category ('heldout' group, when a 'train' group is given too): the vector as a feature for someone
  else's ranking model. A one-vs-rest logistic regression on standardised vectors predicts which of the
  PROBE_CATEGORIES categories most 'train' users touch on the target day each user touches; fitted on the
  'train' users, macro ROC-AUC and average precision on the 'heldout' users (users with target-day events).

How the model scores a candidate: cosine between the user's long-tower vector of the whole history ('all'
part, as exported) and the candidate's vector (`LongTermInterestModel.candidate_vectors`): the target head of
the candidate's (item, category) - what the 'allaction' objective trains the long vector to score; an item
candidate's category half weighted by ModelConfig.item_category_weight (0.5 by default) - or, for
models without one (the 'bpr' / 'infonce' recipes), the short tower's vector of a one-event sequence holding
that candidate, the two-tower space those are trained in (long vs short). A category candidate is (item = unknown, that
category); an item candidate is (that item, its most frequent category in the history). The other features
are those of a plausible next event: a view, at the history's most common hour of day, on the target day's
weekday, with the time features of that hour (past the training span, so clipped to [1, 0]).
Models whose category half is the pool alone (ModelConfig.exact_categories, the default) score category
candidates by decoding it instead: decode.category_weights reads each user's recency-weighted category shares
back out of the vector (ties, e.g. categories the user never touched, by popularity, as user_freq breaks them);
the cosine scores are reported beside them as 'model_cosine' and 'random_init_cosine'. random_init is
scored the same way as the model.

Baselines, scored on the same users, candidates and metrics:
- popular: history counts of the candidate (the same ranking for everyone);
- user_freq: the user's own recency-weighted counts over the events the model sees (half-life
  RECENCY_HALF_LIFE_H hours before the cut), ties broken by popularity;
- mean_emb: cosine between the mean of the user's history item (category) embeddings, from the trained
  model's own tables, and each candidate's embedding; for re-identification the long part's mean against
  the short part's (item and category means, each L2-normalised, concatenated);
- random_init: the same architecture, freshly initialised with a fixed seed, scored exactly like the model.

    metrics = evaluate(model, seqs, target_events, vocab, groups={'heldout': idx})
    print(format_table(metrics))

CLI, with a saved model (evaluates the log's last day):
    python evaluate.py --save_dir saved_models --data_path DATA/train_user
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Callable

import numpy as np

import runtime  # first: it sets OpenMP's wait policy before torch loads
import torch  # noqa: E402

import data  # noqa: E402
import decode  # noqa: E402
from atomic_files import atomic_json_save  # noqa: E402
import inference  # noqa: E402
from LongTermInterestModel import LongTermInterestModel  # noqa: E402

KS = (10, 50)                   # cut-offs of Recall@K / NDCG@K for next-day prediction
REID_KS = (1, 10)               # cut-offs of re-identification recall
MAX_ITEMS = 50_000              # item candidates: the most frequent known items (the demo has a few thousand)
MAX_REID_USERS = 20_000         # re-identification pool per group; larger groups are subsampled (seeded)
RECENCY_HALF_LIFE_H = 72        # user_freq baseline: an event's weight halves every 3 days before the cut
CHUNK = 256                     # users per scoring chunk: bounds the (users, candidates) score matrix
METHODS = ('model', 'random_init', 'mean_emb', 'user_freq', 'popular')
TASKS = ('reid', 'reid_filtered', 'next_category', 'next_category_buy', 'next_item', 'next_item_buy')
BUY = 4
PROBE_CATEGORIES = 20           # linear probe: one-vs-rest over this many most frequent target-day categories
PROBE_C = 1.0                   # ... its inverse L2 strength (on standardised features)
PROBE_MAX_ITER = 200            # ... and lbfgs iterations per category (~0.1 s at 1,000 users x 128 dims)


# ----------------------------------------------------------------------------------------------
# metrics


def ranks_of_targets(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """1-based rank of candidate cols[p] in the ranking of row rows[p] of scores (R, C).

    Higher score ranks first; ties are broken by `priority` (C,) (lower first), a fixed random order of the
    candidates, so a method that cannot tell candidates apart scores as chance, not as best or worst case.
    """
    s = scores[rows]                                                     # (P, C)
    t = s[np.arange(len(rows)), cols][:, None]                           # (P, 1)
    ahead = (s > t) | ((s == t) & (priority[None, :] < priority[cols][:, None]))
    return ahead.sum(1) + 1


def reid_metrics(ranks: np.ndarray, ks=REID_KS) -> dict:
    """MRR and Recall@k of one relevant candidate per user, from its 1-based ranks."""
    r = np.asarray(ranks, np.float64)
    if r.size == 0:
        return {'users': 0}
    out = {'mrr': float(np.mean(1.0 / r))}
    for k in ks:
        out[f'recall@{k}'] = float(np.mean(r <= k))
    out['users'] = int(r.size)
    return out


def topk_metrics(ranks: np.ndarray, owner: np.ndarray, n_users: int, ks=KS) -> dict:
    """Recall@K and NDCG@K averaged over users, from the 1-based ranks of every relevant candidate.

    ranks[p] is the rank of relevant pair p and owner[p] in [0, n_users) its user; every user owns at least
    one pair. Recall@K = hits in the top K / relevant; NDCG@K = sum over hits of 1/log2(rank + 1) divided by
    the ideal sum over min(relevant, K) positions.
    """
    ranks = np.asarray(ranks, np.float64)
    owner = np.asarray(owner, np.int64)
    n_rel = np.bincount(owner, minlength=n_users).astype(np.float64)
    if n_users == 0:
        return {'users': 0}
    out = {}
    for k in ks:
        hit = ranks <= k
        hits = np.bincount(owner, weights=hit, minlength=n_users)
        gain = np.bincount(owner, weights=np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0), minlength=n_users)
        ideal_cum = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])   # (k+1,)
        ideal = ideal_cum[np.minimum(n_rel, k).astype(np.int64)]
        out[f'recall@{k}'] = float(np.mean(hits / n_rel))
        out[f'ndcg@{k}'] = float(np.mean(gain / ideal))
    out['users'] = int(n_users)
    return out


# ----------------------------------------------------------------------------------------------
# inputs


def subset_sequences(seqs: data.Sequences, user_ids: np.ndarray, positions: np.ndarray,
                     owner: np.ndarray) -> data.Sequences:
    """A Sequences of the given flat positions (sorted by owner, then time), owner[i] in [0, len(user_ids))."""
    counts = np.bincount(owner, minlength=len(user_ids))
    offsets = np.zeros(len(user_ids) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    flat = {f.name: getattr(seqs, f.name)[positions] for f in dataclasses.fields(data.Sequences)
            if f.name not in ('user_ids', 'offsets')}                       # every per-event array
    return data.Sequences(user_ids=np.asarray(user_ids, np.int64), offsets=offsets, **flat)


def filtered_short(seqs: data.Sequences, users: np.ndarray) -> tuple[data.Sequences, np.ndarray]:
    """Short parts with the items of the same user's long part removed.

    Returns (Sequences of the kept users, whose 'all' part is the filtered short part; index into `users` of
    the kept users). Users whose filtered short part is empty are not kept. The unknown item (1) is shared by
    all rare items, so it identifies nobody and is never removed.
    """
    users = np.asarray(users, np.int64)
    ls, le = seqs.part_bounds(users, 'long')
    ss, se = seqs.part_bounds(users, 'short')
    lpos, lown = data.expand_ranges(ls, le)
    spos, sown = data.expand_ranges(ss, se)
    n_items = np.int64(max(int(seqs.item.max()) if seqs.item.size else 0, 1) + 1)
    long_keys = lown * n_items + seqs.item[lpos]
    short_keys = sown * n_items + seqs.item[spos]
    keep = ~np.isin(short_keys, long_keys) | (seqs.item[spos] == data.UNKNOWN)
    spos, sown = spos[keep], sown[keep]
    kept = np.flatnonzero(np.bincount(sown, minlength=len(users)) > 0)
    new_owner = np.searchsorted(kept, sown)
    return subset_sequences(seqs, seqs.user_ids[users[kept]], spos, new_owner), kept


def item_categories(seqs: data.Sequences, n_items: int) -> np.ndarray:
    """(n_items,) each item index's most frequent category index in the history (UNKNOWN when never seen)."""
    key = seqs.item.astype(np.int64) * (int(seqs.category.max()) + 1) + seqs.category
    uniq, counts = np.unique(key, return_counts=True)
    item, cat = np.divmod(uniq, int(seqs.category.max()) + 1)
    order = np.lexsort((-counts, item))                   # per item, the most frequent category first
    item, cat = item[order], cat[order]
    first = np.r_[True, item[1:] != item[:-1]]
    out = np.full(n_items, data.UNKNOWN, np.int64)
    out[item[first]] = cat[first]
    return out


def candidate_batch(items: np.ndarray, categories: np.ndarray, abs_hour: int,
                    time_feat: np.ndarray) -> dict[str, np.ndarray]:
    """One-event sequences (C, 1) of the given (item, category) candidates viewed at abs_hour (hours since
    1970, local), in the batch contract."""
    c = len(items)
    full = lambda v: np.full((c, 1), v, np.int64)                          # noqa: E731
    weekday, hour, weekend = (int(a[0]) for a in data.calendar_features([abs_hour]))
    return {'item': np.asarray(items, np.int64).reshape(c, 1), 'category': np.asarray(categories, np.int64).reshape(c, 1),
            'weekday': full(weekday), 'hour': full(hour), 'weekend': full(weekend),
            'behavior': full(1), 'time': np.repeat(time_feat.reshape(1, 1, 2), c, 0).astype(np.float32),
            'mask': np.ones((c, 1), bool)}


@torch.inference_mode()
def encode_batch(model, batch: dict, tower: str, device, batch_size: int) -> np.ndarray:
    """Vectors (B, D) float32 of a numpy batch, in slices of batch_size rows."""
    was = model.training
    model.eval()
    out = []
    try:
        n = len(batch['mask'])
        for lo in range(0, n, batch_size):
            part = inference.batch_to_tensors({k: v[lo:lo + batch_size] for k, v in batch.items()}, device)
            with inference.autocast(device):
                v = model.candidate_vectors(part) if tower == 'candidate' else model.encode(part, tower=tower)
                out.append(v.float().cpu().numpy())
    finally:
        model.train(was)
    return np.concatenate(out) if out else np.zeros((0, model.cfg.hidden_dim), np.float32)


def random_init_model(model: LongTermInterestModel, seed: int, device) -> LongTermInterestModel:
    """The same architecture with fresh weights from a fixed seed (and the model's statistics of its training
    log: the category_idf scale); the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = LongTermInterestModel(model.cfg, model.moe_cfg)
    if getattr(model.cfg, 'category_idf', 0.0):
        with torch.no_grad():
            fresh.feature_embedding.category_scale.copy_(model.feature_embedding.category_scale)
    return fresh.to(device).eval()


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mean_embeddings(table: np.ndarray, index: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, d) L2-normalised mean of table rows index (B, L) over mask; the unknown row (1) is left out."""
    m = (mask & (index > data.UNKNOWN)).astype(np.float32)                 # (B, L)
    summed = np.einsum('bl,bld->bd', m, table[index])                      # (B, d)
    return _normalise(summed / np.maximum(m.sum(1, keepdims=True), 1.0))


def _tables(model) -> tuple[np.ndarray, np.ndarray]:
    fe = model.feature_embedding
    return (fe.item.weight.detach().float().cpu().numpy(), fe.category.weight.detach().float().cpu().numpy())


def mean_pooled_users(model, seqs, users, part, min_len, max_len, which=('item', 'category')) -> np.ndarray:
    """Per user, the concatenated L2-normalised mean embeddings (the given tables) of the part's events."""
    item_t, cat_t = _tables(model)
    tables = {'item': item_t, 'category': cat_t}
    out = []
    for lo in range(0, len(users), CHUNK):
        b = seqs.batch(users[lo:lo + CHUNK], part, min_len, max_len)
        out.append(np.concatenate([mean_embeddings(tables[w], b[w], b['mask']) for w in which], axis=1))
    return _normalise(np.concatenate(out)) if out else np.zeros((0, 1), np.float32)


# ----------------------------------------------------------------------------------------------
# tasks


def reid_ranks(long_v: np.ndarray, short_v: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Rank of each user's own short vector (the diagonal) among all short vectors, by cosine."""
    ranks = []
    long_v, short_v = _normalise(long_v), _normalise(short_v)
    for lo in range(0, len(long_v), CHUNK):
        sims = long_v[lo:lo + CHUNK] @ short_v.T                            # (chunk, G)
        rows = np.arange(len(sims))
        ranks.append(ranks_of_targets(sims, rows, rows + lo, priority))
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def reidentification(models: dict, base_model, seqs, users, lengths, device, batch_size, seed,
                     progress=False) -> tuple[dict, dict, dict]:
    """{'reid': {method: metrics}, 'reid_filtered': {...}} and counts, for one group's users (>= 2 events)."""
    n_min, n_max, k_min, k_max = lengths
    kw = dict(device=device, batch_size=batch_size, progress=progress)
    fshort, kept = filtered_short(seqs, users)
    prio = np.random.default_rng([seed, 2]).permutation(len(users))
    prio_f = np.random.default_rng([seed, 3]).permutation(len(kept))
    plain, filt = {}, {}
    for name, m in models.items():
        long_v = inference.compute_user_vectors(m, seqs, users, part='long', tower='long', min_len=n_min,
                                                max_len=n_max, desc=f'reid {name}', **kw)
        short_v = inference.compute_user_vectors(m, seqs, users, part='short', tower='short', min_len=k_min,
                                                 max_len=k_max, desc=f'reid {name}', **kw)
        plain[name] = reid_metrics(reid_ranks(long_v, short_v, prio))
        fshort_v = inference.compute_user_vectors(m, fshort, np.arange(fshort.n_users), part='all', tower='short',
                                                  min_len=k_min, max_len=k_max, desc=f'reid {name}', **kw)
        filt[name] = reid_metrics(reid_ranks(long_v[kept], fshort_v, prio_f))
    long_e = mean_pooled_users(base_model, seqs, users, 'long', n_min, n_max)
    short_e = mean_pooled_users(base_model, seqs, users, 'short', k_min, k_max)
    fshort_e = mean_pooled_users(base_model, fshort, np.arange(fshort.n_users), 'all', k_min, k_max)
    plain['mean_emb'] = reid_metrics(reid_ranks(long_e, short_e, prio))
    filt['mean_emb'] = reid_metrics(reid_ranks(long_e[kept], fshort_e, prio_f))
    counts = {'users': int(len(users)), 'filtered_users': int(len(kept)),
              'dropped_empty_filtered_short': int(len(users) - len(kept))}
    return plain, filt, counts


def _rank_all(score_fn: Callable[[np.ndarray], np.ndarray], n_users: int, rel_user: np.ndarray,
              rel_cand: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Ranks of every relevant (user, candidate) pair, scoring users in chunks with score_fn(local users)."""
    ranks = np.zeros(len(rel_user), np.int64)
    for lo in range(0, n_users, CHUNK):
        hi = min(lo + CHUNK, n_users)
        scores = score_fn(np.arange(lo, hi))                               # (chunk, C)
        sel = np.flatnonzero((rel_user >= lo) & (rel_user < hi))
        for a in range(0, len(sel), 4 * CHUNK):                             # bound the (pairs, C) comparison
            p = sel[a:a + 4 * CHUNK]
            ranks[p] = ranks_of_targets(scores, rel_user[p] - lo, rel_cand[p], priority)
    return ranks


def _relevant(target: dict, users: np.ndarray, kind: str, buy: bool, cand_pos: np.ndarray):
    """Distinct (local user, candidate position) pairs of the target day among `users`; + unrankable count."""
    sel = np.isin(target['user'], users)
    if buy:
        sel &= target['behavior'] == BUY
    u, idx = target['user'][sel], target[kind][sel]
    pos = cand_pos[idx]                                                     # -1: not a candidate
    n_events_users = np.unique(u)
    ok = pos >= 0
    pairs = np.unique(np.stack([u[ok], pos[ok]], 1), axis=0) if ok.any() else np.zeros((0, 2), np.int64)
    local_users = np.unique(pairs[:, 0])
    rel_user = np.searchsorted(local_users, pairs[:, 0])
    unrankable = np.unique(np.stack([u[~ok], idx[~ok]], 1), axis=0).shape[0] if (~ok).any() else 0
    counts = {'users_with_targets': int(len(n_events_users)), 'users': int(len(local_users)),
              'relevant': int(len(pairs)), 'unrankable': int(unrankable)}
    return local_users, rel_user, pairs[:, 1], counts


def next_day(context: dict, users: np.ndarray, kind: str, buy: bool, ks, seed: int) -> tuple[dict, dict]:
    """{method: Recall@K / NDCG@K} of one next-day task for one group, and its counts."""
    cands = context['cands'][kind]
    local_users, rel_user, rel_cand, counts = _relevant(context['target'], users, kind, buy, cands['pos'])
    counts['candidates'] = int(len(cands['index']))
    out = {}
    if len(local_users) == 0:
        return out, counts
    row = np.searchsorted(context['users'], local_users)                   # rows into the context's user arrays
    n = len(local_users)
    prio = np.random.default_rng([seed, 4, len(kind), int(buy)]).permutation(len(cands['index']))
    pop = cands['popularity']                                               # (C,) shares of the history
    for name, (uv, cv) in cands['vectors'].items():
        u = context['user_vectors'][name][row] if uv is None else uv[row]
        decoded = context['decoded'].get(name) if kind == 'category' else None
        # a decoded model keeps its cosine score beside: what decoding adds, and what training adds beyond counts
        cosine = topk_metrics(_rank_all(lambda r: u[r] @ cv.T, n, rel_user, rel_cand, prio), rel_user, n, ks)
        out[name if decoded is None else f'{name}_cosine'] = cosine
        if decoded is not None:   # the category half decoded (decode.py), ties by popularity like user_freq
            w = decoded[row]
            out[name] = topk_metrics(_rank_all(lambda r: w[r] + 1e-6 * pop[None, :], n, rel_user, rel_cand, prio),
                                     rel_user, n, ks)
    out['user_freq'] = topk_metrics(_rank_all(lambda r: context['user_freq'](row[r], kind) + 1e-6 * pop[None, :],
                                              n, rel_user, rel_cand, prio), rel_user, n, ks)
    out['popular'] = topk_metrics(_rank_all(lambda r: np.broadcast_to(pop, (len(r), len(pop))), n, rel_user,
                                            rel_cand, prio), rel_user, n, ks)
    return out, counts


def _user_freq_fn(seqs, users, cands, cutoff: int, max_len: int):
    """score_fn(rows, kind) -> (rows, C) recency-weighted counts of each candidate in the users' windows."""
    def score(rows: np.ndarray, kind: str) -> np.ndarray:
        s, e = seqs.part_bounds(users[rows], 'all')
        s = np.maximum(s, e - max_len)                                      # the events the model sees
        pos, own = data.expand_ranges(s, e)
        w = 0.5 ** ((cutoff - seqs.abs_hour[pos].astype(np.float64)) / RECENCY_HALF_LIFE_H)
        c = cands[kind]['pos'][getattr(seqs, kind)[pos]]
        ok = c >= 0
        n_c = len(cands[kind]['index'])
        flat = np.bincount(own[ok] * n_c + c[ok], weights=w[ok], minlength=len(rows) * n_c)
        return flat.reshape(len(rows), n_c)
    return score


# ----------------------------------------------------------------------------------------------
# downstream linear probe


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, heldout_x: np.ndarray, heldout_y: np.ndarray,
                 c: float = PROBE_C, max_iter: int = PROBE_MAX_ITER) -> dict:
    """One-vs-rest logistic regression from vectors to binary labels, fitted on one set and scored on another.

    Features are standardised with the training set's mean and spread; lbfgs is deterministic, so the same
    inputs give the same scores. Only label columns with both classes among the training rows (a fit needs
    them) and among the held-out rows (ROC-AUC needs them) are scored.

    Args:
        train_x, heldout_x: (N, D) and (M, D) feature vectors.
        train_y, heldout_y: (N, P) and (M, P) 0/1 labels, the same P columns.
        c: inverse L2 regularisation strength.
        max_iter: lbfgs iterations per column.
    Returns:
        {'auc': macro ROC-AUC, 'ap': macro average precision, 'users': M} over the scored columns.
    Raises:
        ValueError: no column has both classes in both sets.
    """
    # imported here: scikit-learn (scipy) adds ~1 s to every import of this module, and only the probe needs it
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score, roc_auc_score
    from sklearn.preprocessing import StandardScaler

    train_y, heldout_y = np.asarray(train_y, bool), np.asarray(heldout_y, bool)
    cols = np.flatnonzero(_both_classes(train_y) & _both_classes(heldout_y))
    if len(cols) == 0:
        raise ValueError('linear_probe: no label column has both classes among the training and the held-out rows')
    scaler = StandardScaler().fit(train_x)
    xt, xh = scaler.transform(train_x), scaler.transform(heldout_x)
    aucs, aps = [], []
    for j in cols:
        clf = LogisticRegression(C=c, solver='lbfgs', max_iter=max_iter).fit(xt, train_y[:, j])
        score = clf.decision_function(xh)
        aucs.append(roc_auc_score(heldout_y[:, j], score))
        aps.append(average_precision_score(heldout_y[:, j], score))
    return {'auc': float(np.mean(aucs)), 'ap': float(np.mean(aps)), 'users': int(len(heldout_y))}


def _both_classes(y: np.ndarray) -> np.ndarray:
    """(P,) whether each column of a (N, P) 0/1 matrix holds both a 0 and a 1."""
    pos = y.sum(0)
    return (pos > 0) & (pos < len(y))


def probe_labels(user: np.ndarray, category: np.ndarray, n_users: int, train_rows: np.ndarray,
                 n_labels: int = PROBE_CATEGORIES) -> tuple[np.ndarray, np.ndarray]:
    """The probe's label columns: the n_labels categories the most train_rows users touch, and who touches them.

    Args:
        user, category: per target-day event, the user's row in [0, n_users) and the category index.
        train_rows: rows of the users whose counts choose the categories.
    Returns:
        (categories (P,) sorted, labels (n_users, P) bool). Ties in the count go to the lower category index;
        the unknown category (shared by all rare ones) is never a label.
    """
    known = category > data.UNKNOWN
    pairs = np.unique(np.stack([user[known], category[known]], 1), axis=0)   # distinct (user, category)
    cats, n_touching = np.unique(pairs[np.isin(pairs[:, 0], train_rows), 1], return_counts=True)
    top = np.sort(cats[np.argsort(-n_touching, kind='stable')[:n_labels]])
    labels = np.zeros((n_users, len(top)), bool)
    sel = np.isin(pairs[:, 1], top)
    labels[pairs[sel, 0], np.searchsorted(top, pairs[sel, 1])] = True
    return top, labels


def probe_category(context: dict, model, seqs: data.Sequences, train: np.ndarray, heldout: np.ndarray,
                   n_min: int, n_max: int) -> tuple[dict, dict]:
    """{method: linear_probe metrics} predicting each user's target-day categories from their vector, and counts.

    The probe is fitted on the `train` users with target-day events and scored on the `heldout` ones, over
    probe_labels' categories. Features: the model's and random_init's long-tower vectors of the whole
    history (context['user_vectors']) and mean_emb's concatenated mean item and category embeddings.
    """
    users, target = context['users'], context['target']
    rows = {g: np.flatnonzero(np.isin(users, u)) for g, u in (('train', train), ('heldout', heldout))}
    ours = np.isin(target['user'], users)
    top, labels = probe_labels(np.searchsorted(users, target['user'][ours]), target['category'][ours], len(users),
                               rows['train'])
    scored = _both_classes(labels[rows['train']]) & _both_classes(labels[rows['heldout']])
    counts = {'train_users': int(len(rows['train'])), 'users': int(len(rows['heldout'])),
              'categories': int(len(top)), 'scored_categories': int(scored.sum())}
    if not scored.any():
        return {}, counts
    features = dict(context['user_vectors'])
    features['mean_emb'] = mean_pooled_users(model, seqs, users, 'all', n_min, n_max)
    out = {name: linear_probe(x[rows['train']], labels[rows['train']], x[rows['heldout']], labels[rows['heldout']])
           for name, x in features.items()}
    return out, counts


# ----------------------------------------------------------------------------------------------
# the whole evaluation


def evaluate(model: LongTermInterestModel, seqs: data.Sequences, target_events, vocab: data.Vocab,
             groups: dict[str, np.ndarray], *, n_min: int = data.N_MIN, n_max: int = data.N_MAX,
             k_min: int = data.K_MIN, k_max: int = data.K_MAX, device='cpu', batch_size: int = inference.BATCH_SIZE,
             seed: int = 0, ks=KS, progress: bool = False, max_items: int = MAX_ITEMS,
             max_reid_users: int = MAX_REID_USERS, decode_workers: int = 1) -> dict:
    """Every task for every group, ours beside each baseline.

    Args:
        model: the trained model (left in the mode it came in).
        seqs: sequences of the history only (events before the target day), encoded with `vocab`.
        target_events: the target day's events (raw ids; read_events columns).
        vocab: the vocabulary fitted on the history.
        groups: name -> user indices into seqs.
        n_min, n_max, k_min, k_max: sequence lengths the model was trained with.
        seed: fixes the random-weights model, tie-breaking and re-identification subsampling.
        ks: cut-offs K of next-day Recall@K / NDCG@K.
        max_items: item candidates kept (the most frequent); the rest count as unrankable.
        max_reid_users: re-identification pool per group (a seeded sample of larger groups).
        decode_workers: processes that decode the users' category shares (decode.shares; the same result for
            any number): train.py and this module's command line pass decode.default_workers(); a script that
            passes more than 1 needs the `if __name__ == '__main__':` guard, as the workers are spawned.
    Returns:
        JSON-serialisable {group: {task: {method: {metric: value}}}} (every row has 'users', the users it
        averages over) plus '_info': {'target_day', 'settings', 'counts': {group: {task: {...}}}}.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    if len(target_events) == 0:
        raise ValueError('no target-day events to evaluate on')
    target_hours = target_events['hour'].to_numpy()
    cutoff = int(target_hours.min()) // 24 * 24                             # first hour of the target day
    if seqs.n_events and int(seqs.abs_hour.max()) >= cutoff:
        raise ValueError('sequences hold events on or after the target day: build them from the history only '
                         '(data.split_last_day(events))')
    lengths = (n_min, n_max, k_min, k_max)
    base_models = {'model': model, 'random_init': random_init_model(model, seed, device)}

    # candidates: every known category; the max_items most frequent known items (vocab order = frequency)
    n_cat_known = vocab.n_categories - 2
    n_item_known = min(vocab.n_items - 2, max_items)
    item_cat = item_categories(seqs, vocab.n_items)
    hist_hour = int(np.bincount(seqs.hour, minlength=25)[1:].argmax()) + 1 if seqs.n_events else 1   # 1..24
    cand_hour = cutoff + hist_hour - 1                                      # the history's busiest hour, target day
    weekday = int(data.calendar_features([cand_hour])[0][0])
    time_feat = vocab.time_features([cand_hour])[0]
    cands = {}
    item_t, cat_t = _tables(model)
    for kind, n_known, n_table in (('category', n_cat_known, vocab.n_categories), ('item', n_item_known, vocab.n_items)):
        index = np.arange(2, 2 + n_known, dtype=np.int64)
        pos = np.full(n_table, -1, np.int64)
        pos[index] = np.arange(n_known)
        if kind == 'category':
            batch = candidate_batch(np.full(n_known, data.UNKNOWN), index, cand_hour, time_feat)
        else:
            batch = candidate_batch(index, item_cat[index], cand_hour, time_feat)
        vectors = {name: (None, _normalise(encode_batch(m, batch, 'candidate', device, batch_size)))
                   for name, m in base_models.items()}
        vectors['mean_emb'] = (None, _normalise((cat_t if kind == 'category' else item_t)[index]))
        counts = np.bincount(getattr(seqs, kind), minlength=n_table)[index].astype(np.float64)
        cands[kind] = {'index': index, 'pos': pos, 'vectors': vectors,
                       'popularity': counts / max(counts.sum(), 1.0)}

    # target day, encoded with the history's vocabulary; users outside the sequences cannot be ranked
    t_user = seqs.user_index(target_events['user_id'].to_numpy())
    known = t_user >= 0
    target = {'user': t_user[known], 'item': vocab.encode_items(target_events['item_id'].to_numpy()[known]),
              'category': vocab.encode_categories(target_events['category_id'].to_numpy()[known]),
              'behavior': target_events['behavior'].to_numpy()[known]}
    all_group_users = np.unique(np.concatenate([np.asarray(g, np.int64) for g in groups.values()])) \
        if groups else np.zeros(0, np.int64)
    nd_users = np.intersect1d(all_group_users, np.unique(target['user']))   # sorted
    user_vectors = {name: inference.compute_user_vectors(m, seqs, nd_users, part='all', tower='long', min_len=n_min,
                                                         max_len=n_max, batch_size=batch_size, device=device,
                                                         progress=progress, desc=f'next-day {name}')
                    for name, m in base_models.items()}
    user_vectors = {k: _normalise(v) for k, v in user_vectors.items()}
    for kind in ('category', 'item'):
        cands[kind]['vectors']['mean_emb'] = (mean_pooled_users(model, seqs, nd_users, 'all', n_min, n_max, (kind,)),
                                              cands[kind]['vectors']['mean_emb'][1])
    # models whose category half is the pool alone score categories by decoding it (decode.py), not by cosine
    decoded = {name: decode.category_weights(user_vectors[name],
                                             decode.scaled(decode.category_half(cands['category']['vectors'][name][1],
                                                                               m.cfg.category_size), m),
                                             max_categories=getattr(m.cfg, 'category_top', 0), workers=decode_workers,
                                             progress=progress, desc=f'decoding {name}')
               for name, m in base_models.items() if getattr(m.cfg, 'exact_categories', False)}
    context = {'cands': cands, 'target': target, 'users': nd_users, 'user_vectors': user_vectors, 'decoded': decoded,
               'user_freq': _user_freq_fn(seqs, nd_users, cands, cutoff, n_max)}

    results, counts = {}, {}
    for gname, g in groups.items():
        g = np.unique(np.asarray(g, np.int64))
        res, cnt = {}, {}
        reid_users = g[seqs.lengths[g] >= 2]
        if len(reid_users) > max_reid_users:
            reid_users = np.sort(np.random.default_rng([seed, 5]).choice(reid_users, max_reid_users, replace=False))
        if len(reid_users) >= 2:
            res['reid'], res['reid_filtered'], cnt['reid'] = reidentification(
                base_models, model, seqs, reid_users, lengths, device, batch_size, seed, progress)
        for kind in ('category', 'item'):
            for buy in (False, True):
                task = f'next_{kind}' + ('_buy' if buy else '')
                res[task], cnt[task] = next_day(context, g, kind, buy, ks, seed)
        results[gname] = res
        counts[gname] = cnt
    if 'train' in groups and 'heldout' in groups:                       # fitted on one, scored on the other
        results['heldout']['probe_category'], counts['heldout']['probe_category'] = probe_category(
            context, model, seqs, groups['train'], groups['heldout'], n_min, n_max)
    results['_info'] = {
        'target_day': data.hour_to_str(cutoff)[:10],
        'settings': {'n_min': n_min, 'n_max': n_max, 'k_min': k_min, 'k_max': k_max, 'ks': list(ks), 'seed': seed,
                     'candidate_hour': hist_hour - 1, 'candidate_weekday': weekday, 'max_items': max_items,
                     'max_reid_users': max_reid_users, 'recency_half_life_h': RECENCY_HALF_LIFE_H,
                     'item_candidates': int(n_item_known), 'items_in_vocab': int(vocab.n_items - 2),
                     'category_candidates': int(n_cat_known)},
        'counts': counts,
        'target_events': int(len(target_events)),
        'target_events_of_unknown_users': int((~known).sum()),
        'seconds': round(time.perf_counter() - t0, 2),
    }
    return results


# ----------------------------------------------------------------------------------------------
# output


def format_table(metrics: dict) -> str:
    """Compact text table: per group and task, one row per method, one column per metric."""
    lines = []
    info = metrics.get('_info', {})
    if info:
        lines.append(f"evaluation on target day {info.get('target_day')} ({info.get('seconds', 0):.1f} s)")
    for gname, tasks in metrics.items():
        if gname.startswith('_'):
            continue
        for task, methods in tasks.items():
            cnt = info.get('counts', {}).get(gname, {}).get(task, {})
            extra = ', '.join(f'{k} {v:,}' for k, v in cnt.items())
            lines.append(f'\n[{gname}] {task}' + (f' ({extra})' if extra else ''))
            if not methods:
                lines.append('  (no users)')
                continue
            cols = [c for c in next(iter(methods.values())) if c != 'users']
            lines.append(f"  {'method':<12}" + ''.join(f'{c:>11}' for c in cols))
            best = {c: max(m.get(c, -1) for m in methods.values()) for c in cols}
            for name, m in methods.items():
                cells = ''.join(f"{m.get(c, float('nan')):>10.4f}{'*' if m.get(c) == best[c] else ' '}" for c in cols)
                lines.append(f'  {name:<12}' + cells)
    lines.append('\n* = best in column')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    import model_io
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--save_dir', default=model_io.SAVE_DIR, help=f'folder of the saved model (default: {model_io.SAVE_DIR})')
    p.add_argument('--data_path', default=data.DATA_PATH, help=f'the log, or the folder holding it (default: {data.DATA_PATH})')
    p.add_argument('--data_format', default='auto', choices=data.FORMATS)
    p.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N')
    p.add_argument('--batch_size', type=int, default=inference.BATCH_SIZE)
    p.add_argument('--seed', type=int, default=runtime.SEED, help="as train.py's SEED: same random-weights baseline and tie order")
    p.add_argument('--max_items', type=int, default=MAX_ITEMS)
    p.add_argument('--json', default='', help='also write the metrics to this JSON file')
    p.add_argument('--progress', default=True, action=argparse.BooleanOptionalAction)
    p.add_argument('--cache', default=True, action=argparse.BooleanOptionalAction,
                   help="reuse (or build) the log's event cache, as train.py's --cache (default: on)")
    args = p.parse_args(argv)
    runtime.tune_malloc()
    device = runtime.pick_device(args.device)
    try:  # bad input is one line, as in train.py; bugs keep their traceback
        model, vocab, config = model_io.load_model(args.save_dir, device)
        # the log read as the model's training read it: its time window and duplicate handling
        read = {'time_window_days': config.get('train', {}).get('time_window_days', data.TIME_WINDOW_DAYS),
                'dedupe': bool(config.get('train', {}).get('dedupe', False))}
        if args.cache:
            import event_cache
            cache = event_cache.load(args.data_path, data_format=args.data_format, progress=args.progress,
                                     save_dir=args.save_dir, **read)
            events, report = cache.events(), cache.report
        else:
            events, report = data.read_events(args.data_path, data_format=args.data_format, progress=args.progress,
                                              **read)
    except (data.DataError, model_io.ModelSetError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}') from None
    print(report.summary())
    history, target, _, _ = data.split_last_day(events)
    if len(history) == 0:
        raise SystemExit(f'{args.data_path}: the log covers one day only; evaluation needs earlier days as history')
    seqs = data.build_sequences(history, vocab)
    train_cfg = config.get('train', {})
    lengths = {k: int(train_cfg.get(k, getattr(data, k.upper()))) for k in ('n_min', 'n_max', 'k_min', 'k_max')}
    heldout = config.get('eval', {}).get('heldout_users') if isinstance(config.get('eval'), dict) else None
    if heldout is None:
        print('note: config.json lists no held-out users; evaluating all users as one group. If this model was '
              'trained on the whole log (no evaluation split), it has seen the target day and the numbers are '
              'optimistic.', file=sys.stderr)
        groups = {'all': np.arange(seqs.n_users)}
    else:
        idx = seqs.user_index(np.asarray(heldout, np.int64))
        idx = np.unique(idx[idx >= 0])
        groups = {'train': np.setdiff1d(np.arange(seqs.n_users), idx), 'heldout': idx}
    metrics = evaluate(model, seqs, target, vocab, groups, device=device, batch_size=args.batch_size,
                       seed=args.seed, max_items=args.max_items, progress=args.progress,
                       decode_workers=decode.default_workers(), **lengths)
    print(format_table(metrics))
    if args.json:
        atomic_json_save(metrics, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
