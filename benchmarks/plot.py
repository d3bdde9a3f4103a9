"""Handshake latency over the outage run, as a PNG (needs the ``plot`` extra: matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_outage(results: dict[str, Any], path: Path) -> bool:
    """Write the plot; False (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = {key.removeprefix("outage_"): run for key, run in results.items() if key.startswith("outage_")}
    if not runs:
        return False
    figure, axes = plt.subplots(figsize=(9, 4.5))
    for policy, run in runs.items():
        points = run["latency_over_time"]
        axes.scatter([t for t, _ in points], [d * 1000 for _, d in points], s=6, label=policy)
    down_for = max(t for run in runs.values() for t, _ in run["latency_over_time"]) / 3
    axes.axvspan(down_for, 2 * down_for, color="red", alpha=0.08, label="auth service down")
    axes.set_xlabel("time since start of the run (s)")
    axes.set_ylabel("handshake latency (ms)")
    axes.set_yscale("log")
    axes.set_title("wsgate handshakes while the auth service goes down and comes back")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
