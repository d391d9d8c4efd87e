"""The eval report: what ``clipalign eval`` writes, one JSON file over several evaluation sets.

Its layout, owned here::

    {"checkpoint": <model path>, "model": <name>, "step": <step or null>,
     "results": {<set name>: {"dataset", "model", "pretrained", "language", <evaluate()'s keys>, "path",
                              "confusion_png" (with a plot folder, classification sets)}}}

Each result carries CLIP_benchmark's result-file keys (``dataset`` is ``wds/<name>`` for a
``wds/`` set; a linear probe's metrics are also under ``lp_<metric>``), so the two tools'
numbers can be read side by side.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from clipalign.evaluate import EvalSet, evaluate, probe_train_split
from clipalign.formats import evalset as evalset_layout
from clipalign.formats.atomic import write_json
from clipalign.model import ClipAlign

PLOT_SUFFIX = "_confusion.png"


def set_names(sets: Sequence[EvalSet]) -> list[str]:
    """Each set's folder name, prefixed by its parent's where two sets share one (a/val, b/val)."""
    names = [s.name for s in sets]
    return [f"{s.root.parent.name}/{s.name}" if names.count(s.name) > 1 else s.name for s in sets]


def eval_report(
    model: ClipAlign, tokenizer: Callable, transform: Callable, meta: dict[str, Any], sets: Sequence[EvalSet], *,
    out: str | os.PathLike | None = None, plot_dir: str | os.PathLike | None = None, batch_size: int = 256,
    precision: str = "fp32", ks: Sequence[int] = (1, 5, 10), linear_probe: bool = False,
    progress: Callable[[str], Callable[..., Any] | None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on every set; write the report to ``out`` and confusion plots to ``plot_dir``.

    Args:
        meta: where the model came from (``load_model_source``'s: ``path``, ``model_name``, ``step``).
        ks: the k values of retrieval recall@k.
        linear_probe: also fit a probe on each classification set's ``train/`` split, where it has one.
        progress: given a set's name, the progress factory for ``evaluate`` (``None``: none).

    Returns:
        The report (as written to ``out``).

    Raises:
        ValueError: a set that cannot be evaluated (e.g. no readable image).
    """
    results: dict[str, dict[str, Any]] = {}
    for name, s in zip(set_names(sets), sets):
        options: dict[str, Any] = {"ks": tuple(ks)} if s.task == evalset_layout.RETRIEVAL else {}
        if linear_probe and (train := probe_train_split(s)) is not None:
            options["probe_train"] = train
        result = evaluate(model, tokenizer, transform, s, batch_size=batch_size, precision=precision,
                          progress=progress(name) if progress else None, **options)
        if "linear_probe" in result:  # CLIP_benchmark's linear-probe metric names
            result["metrics"].update({f"lp_{k}": v for k, v in result["linear_probe"]["metrics"].items()})
        dataset = f"wds/{s.name}" if s.items is None else s.name  # CLIP_benchmark's result-file keys
        results[name] = {"dataset": dataset, "model": meta["model_name"], "pretrained": meta["path"],
                         "language": "en", **result, "path": str(s.root)}
    report = {"checkpoint": meta["path"], "model": meta["model_name"], "step": meta.get("step"), "results": results}
    if out is not None:
        write_json(out, report)  # before any plot: a failed figure never costs the numbers
    if plot_dir is not None:
        from clipalign.plots import confusion_matrix_png

        for name, r in results.items():
            if "confusion_matrix" in r:
                r["confusion_png"] = str(confusion_matrix_png(r["confusion_matrix"], r["classnames"],
                                                              Path(plot_dir) / f"{name}{PLOT_SUFFIX}", title=name))
        if out is not None:
            write_json(out, report)
    return report


def report_table(report: dict[str, Any]) -> str:
    """One line per set: its metrics, then chance for classification."""
    results = report["results"]
    rows = []
    width = max(map(len, results)) if results else 0
    for name, r in results.items():
        m = r["metrics"]
        if "mean_average_precision" in m:
            cells = f"mAP {m['mean_average_precision']:6.1%}  (multi-label, n={r['n']})"
        elif r["task"] == "zeroshot_classification":
            acc5 = "   n/a" if math.isnan(m["acc5"]) else f"{m['acc5']:6.1%}"
            cells = f"acc@1 {m['acc1']:6.1%}  acc@5 {acc5}  mean/class {m['mean_per_class_recall']:6.1%}" \
                    f"  (chance {r['chance_acc1']:.1%}, n={r['n']})"
            if "linear_probe" in r:
                cells += f"  linear probe acc@1 {r['linear_probe']['metrics']['acc1']:6.1%}"
        else:
            ks = [int(k.rsplit("@", 1)[1]) for k in m if k.startswith("image_retrieval_recall@")]
            cells = "  ".join(
                f"{d}@{k} {m[f'{key}_retrieval_recall@{k}']:6.1%}"
                for key, d in (("image", "t2i"), ("text", "i2t")) for k in ks
            ) + f"  (n={r['n']})"
        skipped = f"  skipped {sum(r['skipped'].values())}" if r["skipped"] else ""
        rows.append(f"{name:<{width}}  {cells}{skipped}")
    return "\n".join(rows)
