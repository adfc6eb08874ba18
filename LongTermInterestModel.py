"""User long-term interest model: feature embedding, masked [CLS] Transformer towers, BPR / InfoNCE losses.

Pipeline (the contract with train.py; the four modules are saved as separate state_dicts):

    x = feature_embedding(batch)             # (B, L, width), zero at padded positions
    t = feature_embedding.target(batch['item'], batch['category'])   # (B, L, hidden_dim) event targets
    x = moe_layer(x, batch['mask'])          # (B, L, width)   DeepSeekMoE.MoE
    long_vec = long_term(x, batch['mask'], t)   # (B, hidden_dim), L2-normalised
    short_vec = short_term(x_short, mask_short, t_short)
    (LongTermInterestModel.encode does all of this; t only with ModelConfig.skip_pool)

Batches are dicts of tensors (see data.py): 'item', 'category', 'weekday', 'hour', 'weekend', 'behavior'
int64 (B, L) with 0 = padding, 'time' float (B, L, 2) and 'mask' bool (B, L), real events right-padded
oldest -> newest. Tensors only: no pandas, CSV or Redis here.

Positional information: each tower adds a learned *recency* embedding, index 0 = the newest event,
computed from the mask (n - 1 - position). Sequences are right-padded and truncated to the most recent
events, so an absolute index means "k-th oldest kept event", whose meaning shifts with the user's history
length and differs between the long, short and export views; recency means the same thing in all of
them, and extra padding cannot change it. The continuous time features (time since the log start, time
to the log end) in the embedding carry the absolute timing and the gaps between events.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from DeepSeekMoE import MoE, MoEConfig

N_WEEKDAY, N_HOUR, N_WEEKEND, N_BEHAVIOR = 8, 25, 3, 5    # table sizes incl. padding index 0
UNKNOWN_ITEM = 1  # the item row shared by rare items (data.UNKNOWN); it identifies nobody, so pools leave it out


@dataclass
class ModelConfig:
    """Configuration of the feature embedding and the two towers.

    Attributes:
        n_items: rows of the item table, incl. 0 = padding and 1 = unknown item (the vocabulary size).
        n_categories: rows of the category table, incl. 0 = padding and 1 = unknown.
        item_embedding_dim: item embedding size.
        category_embedding_dim: category embedding size.
        small_embedding_dim: size of the weekday, hour, weekend, behaviour and time embeddings.
        width: model width: the embedding's output, the MoE's dim, the towers' residual stream.
        depth: Transformer layers per tower.
        heads: attention heads.
        head_dim: size of each head (heads * head_dim need not equal width).
        mlp_ratio: feed-forward hidden size = mlp_ratio * width.
        hidden_dim: size of the output user vector.
        category_dim: with target_head, how many of the hidden_dim entries are the category half (the last
            ones; the rest are the item half); 0 = hidden_dim // 2, what models saved before it have. A larger
            category half decodes more of a user's recent categories exactly (`decode.py`), at the item half's cost.
        dropout: dropout in the embedding and the towers.
        max_positions: recency positions with their own embedding; older events share the last one.
        pooling: 'cls' (the [CLS] token's output) or 'mean' (mean of the real events' outputs).
        sparse_item_grad: item table with sparse gradients (train.py can use SparseAdam for it).
        target_head: a projection of each event's item and category embeddings into the user-vector space
            (`FeatureEmbedding.target`): what the 'allaction' objective scores the user's future events with,
            what next-day candidates are scored with, and what `skip_pool` pools.
        skip_pool: each tower adds a recency-weighted pool of its events' target vectors to the [CLS]
            output, so the user vector starts as a learned pooling of the history (the mean_emb baseline's
            recipe); the [CLS] path's head starts at zero and learns what pooling misses.
        exact_categories (needs skip_pool; None = as skip_pool): the [CLS] head writes only the item half of the vector, so the
            category half is the pool alone: a non-negative sum of the user's category target vectors, from
            which `decode.category_weights` reads the user's recency-weighted category shares back (exactly
            while the user's recent categories are few for the half's size). Cosine scoring can only
            approximate such counts in 64 dimensions; decoding recovers them.
        fixed_category_codes (needs target_head): a category's code (the category half of its target vector)
            is a fixed random unit vector, drawn at initialisation and never trained, instead of a learned
            projection of its embedding. Random codes keep different categories apart, so two users' category
            halves match only where their categories do (what re-identification and repeat items need); learned
            codes pull co-occurring categories together. The category embedding still feeds the towers.
        category_half_life: with skip_pool, > 0 weighs the category half's pool towards recent events: an event
            `category_half_life` events older than the user's last counts half as much (a fixed prior added to
            the learned recency logits; the item half keeps the learned logits alone). 0 = no prior. The learned
            logits barely move on small logs (Adam moves each by at most lr per step: ~0.05 in a UserBehavior
            run), so without a prior the pool stays a plain mean of the last N_MAX events.
        category_top: with skip_pool, > 0 keeps only each user's `category_top` heaviest categories (by their
            summed pool weight) in the category half; the rest of the events drop out of it. Non-negative least
            squares recovers a sketch of few codes exactly, so the decoded ranking of those categories is exact
            (`decode.py`), where a sketch of every recent category (UserBehavior: 18 in the median) blurs in 64
            floats. 0 = every category.
        category_idf: with skip_pool, > 0 weighs each event in the category half's pool by its category's
            inverse document frequency over the training users, to this power (`FeatureEmbedding.category_scale`,
            set once from the training log by `set_category_frequencies` and saved with the weights): categories
            nearly every user has (the popular ones) say little about who a user is, so two users' category
            halves then match on the categories that set them apart (TF-IDF). The heaviest `category_top`
            categories are still chosen by the plain weights, and `decode.py` divides the scale back out, so the
            decoded shares are unchanged. 0 = no weighting (what models saved before it have).
        item_category_weight: with target_head, how much an item candidate's category half counts, relative to
            its item half, when `candidate_vectors` scores items (category candidates, item = unknown, are
            unchanged). 1 = the target vector as trained; below 1 the user's recent categories (the recency-
            weighted category half) count less and repeat items of older categories rank higher. Only scoring
            changes: training, the user vectors and `target` stay as they are.
        feature_norm: LayerNorm each feature group (item, category, context = calendar, behaviour and
            time) before the projection, so each enters at the same scale whatever its table's init or
            size; without it the time features (norm ~2, mostly the Linear's bias, alike for every
            user) outweigh the std-0.02 item and category embeddings ~10:1 and every token looks alike.
    """
    # vocabulary (sizes of the fitted vocabulary, no default)
    n_items: int
    n_categories: int
    # embedding
    item_embedding_dim: int = 128
    category_embedding_dim: int = 64
    small_embedding_dim: int = 16
    # towers
    width: int = 128
    depth: int = 4
    heads: int = 8
    head_dim: int = 64
    mlp_ratio: int = 4
    hidden_dim: int = 128
    category_dim: int = 0
    dropout: float = 0.1
    max_positions: int = 256
    pooling: str = 'cls'
    sparse_item_grad: bool = True
    feature_norm: bool = True
    target_head: bool = True
    skip_pool: bool = True
    exact_categories: Optional[bool] = None
    fixed_category_codes: bool = False
    category_half_life: float = 0.0
    category_top: int = 0
    category_idf: float = 0.0
    item_category_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.n_items < 2 or self.n_categories < 2:
            raise ValueError(f"ModelConfig: n_items and n_categories count padding (0) and unknown (1), so "
                             f"they must be >= 2, got {self.n_items}, {self.n_categories}")
        if self.pooling not in ('cls', 'mean'):
            raise ValueError(f"ModelConfig.pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if not 0 <= self.category_dim < self.hidden_dim:
            raise ValueError(f"ModelConfig.category_dim must be in [0, hidden_dim = {self.hidden_dim}) "
                             f"(0: hidden_dim // 2), got {self.category_dim}")
        if self.max_positions < 1:
            raise ValueError(f"ModelConfig.max_positions must be >= 1, got {self.max_positions}")
        if self.skip_pool and not self.target_head:
            raise ValueError("ModelConfig.skip_pool pools the events' target vectors: it needs target_head")
        if self.exact_categories is None:
            self.exact_categories = self.skip_pool
        if self.exact_categories and not self.skip_pool:
            raise ValueError("ModelConfig.exact_categories keeps the pool alone in the category half: it needs skip_pool")
        if not self.category_half_life >= 0:
            raise ValueError(f"ModelConfig.category_half_life must be >= 0 (0: no recency prior), got {self.category_half_life}")
        if self.category_top < 0:
            raise ValueError(f"ModelConfig.category_top must be >= 0 (0: every category), got {self.category_top}")
        if not self.category_idf >= 0:
            raise ValueError(f"ModelConfig.category_idf must be >= 0 (0: no weighting), got {self.category_idf}")
        if self.category_idf and not self.skip_pool:
            raise ValueError("ModelConfig.category_idf weighs the category half's pool: it needs skip_pool")
        if not self.item_category_weight >= 0:
            raise ValueError(f"ModelConfig.item_category_weight must be >= 0 (0: item half alone), got {self.item_category_weight}")
        if self.fixed_category_codes and not self.target_head:
            raise ValueError("ModelConfig.fixed_category_codes are the target vectors' category half: it needs target_head")

    @property
    def category_size(self) -> int:
        """Entries of the user vector's category half (its last ones): category_dim, or hidden_dim // 2."""
        return self.category_dim or self.hidden_dim // 2

    @property
    def item_size(self) -> int:
        """Entries of the user vector's item half (its first ones): hidden_dim - category_size."""
        return self.hidden_dim - self.category_size


def batch_mask(batch: dict) -> torch.Tensor:
    """(B, L) bool mask of real events: batch['mask'], or item != 0 when there is none."""
    mask = batch.get('mask')
    return batch['item'] != 0 if mask is None else mask.to(torch.bool)


class FeatureEmbedding(nn.Module):
    """Per-event features -> (B, L, width); padding index 0 embeds to zero and padded positions are zero."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        small = cfg.small_embedding_dim
        self.item = nn.Embedding(cfg.n_items, cfg.item_embedding_dim, padding_idx=0, sparse=cfg.sparse_item_grad)
        self.category = nn.Embedding(cfg.n_categories, cfg.category_embedding_dim, padding_idx=0)
        self.weekday = nn.Embedding(N_WEEKDAY, small, padding_idx=0)
        self.hour = nn.Embedding(N_HOUR, small, padding_idx=0)
        self.weekend = nn.Embedding(N_WEEKEND, small, padding_idx=0)
        self.behavior = nn.Embedding(N_BEHAVIOR, small, padding_idx=0)
        self.time = nn.Linear(2, small)
        concat = cfg.item_embedding_dim + cfg.category_embedding_dim + 5 * small
        self.proj = nn.Linear(concat, cfg.width)
        self.norm = nn.LayerNorm(cfg.width)
        if cfg.feature_norm:
            self.group_norms = nn.ModuleList([nn.LayerNorm(cfg.item_embedding_dim),
                                              nn.LayerNorm(cfg.category_embedding_dim), nn.LayerNorm(5 * small)])
        if cfg.target_head:
            norms = [nn.LayerNorm(cfg.item_embedding_dim)]
            if not cfg.fixed_category_codes:
                norms.append(nn.LayerNorm(cfg.category_embedding_dim))
            self.target_norms = nn.ModuleList(norms)
            # bias-free: a bias is one direction shared by every item, which would make them all look alike
            self.target_item = nn.Linear(cfg.item_embedding_dim, cfg.item_size, bias=False)
            if not cfg.fixed_category_codes:
                self.target_category = nn.Linear(cfg.category_embedding_dim, cfg.category_size, bias=False)
            nn.init.orthogonal_(self.target_item.weight)       # keeps distances: a rotation when the sizes match
            if cfg.fixed_category_codes:
                # a buffer: saved with the weights (the decoder needs the same codes), never trained
                codes = F.normalize(torch.randn(cfg.n_categories, cfg.category_size), dim=-1)
                codes[0] = 0.0                                   # padding
                self.register_buffer('category_code', codes)
            else:
                nn.init.orthogonal_(self.target_category.weight)
        if cfg.category_idf:
            # a buffer: a statistic of the training log, saved with the weights so vectors of a later log match
            self.register_buffer('category_scale', torch.ones(cfg.n_categories))
        self.dropout = nn.Dropout(cfg.dropout)
        for emb in (self.item, self.category, self.weekday, self.hour, self.weekend, self.behavior):
            nn.init.normal_(emb.weight, std=0.02)
            with torch.no_grad():
                emb.weight[0].zero_()

    def forward(self, batch: dict) -> torch.Tensor:
        """batch: dict of (B, L) int64 features, 'time' (B, L, 2), 'mask' (B, L) -> (B, L, width)."""
        mask = batch_mask(batch)
        context = [self.weekday(batch['weekday']), self.hour(batch['hour']), self.weekend(batch['weekend']),
                   self.behavior(batch['behavior']), self.time(batch['time'].to(self.time.weight.dtype))]
        parts = [self.item(batch['item']), self.category(batch['category'])]
        if self.cfg.feature_norm:
            parts = [ln(p) for ln, p in zip(self.group_norms, parts + [torch.cat(context, dim=-1)])]
        else:
            parts += context
        x = _dropout(self.norm(self.proj(torch.cat(parts, dim=-1))), self.dropout.p, self.training)   # (B, L, width)
        return x * mask.unsqueeze(-1).to(x.dtype)

    @torch.no_grad()
    def set_category_frequencies(self, users_with: np.ndarray, n_users: int) -> None:
        """With cfg.category_idf: category_scale = (ln((1 + n_users) / (1 + users_with)) + 1) ** cfg.category_idf,
        users_with (n_categories,) the number of training users who have each category (a smoothed IDF, >= 1,
        so no category drops out of the pool)."""
        if not self.cfg.category_idf:
            raise ValueError('set_category_frequencies needs ModelConfig.category_idf > 0')
        users_with = np.asarray(users_with, np.float64)
        if users_with.shape != (self.cfg.n_categories,) or n_users < 0 or (users_with < 0).any():
            raise ValueError(f'users_with must be {self.cfg.n_categories} non-negative counts, got shape '
                             f'{users_with.shape}')
        idf = (np.log((1.0 + n_users) / (1.0 + users_with)) + 1.0) ** self.cfg.category_idf
        self.category_scale.copy_(torch.from_numpy(idf))

    def category_weight(self, category: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, L) each event's weight in the category half's pool (category_scale), or None without category_idf."""
        return self.category_scale[category] if self.cfg.category_idf else None

    def target(self, item: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """Unit vectors (..., hidden_dim) of (item, category) pairs in the user-vector space: the events a
        user vector should score high. A category alone is (item = 1, the unknown item; that category).

        An item half (the first cfg.item_size entries) and a category half (the last cfg.category_size), each of norm
        1/sqrt(2): neither can drown the other, so item identity survives next to the category (as in the
        mean_emb baseline, which concatenates the two normalised means). Padding (0, 0) maps to zero.
        """
        ti = self.target_item(self.target_norms[0](self.item(item)))
        if self.cfg.fixed_category_codes:
            tc = self.category_code[category].to(ti.dtype)
        else:
            tc = self.target_category(self.target_norms[1](self.category(category)))
        return torch.cat([F.normalize(ti, dim=-1), F.normalize(tc, dim=-1)], dim=-1) * 2 ** -0.5


def _attention_dropout(q, k, v, attn_mask: torch.Tensor, p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) with dropout on the probabilities, @ v: what SDPA computes with
    dropout_p = p, written out for the CPU (only) because SDPA's CPU math path (the only one with dropout) is ~25% slower
    (it converts the bool mask per head and scans the scores for fully masked rows), and bernoulli_ masks
    cost more than the attention matmuls.

    q (B, H, Nq, hd), k, v (B, H, N, hd); attn_mask (B, 1, 1, N) bool, True = key may be attended to
    -> (B, H, Nq, hd).
    """
    b, h, nq, hd = q.shape
    n = k.shape[2]
    bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~attn_mask, float('-inf'))
    bias = bias.expand(b, h, 1, n).reshape(b * h, 1, n)                     # (BH, 1, N) additive key mask
    scores = torch.baddbmm(bias, q.reshape(b * h, nq, hd), k.reshape(b * h, n, hd).transpose(1, 2),
                           alpha=hd ** -0.5)                                # (BH, Nq, N)
    probs = scores.softmax(-1) * _dropout_scale(scores.shape, p, scores.dtype, scores.device)
    return torch.bmm(probs, v.reshape(b * h, n, hd)).view(b, h, nq, hd)


def _dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training); on the CPU with the cheaper mask of _dropout_scale (CUDA keeps its fused
    kernel)."""
    if not training or p == 0:
        return x
    if x.device.type != 'cpu':
        return F.dropout(x, p, training)
    return x * _dropout_scale(x.shape, p, x.dtype, x.device)


def _dropout_scale(shape, p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Inverted-dropout multiplier: 0 with probability p (to 1/65536), else 1 / (1 - p).

    Drawn as 16 random bits per element from 64-bit draws: on the CPU ~8x cheaper than bernoulli_, which
    took an eighth of a training step on the (B*H, N, N) attention probabilities.
    """
    numel = math.prod(shape)
    bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((numel + 3) // 4,), dtype=torch.int64, device=device)
    keep = bits.view(torch.int16)[:numel].view(shape) >= round(p * 65536) - 32768
    return keep.to(dtype).mul_(1.0 / (1.0 - p))


class Block(nn.Module):
    """Pre-norm Transformer layer: x + attn(LN(x)), then x + FF(LN(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        inner = cfg.heads * cfg.head_dim
        self.norm1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * inner)
        self.out = nn.Linear(inner, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.ff = nn.Sequential(nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width), nn.GELU(),
                                nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width))
        self.p_drop = cfg.dropout
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """x (B, N, C); attn_mask (B, 1, 1, N) bool, True = key may be attended to -> (B, N, C).

        first_only: return only the first position's output (B, 1, C), the same as forward(...)[:, :1]:
        every position is still a key and a value, but only the first one is a query, so the query
        projection, the attention rows, the output projection and the feed-forward run for one row
        instead of N (the last layer of a [CLS]-pooled tower, whose other outputs nobody reads).
        """
        b, n, _ = x.shape
        h = self.norm1(x)
        if first_only:
            inner = self.heads * self.head_dim
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(h[:, :1], w[:inner], bias[:inner]).view(b, 1, 1, self.heads, self.head_dim)
            kv = F.linear(h, w[inner:], bias[inner:]).view(b, n, 2, self.heads, self.head_dim)
            q = q.permute(2, 0, 3, 1, 4)[0]                                                 # (B, H, 1, hd)
            k, v = kv.permute(2, 0, 3, 1, 4)                                                # (B, H, N, hd)
            x, n = x[:, :1], 1
        else:
            q, k, v = self.qkv(h).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p_attn = self.p_drop if self.training else 0.0
        if p_attn > 0 and x.device.type == 'cpu':  # SDPA's CPU path with dropout is the slow math one
            a = _attention_dropout(q, k, v, attn_mask, p_attn)                               # (B, H, N, hd)
        else:   # SDPA's fused kernels: flash on the CPU (no dropout), flash / memory-efficient on CUDA
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p_attn)   # (B, H, N, hd)
        p = self.dropout.p if self.training else 0.0
        x = x + _dropout(self.out(a.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)), p)
        return x + _dropout(self.ff(self.norm2(x)), p)


class InterestTower(nn.Module):
    """[CLS] + recency embedding -> `depth` pre-norm Transformer layers -> pooled, projected, L2-normalised."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.cls = nn.Parameter(torch.randn(1, 1, cfg.width) * 0.02)
        self.recency = nn.Embedding(cfg.max_positions, cfg.width)
        nn.init.normal_(self.recency.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        # with exact_categories the head writes only the item half; the category half stays the pool's
        self.head = nn.Linear(cfg.width, cfg.item_size if cfg.exact_categories else cfg.hidden_dim)
        if cfg.skip_pool:
            # pooling weight of each recency position (softmax over the real events); 0 = a plain mean
            self.pool_logit = nn.Embedding(cfg.max_positions, 1)
            nn.init.zeros_(self.pool_logit.weight)
            nn.init.zeros_(self.head.weight)   # the vector starts as the pool; [CLS] adds what it misses
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, targets: Optional[torch.Tensor] = None,
                known: Optional[torch.Tensor] = None, categories: Optional[torch.Tensor] = None,
                category_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, L, width), mask (B, L) bool (right-padded) -> (B, hidden_dim) unit vectors.

        targets (B, L, hidden_dim): the events' target vectors (FeatureEmbedding.target), pooled into the
        output when cfg.skip_pool; known (B, L) bool: events whose item is known (not the shared unknown
        row, which identifies nobody), the only ones pooled into the item half (default: all real events);
        categories (B, L) int64: the events' category ids, needed with cfg.category_top; category_weight (B, L):
        each event's weight in the category half's pool after the heaviest categories are chosen (category_idf).
        Padding never changes the result: padded keys are masked out of attention (the [CLS] key never
        is, so no row is empty), recency depends only on the number of real events, and pooling reads
        only [CLS] or the real positions.
        """
        b, l, _ = x.shape
        mask = mask.to(torch.bool)
        n = mask.sum(1, keepdim=True)                                        # (B, 1) real events
        recency = (n - 1 - torch.arange(l, device=x.device)).clamp(0, self.cfg.max_positions - 1)   # (B, L)
        skip = self._pool(targets, recency, mask, mask if known is None else known & mask, categories,
                          category_weight) if self.cfg.skip_pool else None   # (B, hidden_dim)
        x = (x + self.recency(recency)) * mask.unsqueeze(-1).to(x.dtype)
        x = torch.cat([self.cls.expand(b, 1, -1).to(x.dtype), x], dim=1)    # (B, 1+L, width)
        keys = F.pad(mask, (1, 0), value=True)                               # (B, 1+L)
        attn_mask = keys[:, None, None, :]                                   # (B, 1, 1, 1+L)
        for i, block in enumerate(self.blocks):
            # [CLS] pooling reads only position 0 of the last layer: that layer computes only its row
            last = i == len(self.blocks) - 1 and self.cfg.pooling == 'cls'
            x = block(x, attn_mask, first_only=last)
        x = self.norm(x)
        if self.cfg.pooling == 'cls':
            pooled = x[:, 0]
        else:
            m = mask.unsqueeze(-1).to(x.dtype)
            pooled = (x[:, 1:] * m).sum(1) / m.sum(1).clamp(min=1)
        v = self.head(pooled)                                               # (B, hidden_dim)
        if self.cfg.exact_categories:
            v = F.pad(v, (0, self.cfg.category_size))                      # (B, hidden_dim): category half = pool
        return F.normalize(v if skip is None else v + skip, dim=-1)

    def _pool(self, targets: Optional[torch.Tensor], recency: torch.Tensor, mask: torch.Tensor,
              known: torch.Tensor, categories: Optional[torch.Tensor] = None,
              category_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Softmax-over-recency weighted means of the target vectors' item halves (events with known items)
        and category halves (every real event; with cfg.category_top only the events of the user's heaviest
        categories; each times its category_weight when given), each normalised: (B, hidden_dim), norm <= 1."""
        if targets is None:
            raise ValueError("InterestTower with skip_pool needs the events' target vectors")
        logit = self.pool_logit(recency).squeeze(-1).float()                # (B, L)
        cat_logit = logit - math.log(2) / self.cfg.category_half_life * recency if self.cfg.category_half_life else logit
        split = self.cfg.item_size
        halves = []
        for part, m, lg, top, scale in ((targets[..., :split], known, logit, 0, None),
                                        (targets[..., split:], mask, cat_logit, self.cfg.category_top, category_weight)):
            w = torch.softmax(lg.masked_fill(~m, float('-inf')), dim=-1).nan_to_num(0.0)   # no events: 0
            if top:
                w = w * self._top_categories(w, categories)
            if scale is not None:
                w = w * scale.to(w.dtype)
            halves.append(F.normalize(torch.einsum('bl,bld->bd', w.to(part.dtype), part), dim=-1))
        return torch.cat(halves, dim=-1) * 2 ** -0.5

    def _top_categories(self, w: torch.Tensor, categories: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, L) 0/1: events whose category is among the user's cfg.category_top heaviest (summed weight w;
        ties at the cut all stay); padding (weight 0) is 0."""
        if categories is None:
            raise ValueError("InterestTower with category_top needs the events' category ids")
        with torch.no_grad():
            total = torch.zeros(w.shape[0], self.cfg.n_categories, dtype=w.dtype, device=w.device)
            total.scatter_add_(1, categories, w)                            # (B, n_categories)
            cut = total.topk(min(self.cfg.category_top, total.shape[1]), dim=1).values[:, -1:]
            own = total.gather(1, categories)                               # each event's category total
            return ((own >= cut) & (own > 0)).to(w.dtype)


# ------------------------------------------------------------------------------------------------ losses
def bpr_loss(long_v: torch.Tensor, pos_v: torch.Tensor, neg_v: torch.Tensor, tau: float = 1.0):
    """BPR on cosine similarity: mean of -log sigmoid((cos(long, pos) - cos(long, neg)) / tau).

    long_v, pos_v, neg_v: (B, D). tau = 1 reproduces the seed. Returns (loss, metrics); metrics are
    detached 0-dim tensors (no host sync): loss, cos_pos, cos_neg, acc (share with cos_pos > cos_neg).
    """
    cos_pos = F.cosine_similarity(long_v, pos_v, dim=-1)                    # (B,)
    cos_neg = F.cosine_similarity(long_v, neg_v, dim=-1)
    loss = -F.logsigmoid((cos_pos - cos_neg) / tau).mean()
    return loss, _metrics(loss, cos_pos, cos_neg, (cos_pos > cos_neg).float())


def info_nce_loss(long_v: torch.Tensor, short_v: torch.Tensor, tau: float = 0.1,
                  neg_v: Optional[torch.Tensor] = None):
    """In-batch InfoNCE: user i's long vector must pick its own short vector among the batch's.

    long_v, short_v: (B, D); every other user's short vector is a negative, and so is every row of the
    optional neg_v (M, D). Returns (loss, metrics) with the keys of bpr_loss: cos_neg is the mean
    negative cosine, acc the share of users whose positive beats all their negatives (top-1).
    """
    a = F.normalize(long_v, dim=-1)
    cands = short_v if neg_v is None else torch.cat([short_v, neg_v], 0)
    sims = a @ F.normalize(cands, dim=-1).t()                               # (B, B[+M]) cosines
    b = a.shape[0]
    target = torch.arange(b, device=a.device)
    loss = F.cross_entropy(sims / tau, target)
    cos_pos = sims[target, target]                                          # (B,)
    n_neg = sims.shape[1] - 1
    cos_neg = (sims.sum(1) - cos_pos) / max(n_neg, 1)                       # mean over the negatives
    best_neg = sims.masked_fill(F.one_hot(target, sims.shape[1]).bool(), float('-inf')).max(1).values
    acc = (cos_pos > best_neg).float()
    return loss, _metrics(loss, cos_pos, cos_neg, acc)


def future_loss(user_v: torch.Tensor, cand_v: torch.Tensor, pair_user: torch.Tensor, pair_cand: torch.Tensor,
                tau: float, log_q: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax loss of users' future events over candidates, averaged per user, then over users.

    user_v (B, D) and cand_v (C, D) unit vectors; (pair_user[p], pair_cand[p]) the P (user row, candidate)
    pairs of the users' future events, every user owning at least one. log_q (C,): the log probability of
    a candidate appearing among sampled negatives (in-batch items: their frequency), subtracted from the
    logits so popular items are not pushed down for being sampled often (the logQ correction); None for a
    full softmax. Returns the mean over users of their pairs' mean -log softmax.
    """
    logits = user_v @ cand_v.t() / tau                                      # (B, C)
    if log_q is not None:
        logits = logits - log_q
    nll = -logits.log_softmax(-1)[pair_user, pair_cand]                     # (P,)
    b = user_v.shape[0]
    per_user = torch.zeros(b, dtype=nll.dtype, device=nll.device).index_add_(0, pair_user, nll)
    n = torch.bincount(pair_user, minlength=b).clamp(min=1)
    return (per_user / n).mean()


def batch_loss(long_v: torch.Tensor, short_v: torch.Tensor, objective: str = 'bpr', tau: float = 1.0,
               neg_shift: int = 1, rows: Optional[slice] = None, future: Optional[list] = None):
    """The training loss of one batch of users from their vectors (no extra encoding for negatives).

    short_v: (B, D) the whole batch's short-term vectors; long_v: (R, D) the long-term vectors of the batch
    rows `rows` (default all; in distributed training a rank's contiguous share). 'bpr': user i's own
    short vector against user (i - neg_shift) mod B's, another user's when 0 < neg_shift < B. 'infonce':
    against every other user's short vector in the batch. 'allaction': 'infonce' plus, for each
    (candidate vectors, pair_user, pair_cand, log_q) of `future` (pair_user indexes the rows' users),
    `future_loss` of the long vectors over those candidates (PinnerFormer's all-action objective: the long
    vector scores every future event). Returns (mean loss over the rows, metrics).
    """
    rows = rows if rows is not None else slice(0, short_v.shape[0])
    pos = short_v[rows]
    if objective == 'bpr':
        return bpr_loss(long_v, pos, short_v.roll(neg_shift, dims=0)[rows], tau)
    if objective in ('infonce', 'allaction'):  # cross-entropy does not depend on the order of the candidates
        others = torch.cat([short_v[:rows.start], short_v[rows.stop:]])
        loss, metrics = info_nce_loss(long_v, pos, tau, others if len(others) else None)
        if objective == 'allaction':
            if not future:
                raise ValueError("objective 'allaction' needs the future events' candidates")
            for name, (cand_v, pair_user, pair_cand, log_q) in zip(('category', 'item'), future):
                part = future_loss(long_v, cand_v, pair_user, pair_cand, tau, log_q)
                metrics[f'loss_{name}'] = part.detach()
                loss = loss + part
            metrics['loss'] = loss.detach()
        return loss, metrics
    raise ValueError(f"objective must be 'bpr', 'infonce' or 'allaction', got {objective!r}")


def _metrics(loss, cos_pos, cos_neg, acc) -> dict:
    return {'loss': loss.detach(), 'cos_pos': cos_pos.detach().mean(), 'cos_neg': cos_neg.detach().mean(),
            'acc': acc.detach().mean()}


# ---------------------------------------------------------------------------------------- whole model
class LongTermInterestModel(nn.Module):
    """The four modules together: feature_embedding -> moe_layer -> long_term / short_term towers.

    train.py may use the submodules directly; their names are the saved state_dict files' names.
    """

    def __init__(self, cfg: ModelConfig, moe_cfg: Optional[MoEConfig] = None):
        super().__init__()
        moe_cfg = moe_cfg or MoEConfig(dim=cfg.width)
        if moe_cfg.dim != cfg.width:
            raise ValueError(f"MoEConfig.dim ({moe_cfg.dim}) must equal ModelConfig.width ({cfg.width})")
        self.cfg, self.moe_cfg = cfg, moe_cfg
        self.feature_embedding = FeatureEmbedding(cfg)
        self.moe_layer = MoE(moe_cfg)
        self.long_term = InterestTower(cfg)
        self.short_term = InterestTower(cfg)

    def encode(self, batch: dict, tower: str = 'long') -> torch.Tensor:
        """batch -> (B, hidden_dim) unit user vectors from the 'long' or 'short' tower."""
        if tower not in ('long', 'short'):
            raise ValueError(f"tower must be 'long' or 'short', got {tower!r}")
        mask = batch_mask(batch)
        fe = self.feature_embedding
        x = self.moe_layer(fe(batch), mask)
        targets = fe.target(batch['item'], batch['category']) if self.cfg.skip_pool else None
        known = batch['item'] > UNKNOWN_ITEM
        return (self.long_term if tower == 'long' else self.short_term)(x, mask, targets, known, batch['category'],
                                                                       fe.category_weight(batch['category']))

    def candidate_vectors(self, batch: dict) -> torch.Tensor:
        """(C, hidden_dim) vectors of one-event candidate sequences (C, 1) to rank against long vectors:
        the target head of their (item, category) when the model has one, else the short tower of the
        one-event sequence (the two-tower space of the 'bpr' / 'infonce' objectives). With the target head,
        an item candidate's category half is scaled by cfg.item_category_weight and the vector renormalised
        (unit vectors either way); a category candidate (item = unknown) is its target vector."""
        if not self.cfg.target_head:
            return self.encode(batch, tower='short')
        item = batch['item'][:, 0]
        vectors = self.feature_embedding.target(item, batch['category'][:, 0])
        gamma = self.cfg.item_category_weight
        if gamma == 1.0:
            return vectors
        split = self.cfg.item_size
        is_item = (item > UNKNOWN_ITEM).unsqueeze(-1)                        # padding, or unknown (a category)
        weighted = torch.cat([vectors[:, :split], vectors[:, split:] * gamma], dim=-1)
        return torch.where(is_item, F.normalize(weighted, dim=-1), vectors)

    def forward(self, long_batch: dict, short_batch: dict, candidates: Optional[list] = None):
        """The training step's vectors: (long-tower vectors, short-tower vectors, [target vectors of each
        candidate set]); `batch_loss` turns them into the loss. candidates: (item, category) index tensor
        pairs, one per candidate set (the 'allaction' objective's future items and categories).
        Every parameter the step trains is used in this one call, which DistributedDataParallel needs.
        The vectors are encode(long_batch, 'long') and encode(short_batch, 'short'), except that both
        batches pass the MoE layer together (MoE.forward_parts: one dispatch, so each expert's matmuls get
        the rows of both; the short batch alone gives the 100 experts ~15 rows each, far below the CPU's
        GEMM peak) and so share one MoE dropout draw."""
        cands = [self.feature_embedding.target(i, c) for i, c in candidates or ()]
        fe = self.feature_embedding
        batches = (long_batch, short_batch)
        masks = [batch_mask(b) for b in batches]
        xs, _ = self.moe_layer.forward_parts([(fe(b), m) for b, m in zip(batches, masks)])
        vectors = []
        for tower, b, m, x in zip((self.long_term, self.short_term), batches, masks, xs):
            targets = fe.target(b['item'], b['category']) if self.cfg.skip_pool else None
            vectors.append(tower(x, m, targets, b['item'] > UNKNOWN_ITEM, b['category'], fe.category_weight(b['category'])))
        return vectors[0], vectors[1], cands

    def param_groups(self) -> tuple[list, list]:
        """(sparse, dense) parameters: the item table when it has sparse gradients (for SparseAdam), and
        every other parameter (for Adam)."""
        sparse = [m.weight for m in self.modules() if isinstance(m, nn.Embedding) and m.sparse]
        taken = {id(p) for p in sparse}
        return sparse, [p for p in self.parameters() if id(p) not in taken]


if __name__ == '__main__':
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=5000, n_categories=300)
    model = LongTermInterestModel(cfg)

    def random_batch(b: int, l: int) -> dict:
        lengths = torch.randint(1, l + 1, (b,))
        mask = torch.arange(l) < lengths[:, None]
        m = mask.long()
        return {'item': torch.randint(1, cfg.n_items, (b, l)) * m,
                'category': torch.randint(1, cfg.n_categories, (b, l)) * m,
                'weekday': torch.randint(1, 8, (b, l)) * m, 'hour': torch.randint(1, 25, (b, l)) * m,
                'weekend': torch.randint(1, 3, (b, l)) * m, 'behavior': torch.randint(1, 5, (b, l)) * m,
                'time': torch.rand(b, l, 2) * mask.unsqueeze(-1), 'mask': mask}

    long_b, short_b = random_batch(4, 200), random_batch(4, 20)
    x = model.feature_embedding(long_b)
    y = model.moe_layer(x, long_b['mask'])
    print(f"config: {cfg}")
    print(f"embedding {tuple(x.shape)} -> moe {tuple(y.shape)}")
    long_v, short_v, _ = model(long_b, short_b)
    print(f"long vectors {tuple(long_v.shape)}, norms {long_v.norm(dim=-1).tolist()}")
    loss, metrics = batch_loss(long_v, short_v, 'infonce', tau=0.1)
    loss.backward()
    print({k: round(float(t), 4) for k, t in metrics.items()})
    sparse, dense = model.param_groups()
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,} "
          f"(sparse {sum(p.numel() for p in sparse):,})")
