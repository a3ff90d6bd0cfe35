"""Turn a finished sweep into the paper's tables: `python -m rts_thaw.report <sweep dir>`.

Writes into `<sweep dir>/report/` (or `--out`):
  report.md          the table (one row per configuration, mean ± std over seeds),
                     the runs that failed or did not finish, the W&B group
  configurations.csv the same table, means and standard deviations in separate columns
  runs.csv           every job on its own row, with its status and directory
  ap50_by_fusion.png, accuracy_vs_memory.png
and prints report.md. Exit status 1 when no run of the sweep finished.
`--missing ndvi nir` adds rows of the fused models scored without a modality;
`--test-data path.seed=1 path.scenes=100` scores every run on the test split of its data so
changed (a larger world of the same kind, unseen in training) instead of its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rts_thaw.eval.results_table import write_csv
from rts_thaw.reporting.collect import Run, collect_runs, wandb_groups
from rts_thaw.reporting.missing import missing_modality_runs
from rts_thaw.reporting.plots import plot_accuracy_vs_memory, plot_ap50_by_fusion
from rts_thaw.reporting.rescore import runs_scored_on
from rts_thaw.reporting.tables import configuration_rows, markdown_table, run_rows


def _problem_list(runs: list[Run]) -> str:
    problems = [r for r in runs if r.status != "finished"]
    if not problems:
        return "All jobs finished."
    lines = [f"{len(problems)} of {len(runs)} jobs did not finish:", ""]
    for run in problems:
        where = f" in `{run.run_dir}`" if run.run_dir else ""
        why = f": {run.error}" if run.error else ""
        lines.append(f"- **{run.status}** `{' '.join(run.overrides)}`{where}{why}")
    return "\n".join(lines)


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None,
                 missing: list[str] | None = None, test_data: list[str] | None = None) -> dict:
    """Collect the sweep's runs and write the tables and plots; returns what was written.
    `missing` adds, per modality, rows of the fused models evaluated without it; `test_data`
    (dotted keys inside the data config) scores every run on its data so changed."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir else sweep_dir / "report"
    test_data = tuple(test_data or ())
    runs = runs_scored_on(collect_runs(sweep_dir), test_data)
    runs += missing_modality_runs(runs, list(missing or []), test_data)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = configuration_rows(runs)
    groups = wandb_groups(runs)
    finished = sum(r.status == "finished" for r in runs)

    write_csv(rows, out_dir / "configurations.csv")
    write_csv(run_rows(runs), out_dir / "runs.csv")
    ap50_plot = plot_ap50_by_fusion(rows, out_dir / "ap50_by_fusion.png")
    memory_plot = plot_accuracy_vs_memory(rows, out_dir / "accuracy_vs_memory.png")

    sections = [
        f"# Sweep report: `{sweep_dir}`",
        f"{finished} of {len(runs)} jobs finished; {len(rows)} configurations. "
        "Test-split COCO metrics in percent, mean ± std over seeds; `seeds` = finished / launched."
        + (f" Every run scored on the test split of its data with `{' '.join(test_data)}`, not its own."
           if test_data else ""),
        markdown_table(rows),
        "## Failed or unfinished runs\n\n" + _problem_list(runs),
        "## Weights & Biases\n\n" + (
            "Runs were logged to W&B group(s): " + ", ".join(f"`{g}`" for g in groups)
            if groups else "No run logged to W&B."),
        f"## Plots\n\n![AP50 per fusion strategy]({ap50_plot.name})\n\n"
        f"![Accuracy vs peak memory]({memory_plot.name})",
    ]
    markdown = "\n\n".join(sections) + "\n"
    (out_dir / "report.md").write_text(markdown)
    return {"markdown": markdown, "rows": rows, "runs": runs, "out_dir": out_dir,
            "finished": finished, "wandb_groups": groups}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rts_thaw.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="directory of a `python -m rts_thaw.train -m` sweep")
    parser.add_argument("--out", default=None, help="output folder (default: <sweep_dir>/report)")
    parser.add_argument("--missing", nargs="*", default=[], metavar="MODALITY",
                        help="also score each fused model with this modality withheld at test time")
    parser.add_argument("--test-data", nargs="*", default=[], metavar="KEY=VALUE",
                        help="score every run on the test split of its data config changed so "
                             "(keys inside it, e.g. path.seed=1 path.scenes=100: a larger unseen world)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.sweep_dir, args.out, args.missing, args.test_data)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report["markdown"])
    print(f"written to {report['out_dir']}", file=sys.stderr)
    return 0 if report["finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
