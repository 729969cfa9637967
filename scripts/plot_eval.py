"""Plot a run's evaluation curves from its TensorBoard event files (what the README shows).

    python scripts/plot_eval.py LABEL=RUN_FOLDER [LABEL=RUN_FOLDER ...] --output docs/images/eval.png

Each RUN_FOLDER is a run's log folder (``outputs/tiny/lightning_logs/version_0``); one line per run in each panel:
``eval/exact_match``, ``eval/rouge_l``, ``eval/ended_with_eot`` and ``val_loss``, against the optimizer step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a file, no display
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

PANELS = ("eval/exact_match", "eval/rouge_l", "eval/ended_with_eot", "val_loss")


def curves(folder: str) -> dict[str, tuple[list[int], list[float]]]:
    events = EventAccumulator(folder)
    events.Reload()
    found = {}
    for tag in PANELS:
        if tag in events.Tags()["scalars"]:
            points = events.Scalars(tag)
            found[tag] = ([p.step for p in points], [p.value for p in points])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_FOLDER")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    figure, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for run in args.runs:
        label, _, folder = run.partition("=")
        found = curves(folder)
        for axis, tag in zip(axes, PANELS):
            steps, values = found.get(tag, ([], []))
            axis.plot(steps, values, marker="o", markersize=3, label=label)
            axis.set_title(tag)
            axis.set_xlabel("optimizer step")
            axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
