"""`--plot PATH.png`: end-to-end latency and throughput against batch size, one line per provider."""
from __future__ import annotations

import os

from .common import Row


def plot_e2e(rows: list[Row], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("python -m bench: error: --plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (("latency", "ms", "latency per request (p50, band p20-p80)"),
              ("throughput", "images/s", "throughput (p50)"))
    for ax, (metric, unit, title) in zip(axes, panels):
        for provider in dict.fromkeys(r.provider for r in rows):
            pts = sorted((r.x, r.p20, r.p50, r.p80) for r in rows
                         if r.op == "e2e" and r.provider == provider and r.metric == metric and r.unit == unit)
            if not pts:
                continue
            x, lo, mid, hi = zip(*pts)
            ax.plot(x, mid, marker="o", label=provider)
            ax.fill_between(x, lo, hi, alpha=0.2)
        ax.set_xlabel("batch (requests per call)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    first = rows[0] if rows else None
    if first is not None:
        fig.suptitle(f"{first.device}, {first.dtype}, {first.config.get('preset')}, {first.config.get('steps')} steps")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
