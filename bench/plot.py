"""`--plot PATH.png`: end-to-end latency and throughput against batch size, one line per provider (`bench e2e`);
server latency and throughput against offered load or concurrency, one line per server (`bench serve`)."""
from __future__ import annotations

import os

from ipadapter_instruct.bench.common import Row


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("python -m bench: error: --plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, rows: list[Row], path: str, title: str) -> None:
    if rows:
        fig.suptitle(f"{rows[0].device}, {rows[0].dtype}, {title}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def plot_e2e(rows: list[Row], path: str) -> None:
    plt = pyplot()
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
    save(fig, rows, path, f"{rows[0].config.get('preset')}, {rows[0].config.get('steps')} steps" if rows else "")
    plt.close(fig)


def plot_serve(rows: list[Row], path: str) -> None:
    """Latency p50 (solid) and p99 (dashed) and achieved throughput against offered load (open loop: rows with
    x_name "rate") or else concurrency, one colour per server."""
    plt = pyplot()
    x_name = "rate" if any(r.x_name == "rate" for r in rows) else "concurrency"
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    servers = list(dict.fromkeys(r.provider for r in rows if r.op == "serve" and r.x_name == x_name))
    for k, server in enumerate(servers):
        def points(metric):
            return sorted(((r.x, r) for r in rows if r.op == "serve" and r.provider == server and r.metric == metric
                           and r.x_name == x_name), key=lambda p: p[0])
        latency, throughput = points("latency"), points("throughput")
        if latency:
            x = [x for x, _ in latency]
            lat.plot(x, [r.p50 for _, r in latency], marker="o", color=f"C{k}", label=f"{server} p50")
            lat.plot(x, [r.config["p99"] for _, r in latency], marker="s", ls="--", color=f"C{k}",
                     label=f"{server} p99")
        if throughput:
            thr.plot([x for x, _ in throughput], [r.p50 for _, r in throughput], marker="o", color=f"C{k}",
                     label=server)
    if x_name == "rate":
        top = max((r.x for r in rows if r.x_name == "rate"), default=0)
        thr.plot([0, top], [0, top], ls=":", color="grey", label="offered")
    label = "offered load (requests/s, Poisson arrivals)" if x_name == "rate" else "concurrency (client workers)"
    for ax, unit, title in ((lat, "ms", "latency per request (p50 solid, p99 dashed)"),
                            (thr, "images/s", "achieved throughput")):
        ax.set_xlabel(label)
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    first = rows[0].config if rows else {}
    save(fig, rows, path, f"{first.get('preset')}, {first.get('steps')} steps, {first.get('mix')} requests")
    plt.close(fig)
