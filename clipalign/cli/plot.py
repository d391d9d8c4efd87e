"""clipalign plot: a PNG of a run's training curves."""
from __future__ import annotations

import json

from clipalign.cli.common import CliError, existing_path, parser


def build_parser():
    p = parser("plot", "Draw a run's training curves from its metrics.jsonl: each loss, the temperature, "
               "the MLM accuracy and samples/s against step, as one PNG.")
    p.add_argument("run", help="run folder (holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/curves.png)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from clipalign.formats.folders import RunFolder

    run = existing_path(args.run, "run folder")
    metrics = RunFolder(run).metrics
    if not metrics.is_file():
        raise CliError(f"no {metrics.name} in {run}")
    try:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise CliError(f"{metrics}: not JSON lines ({err})") from None
    if not records:
        raise CliError(f"{metrics} is empty: train for at least --log-every steps first")
    from clipalign.plots import training_curves_png

    path = training_curves_png(records, args.out or run / "curves.png", title=run.name)
    print(path)
    return 0
