"""Pictures and tables of finished runs: loss curves from ``metrics.jsonl``, result tables."""

from __future__ import annotations

from pathlib import Path

from ..training.metrics import read_metrics


def plot_runs(runs: dict[str, Path], out_png: Path) -> Path:
    """Training loss and validation cross-entropy of one or more runs, side by side.

    ``runs`` maps a label to a run directory. Training losses of different objectives
    (KD vs CE) are not on one scale, so they share only the x-axis; validation
    cross-entropy is the one comparable curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for label, run_dir in runs.items():
        records = read_metrics(Path(run_dir) / "metrics.jsonl")
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval/ce"]) for r in records if "eval/ce" in r]
        if train:
            ax_train.plot(*zip(*train), label=label)
        if evals:
            ax_eval.plot(*zip(*evals), marker="o", label=label)
    ax_train.set(title="training loss (each run's own objective)", xlabel="step", ylabel="loss per token")
    ax_eval.set(title="validation cross-entropy (lower is better)", xlabel="step", ylabel="nats per token")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


COLUMNS = (("ppl", "test ppl", "{:.2f}"), ("ce", "test CE", "{:.4f}"), ("kl", "KL(teacher||model)", "{:.4f}"),
           ("agreement", "top-1 agree", "{:.3f}"), ("params", "params", "{:,}"))


def results_table(rows: dict[str, dict], *, markdown: bool = False) -> str:
    """One row per model with the columns above (missing values shown as '-')."""
    header = ["model"] + [title for _, title, _ in COLUMNS]
    body = [[name] + [fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in COLUMNS]
            for name, r in rows.items()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    fmt_row = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt_row(header)] + [fmt_row(row) for row in body])
