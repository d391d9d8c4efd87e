"""Run CLIP_benchmark on a ``clipalign export`` folder.

CLIP_benchmark only knows the models in open_clip's registry, so this registers the export's
config folder first and then hands the remaining arguments to CLIP_benchmark's own CLI:

    python scripts/clip_benchmark_eval.py EXPORT_DIR eval \\
        --model ca-nano --pretrained EXPORT_DIR/ca-nano.pt \\
        --dataset wds/shape_seen --dataset_root corpus/eval/shape_seen \\
        --no_amp --num_workers 0 --output results.json

For a ``wds/`` retrieval set add ``--task zeroshot_retrieval --recall_k 1 5 10``: CLIP_benchmark
infers the task from the dataset name, and a ``wds/`` name always reads as classification.
This script never imports clipalign, so the model config really comes from EXPORT_DIR.
"""
from __future__ import annotations

import sys
from pathlib import Path


def _patch_accuracy_for_numpy_2_4() -> None:
    """Mend CLIP_benchmark 1.6.2's ``accuracy`` where NumPy >= 2.4 breaks it, keeping its definition.

    It calls ``float()`` on a 1-element 1-d array, which NumPy 2.4 turned into a TypeError
    (LAION-AI/CLIP_benchmark#147). The replacement is the same code with a 0-d sum; the original
    is kept wherever it still runs.
    """
    import torch
    from clip_benchmark.metrics import zeroshot_classification as zc

    original = zc.accuracy
    try:
        original(torch.eye(2), torch.arange(2), topk=(1,))
        return
    except TypeError:
        pass

    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        n = len(target)
        return [float(correct[:k].reshape(-1).float().sum().cpu().numpy()) / n for k in topk]

    zc.accuracy = accuracy


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    config_dir, rest = Path(argv[0]), argv[1:]
    if not config_dir.is_dir():
        print(f"clip_benchmark_eval: error: export folder not found: {config_dir}", file=sys.stderr)
        return 2

    import open_clip
    from clip_benchmark.cli import main as clip_benchmark_main

    open_clip.add_model_config(config_dir)
    _patch_accuracy_for_numpy_2_4()
    sys.argv = ["clip_benchmark", *rest]  # CLIP_benchmark's parser reads sys.argv itself
    return int(clip_benchmark_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
