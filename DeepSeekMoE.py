"""DeepSeek-style mixture-of-experts layer with usage-penalised sigmoid routing.

Each token (a real event of a user's sequence) is routed to the top-k of `n_routed_experts` experts by
a sigmoid gate, and always to the `n_shared_experts` shared experts. An expert is
LayerNorm -> SwiGLU -> dropout; the outputs are mixed with the chosen experts' sigmoid scores,
normalised to sum to 1, and added to the input (residual).

As in DeepSeek-V3's inference/model.py, `Router` (its `Gate`) chooses the experts: the sigmoid gate,
top-k selection, the balancing state and its updates, the step and epoch counts and their statistics
(summed over the ranks when distributed). `MoE` holds the experts and dispatches the tokens to them.

Load balancing changes only *which* experts are chosen, never the mixing weights:
- 'running' (default): the seed's mechanism, updated every training step. The selection divides each
  expert's score by a penalty; `after_step()` (called by the training loop after every optimizer step)
  folds the step's counts into a running usage window (an exponential moving average) and multiplies
  each penalty by a power of the expert's load in that window (see `Router.update_running`), so busy experts
  are chosen less and unused ones more within a few dozen steps.
- 'seed': the scheme of the original project. Expert activations are counted during a training epoch;
  `end_epoch()` turns them into shares and, for the next epoch, the selection divides each expert's
  score by its share normalised by the mean share, so busy experts are chosen less often. Three
  stabilisers (see `Router.end_epoch`): the penalty compounds over epochs, the ratio is clamped and damped by
  `penalty_power`, and an expert's step halves whenever its correction changes direction.
- 'bias': DeepSeek-V3's auxiliary-loss-free scheme. A per-expert bias is added to the scores for
  selection only and nudged by `bias_update_speed` against the load error of each training step: the
  training loop calls `after_step()` after every optimizer step (on the device, no host sync).
- 'none': plain top-k.
The penalty and the bias are buffers saved in the state_dict and applied identically in eval mode, so
inference uses the routing the model was trained with and is deterministic. Every after_step() also
records the step's max-violation on the device; end_epoch() reports them as 'step_max_violation'.

Dispatch has no per-expert host syncs: counts come from `bincount` on the device, the (token, expert)
pairs are sorted by expert and every expert runs on a contiguous slice through `torch._grouped_mm`.
Padded positions are neither routed nor counted; their output is the input (zero from the embedding).
`MoE.forward_parts` sends several inputs (the training step's long and short sequences) through one
dispatch, so each expert's matmuls get the rows of all of them.
On the CPU torch._grouped_mm runs one small mm per group. One torch.bmm over the routed pairs scattered
into a zero-padded (experts, largest group, d) buffer was measured as the alternative and lost:
0.42-0.70x the speed on the groups of real training steps (the largest group is 2-4x the mean, and bmm
beats the grouped call by only 1.16x at ~100 rows per expert even without padding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

BALANCE_MODES = ('running', 'seed', 'bias', 'none')
# 'running': floor of the window load in the update, so an expert never used yet (load 0) gets a finite
# push, running_gain * log(1e4) per step.
RUNNING_LOAD_FLOOR = 1e-4


@dataclass
class MoEConfig:
    """Configuration of the MoE layer.

    Attributes:
        dim: model width, the size of the layer's input and output vectors.
        n_routed_experts: experts the router chooses from.
        n_shared_experts: experts applied to every real token (weight 1 each).
        n_activated: routed experts per token (top-k). With 1 the normalised weight is always 1 and the
            router gets no gradient (it then only follows the balancing); use >= 2.
        hidden: hidden width of each expert's SwiGLU (a multiple of 8).
        dropout: dropout on the mixed expert output (= on each expert's output, one mask per token).
        residual: return x + moe(x) instead of moe(x): the towers keep direct access to the embedded
            features and the embedding a direct gradient path, as around any Transformer FFN.
        balance: 'running' (usage penalty updated every step), 'seed' (usage penalty updated every epoch),
            'bias' (DeepSeek-V3 aux-loss-free bias) or 'none'.
        penalty_min: lower clamp of the seed penalty and of the per-epoch load ratio; an unused expert's
            score is multiplied at most by 1 / penalty_min, so it comes back gradually, never takes over.
        penalty_max: upper clamp of the seed penalty and of the per-epoch load ratio; a busy expert's
            score is divided at most by it.
        penalty_power: exponent on the per-epoch load ratio (1 = the seed's rule exactly in the first
            epoch; 0.5, the default, takes the square root, which overshoots less).
        bias_update_speed: step of the bias nudge per after_step() call ('bias' mode, DeepSeek's gamma).
        running_gain: 'running' mode: log penalty += running_gain * log(window load) per after_step().
            The load of an expert moves by a factor ~e^20 per unit of log penalty in the default layer at
            init (100 experts, top-2: the sigmoid scores of a token lie within ~0.3 in log), so a gain of
            0.05..0.07 corrects about one step's error per step; 0.1 oscillates (measured, see
            update_running).
        running_decay: 'running' mode: weight of the past in the usage window (EMA of the step counts);
            0.5 weighs the last steps 1/2, 1/4, ...: it damps the step-to-step changes of the batches'
            users (train.py buckets batches by history length) without a lag that makes the gain oscillate.
        running_penalty_max: 'running' penalties stay within [1 / running_penalty_max, running_penalty_max],
            wide enough to bring back an expert whose score is ~1e-4 of the others' for every token.
    """
    # shape
    dim: int = 128
    n_routed_experts: int = 100
    n_shared_experts: int = 1
    n_activated: int = 2
    hidden: int = 512
    # regularisation / wiring
    dropout: float = 0.1
    residual: bool = True
    # balancing
    balance: str = 'running'
    penalty_min: float = 0.5
    penalty_max: float = 4.0
    penalty_power: float = 0.5
    bias_update_speed: float = 1e-3
    running_gain: float = 0.07
    running_decay: float = 0.5
    running_penalty_max: float = 1e4

    def __post_init__(self) -> None:
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"MoEConfig.balance must be one of {BALANCE_MODES}, got {self.balance!r}")
        if not 1 <= self.n_activated <= self.n_routed_experts:
            raise ValueError(f"MoEConfig.n_activated must be in 1..n_routed_experts ({self.n_routed_experts}), "
                             f"got {self.n_activated}")
        if not 0 < self.penalty_min <= 1 <= self.penalty_max:
            raise ValueError(f"MoEConfig needs 0 < penalty_min <= 1 <= penalty_max, "
                             f"got {self.penalty_min}, {self.penalty_max}")
        if not (self.running_gain > 0 and 0 <= self.running_decay < 1 and self.running_penalty_max >= 1):
            raise ValueError(f"MoEConfig needs running_gain > 0, 0 <= running_decay < 1 and running_penalty_max "
                             f">= 1, got {self.running_gain}, {self.running_decay}, {self.running_penalty_max}")
        if self.dim < 1 or self.n_shared_experts < 0:
            raise ValueError("MoEConfig: dim must be >= 1 and n_shared_experts >= 0")
        if self.hidden < 8 or self.hidden % 8:
            raise ValueError(f"MoEConfig.hidden must be a positive multiple of 8 (row alignment of the grouped "
                             f"matmul), got {self.hidden}")


class MoEStats(NamedTuple):
    """Per-call routing statistics, all on the layer's device (no host sync).

    counts: (E,) int64 activations of each routed expert in this call (padded tokens excluded).
    tokens: () int64 number of real tokens routed in this call.
    """
    counts: torch.Tensor
    tokens: torch.Tensor


def _align(n: int, dtype: torch.dtype) -> int:
    """n rounded up so that n elements of dtype fill a multiple of 16 bytes (torch._grouped_mm rows)."""
    per = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return (n + per - 1) // per * per


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] (r, d) with a 16-byte-aligned row stride (a view of a zero-padded copy for odd d)."""
    d = x.shape[1]
    width = _align(d, x.dtype)
    if width != d:
        x = F.pad(x, (0, width - d))
    return x.index_select(0, index)[:, :d]


class _SortedExperts(torch.autograd.Function):
    """Experts on (token, expert) pairs sorted by expert, mixed back per token.

    y[t] = sum over the pairs r of token t of  w[r] * (silu(a1) * a2) @ w_out[e].T,  [a1 | a2] = xn[t] @ w_in[e]
    Each expert works on the contiguous rows of its group (torch._grouped_mm, offsets = group ends, no
    host sync). Pairs past the last group (padded tokens) are not computed; _grouped_mm leaves their rows
    undefined, so they are zeroed before anything reads them. The hand-written backward keeps every
    matmul operand 16-byte aligned (odd widths), writes the SwiGLU gradient straight into one buffer
    (no chunk/cat), and skips what is not needed.
    """

    @staticmethod
    def forward(ctx, xn, w_in, w_out, w, token, group_ends, real):
        t, d = xn.shape
        hid = w_out.shape[2]
        z = _gather_rows(xn, token)                                         # (r, d)
        a = torch._grouped_mm(z, w_in, group_ends)                          # (r, 2h)
        s = F.silu(a[:, :hid])                                              # (r, h)
        hidden = s * a[:, hid:]                                             # (r, h)
        out = torch._grouped_mm(hidden, w_out.transpose(1, 2), group_ends)  # (r, d)
        out.masked_fill_(~real.unsqueeze(1), 0)                             # rows past the last group
        y = xn.new_zeros(t, d).index_add_(0, token, out * w.unsqueeze(1))   # (t, d)
        ctx.save_for_backward(z, w_in, w_out, a, s, hidden, out, w, token, group_ends, real)
        return y

    @staticmethod
    def backward(ctx, gy):
        z, w_in, w_out, a, s, hidden, out, w, token, group_ends, real = ctx.saved_tensors
        t, d = gy.shape
        hid = s.shape[1]
        g = _gather_rows(gy, token)                                         # (r, d)
        grad_w = (g * out).sum(1) if ctx.needs_input_grad[3] else None     # (r,)
        g.mul_(w.unsqueeze(1))                                              # d loss / d out
        grad_w_out = torch._grouped_mm(g.t(), hidden, group_ends)           # (g, d, h)
        gh = torch._grouped_mm(g, w_out, group_ends)                        # (r, h)
        ga = torch.empty_like(a)                                            # (r, 2h) d loss / d a
        torch.mul(gh, s, out=ga[:, hid:])
        gh.mul_(a[:, hid:])
        torch.ops.aten.silu_backward.grad_input(gh, a[:, :hid], grad_input=ga[:, :hid])
        grad_w_in = torch._grouped_mm(z.t(), ga, group_ends)                # (g, d, 2h)
        grad_xn = None
        if ctx.needs_input_grad[0]:
            gz = torch._grouped_mm(ga, w_in.transpose(1, 2), group_ends)    # (r, d)
            gz.masked_fill_(~real.unsqueeze(1), 0)
            grad_xn = gy.new_zeros(t, d).index_add_(0, token, gz)
        return grad_xn, grad_w_in, grad_w_out, grad_w, None, None, None


def _grouped_mm_supported(x: torch.Tensor) -> bool:
    """Grouped matmul without host syncs: CPU float32/bf16/fp16, or CUDA bf16 on sm90+."""
    if not hasattr(torch, '_grouped_mm'):
        return False
    if x.device.type == 'cpu':
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == 'cuda':
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def balance_stats(counts) -> dict:
    """Usage statistics of per-expert activation counts (tensor or sequence, (E,)).

    Returns dict: activations (total count), load (per-expert count / mean count, list),
    max_violation (max load - 1), cv (coefficient of variation of the counts), dead (experts never
    chosen), entropy (of the shares, normalised to [0, 1]; 1 = uniform).
    """
    c = torch.as_tensor(counts).detach().to('cpu', torch.float64).reshape(-1)
    total = float(c.sum())
    e = c.numel()
    if total <= 0:
        return {'activations': 0, 'load': [0.0] * e, 'max_violation': 0.0, 'cv': 0.0, 'dead': e, 'entropy': 0.0}
    mean = total / e
    load = c / mean
    share = c / total
    nz = share[share > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(e)) if e > 1 else 1.0
    return {
        'activations': int(total),
        'load': [round(v, 4) for v in load.tolist()],
        'max_violation': float(load.max() - 1),
        'cv': float(c.std(unbiased=False) / mean),
        'dead': int((c == 0).sum()),
        'entropy': entropy,
    }


class Router(nn.Module):
    """Sigmoid top-k gate and the load-balancing state it selects with (DeepSeek-V3's `Gate`).

    `forward` returns each token's top-k routed experts and their mixing weights. The balancing state
    (penalty or bias, by `cfg.balance`) changes only which experts are selected; the weights are the
    selected experts' unbiased scores. The layer reports the expert counts of every training call through
    `track`; `after_step` and `end_epoch` sum the step's / epoch's counts over `process_group` and update
    the state from them.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.n_routed_experts
        self.gate = nn.Linear(cfg.dim, e, bias=False)
        # balancing state: saved with the weights, used identically in eval
        self.register_buffer('penalty', torch.ones(e))            # 'running', 'seed': selection score / penalty
        self.register_buffer('penalty_step', torch.ones(e))       # 'seed': per-expert step, halves on flips
        self.register_buffer('penalty_sign', torch.zeros(e))      # 'seed': direction of the last correction
        self.register_buffer('bias', torch.zeros(e))              # 'bias': selection score + bias
        self.register_buffer('usage', torch.zeros(e))             # 'running': usage window, EMA of step counts
        # transient usage of the current training epoch and step (not saved)
        self.register_buffer('epoch_counts', torch.zeros(e, dtype=torch.long), persistent=False)
        self.register_buffer('step_counts', torch.zeros(e, dtype=torch.long), persistent=False)
        self.step_violations: list[torch.Tensor] = []             # () device tensors, one per after_step
        # Distributed training (torch.distributed): the counts of all ranks are summed before they are used,
        # so every rank balances with the same, global statistics. None = this process's counts only.
        self.process_group = None

    def reset_parameters(self) -> None:
        self.gate.reset_parameters()

    def forward(self, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k routing of normalised tokens.

        xn (T, D) -> weights (T, k) mixing weights (unbiased sigmoid scores, sum 1), indices (T, k).
        The balancing penalty / bias changes only the selection.
        """
        scores = torch.sigmoid(self.gate(xn))                               # (T, E)
        mode = self.cfg.balance
        if mode in ('running', 'seed'):
            selection = scores / self.penalty
        elif mode == 'bias':
            selection = scores + self.bias
        else:
            selection = scores
        indices = selection.topk(self.cfg.n_activated, dim=-1, sorted=False).indices   # (T, k)
        weights = scores.gather(1, indices)                                 # (T, k)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights, indices

    @torch.no_grad()
    def track(self, counts: torch.Tensor) -> None:
        """Add one training call's counts (E,) to the step's and the epoch's."""
        self.epoch_counts += counts
        self.step_counts += counts

    @torch.no_grad()
    def after_step(self) -> None:
        """Call once after every optimizer step (every rank, with a process_group): record the step's
        max-violation and, in 'running' / 'bias' mode, update the penalty / bias from the step's load
        (all training forward calls since the last after_step); no host sync."""
        counts = self._global(self.step_counts)
        load = counts.float() / counts.float().mean()                        # nan for a step without tokens
        self.step_violations.append(torch.nan_to_num(load.max() - 1, nan=0.0))
        if self.cfg.balance == 'running':
            self.update_running(counts)
        elif self.cfg.balance == 'bias':
            self.update_bias(counts)
        self.step_counts.zero_()
    @torch.no_grad()
    def update_running(self, counts: torch.Tensor) -> None:
        """'running' update from one step's counts (E,) on the device; no host sync.

            usage = running_decay * usage + (1 - running_decay) * counts    (the first step: counts)
            log penalty += running_gain * log(max(usage / mean usage, RUNNING_LOAD_FLOOR))
        then re-centred to mean 0 (only the ratios change the selection; this keeps them off the clamps)
        and clamped to +-log(running_penalty_max). The penalty integrates the load error, so it settles
        where the window load is even. An expert that stops being chosen sees its window load halve every
        step, so the push that brings it back grows by running_gain * log(2) per step. A step without
        tokens changes nothing.
        Chosen by replaying the recorded gate scores of a demo run at batch size 256 (6 steps an epoch,
        30 in all) under other rules: this one ends at a last-epoch max-violation of ~0.26; a sign-only
        update with a per-expert adaptive step (Rprop) ~0.9, because the batches' users change from step
        to step and flip the signs; steps that grow while an expert stays on one side overshoot (> 5).
        """
        counts = counts.float()
        seen = counts.sum() > 0
        started = self.usage.sum() > 0
        window = torch.where(started, self.cfg.running_decay * self.usage + (1 - self.cfg.running_decay) * counts,
                             counts)
        self.usage.copy_(torch.where(seen, window, self.usage))
        load = self.usage / self.usage.mean()
        error = load.clamp(min=RUNNING_LOAD_FLOOR).log()
        log_penalty = self.penalty.log() + self.cfg.running_gain * error
        bound = math.log(self.cfg.running_penalty_max)
        log_penalty = (log_penalty - log_penalty.mean()).clamp_(-bound, bound)
        self.penalty.copy_(torch.where(seen, log_penalty.exp(), self.penalty))

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """DeepSeek-V3 aux-loss-free update: bias += speed * sign(mean load - load), counts (E,) on the
        device: under-loaded experts become likelier to be chosen, over-loaded ones less."""
        load = counts.float()
        self.bias += self.cfg.bias_update_speed * torch.sign(load.mean() - load)

    @torch.no_grad()
    def end_epoch(self) -> dict:
        """Close a training epoch: update the seed penalty from this epoch's usage and report it.

        load = share / mean share (activation counts of this epoch). The seed divides the selection
        scores by load. Here, per expert e:
            ratio = clamp(load, penalty_min, penalty_max) ** penalty_power
            penalty = clamp(penalty * ratio ** step, penalty_min, penalty_max)
        - compounding: the next epoch's shares are measured under the penalty in force, so a penalty
          recomputed from scratch would switch itself off once it works and oscillate with period 2;
        - step (1 at first) halves whenever the expert's correction changes direction: an expert whose
          score is high for all tokens balances only on a knife edge of its penalty, which the halving
          homes in on by bisection instead of jumping across it every epoch.
        With penalty_power = 1 the first epoch is exactly the seed's rule. With a process_group the
        counts are the sum over its ranks (every rank must call this), and the stats add 'rank_load', each
        rank's own counts. Returns balance_stats of the epoch plus the penalty and bias ranges and
        'step_max_violation', the max-violation of each after_step() of the epoch (global counts).
        """
        counts = self._global(self.epoch_counts)
        rank_counts = self._per_rank(self.epoch_counts)
        stats = balance_stats(counts)
        if rank_counts is not None:
            stats['rank_load'] = rank_counts.tolist()
        if self.cfg.balance == 'seed' and stats['activations'] > 0:
            cfg = self.cfg
            load = counts.float() / counts.float().mean()
            log_ratio = cfg.penalty_power * load.clamp(cfg.penalty_min, cfg.penalty_max).log()
            sign = torch.sign(log_ratio)
            self.penalty_step.mul_(torch.where(sign * self.penalty_sign < 0, 0.5, 1.0))
            self.penalty_sign.copy_(torch.where(sign != 0, sign, self.penalty_sign))
            self.penalty.mul_(torch.exp(self.penalty_step * log_ratio)).clamp_(cfg.penalty_min, cfg.penalty_max)
        self.epoch_counts.zero_()
        stats['penalty_min'] = float(self.penalty.min())
        stats['penalty_max'] = float(self.penalty.max())
        stats['bias_min'] = float(self.bias.min())
        stats['bias_max'] = float(self.bias.max())
        stats['step_max_violation'] = torch.stack(self.step_violations).tolist() if self.step_violations else []
        self.step_violations = []
        return stats

    def _global(self, counts: torch.Tensor) -> torch.Tensor:
        """counts summed over the process group (a copy; the local counter is left alone)."""
        counts = counts.clone()
        if self.process_group is not None:
            dist.all_reduce(counts, group=self.process_group)
        return counts

    def _per_rank(self, counts: torch.Tensor) -> Optional[torch.Tensor]:
        """(world, E) every rank's counts, or None without a process group."""
        if self.process_group is None:
            return None
        parts = [torch.empty_like(counts) for _ in range(dist.get_world_size(self.process_group))]
        dist.all_gather(parts, counts.contiguous(), group=self.process_group)
        return torch.stack(parts).cpu()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Files saved before the 'running' mode have no usage window: start it empty (strict loading)."""
        state_dict.setdefault(prefix + 'usage', torch.zeros_like(self.usage))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# Keys of the router's state that moe_layer.pth files saved before the Router module (up to commit
# 087420d) hold at the layer's top level; MoE loads them under 'router.'.
_PRE_ROUTER_KEYS = ('gate.weight', 'penalty', 'penalty_step', 'penalty_sign', 'bias', 'usage')


class MoE(nn.Module):
    """Mixture of experts: a `Router` (sigmoid top-k + balancing) + shared experts, sorted grouped dispatch.

    Experts are stored stacked, routed experts first (0..E-1), then the shared ones (E..E+S-1):
        w_in  (E+S, D, 2H)   [gate | up] = LN(x) @ w_in[e]
        w_out (E+S, D, H)    out = (silu(gate) * up) @ w_out[e].T   (nn.Linear layout)
    Each expert is LayerNorm -> SwiGLU (bias-free, as in LLaMA / DeepSeek). The LayerNorm statistics are
    the same for every expert, so they are computed once per token; each expert's LayerNorm gain is
    merged into the rows of its w_in (the same family of functions, without a per-(token, expert) affine
    pass over the pairs). The router sees the same normalised token.
    Dropout acts on the mixed expert output, i.e. on every expert's output with one mask per token.
    (w_in is (D, 2H) and w_out (D, H) per expert so that every row stride torch._grouped_mm reads is a
    multiple of 16 bytes, whatever D.)
    The training loop calls `after_step()` after every optimizer step and `end_epoch()` after every
    epoch; both are the router's (balancing updates and statistics).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        d, h, e, s = cfg.dim, cfg.hidden, cfg.n_routed_experts, cfg.n_shared_experts
        self.n_experts = e + s
        self.router = Router(cfg)             # first: its gate draws its init from the RNG before the experts
        self.w_in = nn.Parameter(torch.empty(e + s, d, 2 * h))
        self.w_out = nn.Parameter(torch.empty(e + s, d, h))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init (uniform +-1/sqrt(fan_in)) for every expert matrix, then the gate's."""
        bound_in, bound_out = 1 / math.sqrt(self.cfg.dim), 1 / math.sqrt(self.cfg.hidden)
        with torch.no_grad():
            self.w_in.uniform_(-bound_in, bound_in)
            self.w_out.uniform_(-bound_out, bound_out)
        self.router.reset_parameters()

    @property
    def process_group(self):
        """The torch.distributed group whose counts the router sums (None: this process's only)."""
        return self.router.process_group

    @process_group.setter
    def process_group(self, group) -> None:
        self.router.process_group = group

    def after_step(self) -> None:
        """Router.after_step: once after every optimizer step (every rank, with a process_group)."""
        self.router.after_step()

    def end_epoch(self) -> dict:
        """Router.end_epoch: close a training epoch; returns its balance statistics."""
        return self.router.end_epoch()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Files saved before the Router module hold its state at the top level: load it under 'router.'."""
        for key in _PRE_ROUTER_KEYS:
            old, new = prefix + key, prefix + 'router.' + key
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Route every real token through its top-k experts and the shared experts.

        Dimension letters: b batch, n sequence positions, d width, t = b*n tokens, k routed experts per
        token, e routed experts, r = t*(k+s) (token, expert) pairs.

        Args:
            x: (b, n, d) token vectors.
            mask: (b, n) bool, True = real token; None = all real. Padded tokens are not routed, not
                counted, and come out as their input (zero from the feature embedding).
        Returns:
            y (b, n, d). forward_parts also returns the routing counts (MoEStats).
        """
        return self.forward_parts([(x, mask)])[0][0]

    def forward_parts(self, parts: list) -> tuple[list, MoEStats]:
        """forward() of several inputs [(x (b_i, n_i, d), mask (b_i, n_i) or None), ...] in ONE dispatch.

        Every token is routed exactly as by forward(x_i, mask_i) (routing is per token); the experts just
        see the tokens of all parts at once, so each expert's matmuls get more rows (the training step
        passes its long and short sequences together: on the CPU the per-expert matmuls of the short part
        alone, ~15 rows each, run far below the GEMM peak). The counts are the sum over the parts, what
        the calls one by one would track. Only the dropout differs from the calls one by one: one mask
        is drawn for all parts (the same distribution, other random numbers).
        Returns ([y_i (b_i, n_i, d)], MoEStats of all parts together).
        """
        d = self.cfg.dim
        for x, _ in parts:
            if x.dim() != 3 or x.shape[2] != d:
                raise ValueError(f"MoE expects width {d}, got input of shape {tuple(x.shape)}")
        flat = [x.reshape(-1, d) for x, _ in parts]
        xf = flat[0] if len(flat) == 1 else torch.cat(flat)                   # (t, d)
        t = xf.shape[0]
        if all(m is None for _, m in parts):
            valid = None
        else:
            valid = torch.cat([torch.ones(f.shape[0], dtype=torch.bool, device=xf.device) if m is None
                               else m.reshape(-1).to(torch.bool) for f, (_, m) in zip(flat, parts)])
        xn = F.layer_norm(xf, (d,))                                         # (t, d) shared LN statistics
        weights, indices = self.router(xn)                                  # (t, k)
        expert, token, w, sizes = self._pairs(weights, indices, valid)
        counts = sizes[:self.cfg.n_routed_experts]                          # (e,) real tokens only
        tokens = valid.sum() if valid is not None else xf.new_full((), t, dtype=torch.long)
        if self.training:
            self.router.track(counts)
        if _grouped_mm_supported(xf):
            y = self._experts_grouped(xn, expert, token, w, sizes)          # (t, d)
        else:
            y = self._experts_split(xn, expert, token, w, sizes)
        y = F.dropout(y, self.cfg.dropout, self.training)
        if self.cfg.residual:
            y = y + xf
        ys = y.split([f.shape[0] for f in flat]) if len(flat) > 1 else [y]
        return [yi.view(x.shape) for yi, (x, _) in zip(ys, parts)], MoEStats(counts, tokens)

    def _pairs(self, weights: torch.Tensor, indices: torch.Tensor, valid: Optional[torch.Tensor]):
        """(token, expert) pairs sorted by expert.

        Returns expert ids (r,), token ids (r,), mixing weights (r,) and group sizes (E+S,) int64.
        Shared experts are pairs with weight 1; pairs of padded tokens get the id E+S and sort last,
        beyond the last group, so no expert computes or counts them.
        """
        t, k = indices.shape
        e, s = self.cfg.n_routed_experts, self.cfg.n_shared_experts
        g = e + s
        if s:
            shared = torch.arange(e, g, device=indices.device).expand(t, s)
            indices = torch.cat([indices, shared], 1)                       # (t, k+s)
            weights = torch.cat([weights, weights.new_ones(t, s)], 1)
        if valid is not None:
            indices = indices.masked_fill(~valid.unsqueeze(1), g)
        flat = indices.reshape(-1)                                          # (r,)
        order = flat.argsort(stable=True)                                   # (r,)
        sizes = torch.bincount(flat, minlength=g + 1)[:g]                   # (E+S,) on the device
        return flat[order], order // indices.shape[1], weights.reshape(-1)[order], sizes

    def _experts_grouped(self, xn, expert, token, w, sizes) -> torch.Tensor:
        """Mixed expert outputs (t, d) through two grouped matmuls over the sorted pairs."""
        group_ends = sizes.cumsum(0).to(torch.int32)                        # (E+S,)
        real = expert < self.n_experts                                      # (r,) pairs of real tokens
        if xn.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):    # the grouped matmul is no autocast op
            xn = xn.to(torch.get_autocast_dtype('cpu'))
        return _SortedExperts.apply(xn, self.w_in.to(xn.dtype), self.w_out.to(xn.dtype), w.to(xn.dtype),
                                    token, group_ends, real)

    def _experts_split(self, xn, expert, token, w, sizes) -> torch.Tensor:
        """Fallback without a usable grouped matmul: per-expert contiguous slices (one host sync)."""
        t, d = xn.shape
        sizes = sizes.tolist()
        r = sum(sizes)
        token, w = token[:r], w[:r]
        z = xn[token]                                                       # (r, d)
        outs = []
        for i, zi in enumerate(z.split(sizes)):
            if zi.shape[0]:
                gate, up = (zi @ self.w_in[i]).chunk(2, dim=-1)
                outs.append((F.silu(gate) * up) @ self.w_out[i].t())
        out = torch.cat(outs).to(xn.dtype) if outs else z
        return xn.new_zeros(t, d).index_add_(0, token, out * w.unsqueeze(1).to(xn.dtype))


if __name__ == '__main__':
    torch.manual_seed(0)
    cfg = MoEConfig()
    moe = MoE(cfg)
    x = torch.randn(4, 200, cfg.dim)
    mask = torch.arange(200).expand(4, 200) < torch.tensor([[200], [150], [37], [1]])
    (y,), stats = moe.forward_parts([(x, mask)])
    y.sum().backward()
    print(f"config: {cfg}")
    print(f"x {tuple(x.shape)} -> y {tuple(y.shape)}; counts {tuple(stats.counts.shape)} "
          f"sum {int(stats.counts.sum())} = {cfg.n_activated} x {int(stats.tokens)} real tokens")
    report = moe.end_epoch()
    print({k: v for k, v in report.items() if k != 'load'})
    print(f"parameters: {sum(p.numel() for p in moe.parameters()):,}")
