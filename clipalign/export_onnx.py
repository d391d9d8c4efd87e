"""Export a run's dual encoder to ONNX: ``image.onnx`` and ``text.onnx`` with a dynamic batch,
each checked with onnxruntime against torch on the same inputs before the folder is kept.

``export_tower`` is the one exporter: ``export_onnx`` writes both towers with it, and an index
build writes its text tower with it (``retrieval.query_encoder``)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipalign.formats.atomic import write_json
from clipalign.model_source import ModelSource, load_model_source

OPSET = 18
TOLERANCE = 1e-4  # max abs difference of the L2-normalised features, fp32
INPUTS = {"image": "pixel_values", "text": "input_ids"}  # each graph's input name; its output is "features"


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Silence the exporter's progress and optimizer notes for the duration."""
    previous = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in previous:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in previous:
            logger.setLevel(level)


class _Tower(nn.Module):
    """One tower's ``encode_*(·, normalize=True)`` as a module to trace."""

    def __init__(self, model: nn.Module, image: bool):
        super().__init__()
        self.model, self.image = model, image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, normalize=True) if self.image else self.model.clip.encode_text(x, normalize=True)


def export_tower(model: nn.Module, tower: str, example: torch.Tensor, path: str | Path, *,
                 optimize: bool = True) -> None:
    """Write ``model``'s ``tower`` (``"image"`` or ``"text"``) as an ONNX graph at ``path``.

    The graph maps ``INPUTS[tower]`` (batch, ...) to ``features`` (batch, D), the L2-normalised
    ``encode_*`` output, with the batch dimension dynamic; ``example`` is a batch it is traced
    on. ``optimize``: run the exporter's graph optimizer (onnxruntime optimizes the graph again
    when it loads it). Checking it against torch is the caller's.
    """
    name = INPUTS[tower]
    # torch.export's exporter: the TorchScript one gets a ResNet tower's attention pool wrong
    # (0.3 off); this one matches to 1e-7 and keeps the batch dimension dynamic.
    with warnings.catch_warnings(), torch.no_grad(), _quiet("onnxscript", "torch.onnx"), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(_Tower(model, tower == "image"), (example,), str(path), input_names=[name],
                          output_names=["features"], dynamic_axes={name: {0: "batch"}, "features": {0: "batch"}},
                          opset_version=OPSET, dynamo=True, external_data=False, optimize=optimize)


def export_onnx(checkpoint: ModelSource | str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write ``out_dir/image.onnx``, ``text.onnx`` and ``onnx.json`` (opset, inputs, preprocessing,
    the measured differences from torch).

    ``image.onnx``: ``pixel_values`` (batch, 3, S, S) float32, normalised as the run's eval
    transform does → ``features`` (batch, D). ``text.onnx``: ``input_ids`` (batch, L) int64
    from the run's tokenizer → ``features`` (batch, D).

    Raises:
        ValueError: onnxruntime disagrees with torch by more than ``TOLERANCE``.
    """
    import onnxruntime

    model, _, tokenizer, meta = load_model_source(checkpoint)
    model = model.float().eval()
    size = model.image_size
    samples = {"image": torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0)),
               "text": tokenizer(["a red circle", "a photo of a blue star on the left", "x"])}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"model_name": meta["model_name"], "step": meta.get("step"), "checkpoint": meta["path"],
                            "opset": OPSET, "image_size": size, "context_length": int(samples["text"].shape[1]),
                            "image_mean": list(getattr(model.clip.visual, "image_mean", None) or ()),
                            "image_std": list(getattr(model.clip.visual, "image_std", None) or ()), "towers": {}}
    for tower, x in samples.items():
        path = out / f"{tower}.onnx"
        export_tower(model, tower, x[:2], path)
        with torch.no_grad():
            expected = _Tower(model, tower == "image")(x).numpy()
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {INPUTS[tower]: x.numpy()})[0]  # a batch of 3 through a graph traced on 2
        diff = float(abs(got - expected).max())
        if diff > TOLERANCE:
            path.unlink()
            raise ValueError(f"{path}: onnxruntime differs from torch by {diff:.2e} (> {TOLERANCE})")
        info["towers"][tower] = {"file": path.name, "input": INPUTS[tower], "shape": ["batch", *x.shape[1:]],
                                 "dtype": str(x.dtype).replace("torch.", ""), "max_abs_diff": diff}
    write_json(out / "onnx.json", info)
    return {"name": meta["model_name"], "folder": str(out), "weights": str(out / "image.onnx"),
            "model_name": meta["model_name"], "step": meta.get("step"), "checkpoint": meta["path"],
            "info": json.loads((out / "onnx.json").read_text())}
