"""Training report written to saved_models/ after a run: three PNG plots and metrics.json.

    report.write_report('saved_models', history=history, metrics=metrics, user_vectors=vecs, top_category=cats)

- report_loss.png     train / validation loss per epoch (and validation re-identification MRR)
- report_experts.png  expert load per epoch (heat map, epochs x experts), the max-violation per epoch and,
                      when recorded, per training step
- report_users.png    2-D PCA of the user vectors, coloured by each user's top category (top 10, others grey)
- metrics.json        the evaluation metrics and the per-epoch history, everything in one file

Every file is written atomically (temporary file, then os.replace). matplotlib runs on the Agg backend.
"""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from atomic_files import atomic_json_save, atomic_write  # noqa: E402

FILES = {'loss': 'report_loss.png', 'experts': 'report_experts.png', 'users': 'report_users.png',
         'metrics': 'metrics.json'}
TOP_CATEGORIES = 10             # coloured categories in the user plot; the rest are grey
MAX_POINTS = 20_000             # users drawn in the PCA plot (a seeded sample beyond that)


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha='center', va='center', transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_loss(history: list[dict], path: Path) -> None:
    """Train and validation loss per epoch; validation MRR on a second axis when recorded."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h.get('epoch', i + 1) for i, h in enumerate(history)]
    if not history:
        _no_data(ax, 'no epochs recorded')
    else:
        for key, style in (('train_loss', 'o-'), ('val_loss', 's--')):
            ys = [h.get(key, np.nan) for h in history]
            if np.isfinite(np.asarray(ys, float)).any():
                ax.plot(epochs, ys, style, label=key.replace('_', ' '))
        ax.set_xlabel('epoch')
        ax.set_ylabel('loss')
        mrr = [h.get('val_mrr', np.nan) for h in history]
        if np.isfinite(np.asarray(mrr, float)).any():
            ax2 = ax.twinx()
            ax2.plot(epochs, mrr, 'd:', color='tab:green', label='val MRR')
            ax2.set_ylabel('validation re-identification MRR')
            ax2.legend(loc='upper right')
        ax.legend(loc='upper left')
        ax.set_xticks(epochs)
    ax.set_title('loss per epoch')
    _save_figure(fig, path)


def plot_experts(history: list[dict], path: Path) -> None:
    """Heat map of each expert's load (share / mean share) per epoch, max-violation per epoch, and
    max-violation per training step when the history has it (moe.step_max_violation; older runs do not)."""
    loads = [h.get('moe', {}).get('load') or [] for h in history]
    width = max((len(x) for x in loads), default=0)
    steps = [h.get('moe', {}).get('step_max_violation') or [] for h in history]
    panels = 3 if any(steps) else 2
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2 + 1.5 * panels),
                             gridspec_kw={'height_ratios': [3, 1, 1][:panels]})
    ax, ax2 = axes[:2]
    if panels == 3:
        _plot_step_violation(axes[2], steps)
    if width == 0:
        _no_data(ax, 'no expert load recorded')
        _no_data(ax2, '')
    else:
        mat = np.full((len(loads), width), np.nan)
        for i, x in enumerate(loads):
            mat[i, :len(x)] = x
        im = ax.imshow(mat, aspect='auto', cmap='viridis', interpolation='nearest',
                       extent=(-0.5, width - 0.5, len(loads) + 0.5, 0.5))
        fig.colorbar(im, ax=ax, label='load (1 = even share)')
        ax.set_xlabel('expert')
        ax.set_ylabel('epoch')
        if len(loads) <= 30:
            ax.set_yticks(range(1, len(loads) + 1))
        viol = [h.get('moe', {}).get('max_violation', np.nan) for h in history]
        epochs = [h.get('epoch', i + 1) for i, h in enumerate(history)]
        ax2.plot(epochs, viol, 'o-', color='tab:red')
        ax2.set_xlabel('epoch')
        ax2.set_ylabel('max-violation')
        if len(epochs) <= 30:
            ax2.set_xticks(epochs)
        fig.tight_layout()
        ax.set_title(f'expert load per epoch; last max-violation {viol[-1]:.2f}, '
                     f"dead {history[-1].get('moe', {}).get('dead', 0)}")
    _save_figure(fig, path)


def _plot_step_violation(ax, steps: list[list[float]]) -> None:
    """Max-violation of every training step, epochs one after another (dotted lines between them).
    Symmetric-log y axis: the first steps (tens) and a balanced router (hundredths) both stay readable."""
    ys = np.concatenate([np.asarray(s, float) for s in steps])
    ax.plot(np.arange(1, len(ys) + 1), ys, '.-', color='tab:purple', lw=0.8, ms=3)
    for end in np.cumsum([len(s) for s in steps])[:-1]:
        ax.axvline(end + 0.5, color='grey', ls=':', lw=0.8)
    ax.set_yscale('symlog', linthresh=0.1)
    ax.set_ylim(bottom=0)                                           # max-violation >= 0
    ax.set_xlabel('training step')
    ax.set_ylabel('max-violation\nper step')


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) projection on the two leading principal components and their explained-variance shares."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(0, keepdims=True)
    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2)), np.zeros(2)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, vt.shape[0])
    proj = np.zeros((x.shape[0], 2))
    proj[:, :k] = x @ vt[:k].T
    var = s ** 2
    share = np.zeros(2)
    share[:k] = var[:k] / max(var.sum(), 1e-12)
    return proj, share


def plot_users(user_vectors: np.ndarray, top_category: np.ndarray, path: Path, seed: int = 0) -> None:
    """PCA of the user vectors, coloured by top category (the TOP_CATEGORIES most common; others grey)."""
    vecs = np.asarray(user_vectors, np.float32)
    cats = np.asarray(top_category)
    if len(vecs) > MAX_POINTS:
        keep = np.sort(np.random.default_rng(seed).choice(len(vecs), MAX_POINTS, replace=False))
        vecs, cats = vecs[keep], cats[keep]
    fig, ax = plt.subplots(figsize=(6, 5))
    if len(vecs) < 2:
        _no_data(ax, 'fewer than 2 user vectors')
    else:
        proj, share = pca_2d(vecs)
        values, counts = np.unique(cats, return_counts=True)
        top = values[np.argsort(-counts, kind='stable')[:TOP_CATEGORIES]]
        other = ~np.isin(cats, top)
        ax.scatter(proj[other, 0], proj[other, 1], s=4, c='lightgrey', label='other', alpha=0.6)
        cmap = plt.get_cmap('tab10')
        for i, c in enumerate(top):
            m = cats == c
            ax.scatter(proj[m, 0], proj[m, 1], s=6, color=cmap(i % 10), label=f'cat {c} ({int(m.sum())})')
        ax.set_xlabel(f'PC1 ({share[0]:.0%} of variance)')
        ax.set_ylabel(f'PC2 ({share[1]:.0%})')
        ax.legend(fontsize=6, markerscale=2, loc='best')
    ax.set_title(f'user vectors (PCA), {len(vecs):,} users by top category')
    _save_figure(fig, path)


def _finite(o):
    """NaN / inf -> None, recursively, so the file is strict JSON."""
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (float, np.floating)) and not np.isfinite(o):
        return None
    return o


def write_report(save_dir, history: list[dict] | None = None, metrics: dict | None = None,
                 user_vectors: np.ndarray | None = None, top_category: np.ndarray | None = None) -> dict[str, Path]:
    """Write the three plots and metrics.json to save_dir; returns {name: path}."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    history = list(history or [])
    paths = {k: save_dir / v for k, v in FILES.items()}
    plot_loss(history, paths['loss'])
    plot_experts(history, paths['experts'])
    if user_vectors is None:
        user_vectors, top_category = np.zeros((0, 2), np.float32), np.zeros(0, np.int64)
    plot_users(user_vectors, top_category, paths['users'])
    atomic_json_save(_finite({'metrics': metrics or {}, 'history': history}), paths['metrics'], allow_nan=False)
    return paths
