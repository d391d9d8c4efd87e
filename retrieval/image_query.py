"""A fast path for image queries: the image tower as ONNX, run by onnxruntime, and the model's
eval transform in PIL and numpy, so an image search imports neither torch nor open_clip (on the
AVX2 EPYC, ~6.5 s of an 11 s cold start: torch, torchvision's models, open_clip).

``export_image_query`` writes the tower at index time with the one ONNX exporter
(``clipalign.export_onnx.export_tower``) and keeps it only when ``Preprocess`` reproduces the
model's transform bit for bit on sample images (open_clip's eval transform: resize, centre
crop, RGB, [0, 1], normalise; any other transform has no fast path) and onnxruntime reproduces
the model within ``TOLERANCE``. The folder's info records the preprocessing, the identity of
the model and the file's sha256, all checked before it answers a query (``retrieval.engine``).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from clipalign.formats.folders import IndexFolder
from retrieval.query_encoder import keep_if_reproduced, onnx_session

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")  # torchvision's names of PIL's filters
MAX_SIDE = 4096  # the largest resize or crop an info may ask for


@dataclass(frozen=True)
class Preprocess:
    """open_clip's eval transform without torch: PIL image → (3, H, W) float32.

    ``resize``: the short side's new length, or (h, w) to squash to; ``crop``: (h, w) of the
    centre crop; ``mean``, ``std``: per channel, after scaling to [0, 1]. torchvision's own
    arithmetic throughout (its output size, its crop offsets, float32 ``/ 255``, ``(x - m) / s``).
    """

    resize: int | tuple[int, int]
    crop: tuple[int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Any) -> np.ndarray:
        from PIL import Image

        image = image.convert("RGB")
        width, height = image.size
        if isinstance(self.resize, int):  # torchvision's _compute_resized_output_size, one size
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.resize, int(self.resize * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        else:
            new_h, new_w = self.resize
        if (new_w, new_h) != (width, height):
            filters = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                       "lanczos": Image.LANCZOS}
            image = image.resize((new_w, new_h), filters[self.interpolation])
        crop_h, crop_w = self.crop
        if (crop_w, crop_h) != (new_w, new_h):
            top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
            image = image.crop((left, top, left + crop_w, top + crop_h))
        pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        return (pixels - mean) / std

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, entry: Any) -> "Preprocess":
        """The ``preprocess`` entry of an info, every field checked.

        Raises:
            ValueError: a missing or malformed field (an info is never trusted).
        """
        if not isinstance(entry, dict) or set(entry) != {"resize", "crop", "interpolation", "mean", "std"}:
            raise ValueError("an image_query's preprocess must have resize, crop, interpolation, mean and std")
        resize = entry["resize"]
        resize = _side(resize) if not isinstance(resize, list) else tuple(_sides(resize, 2))
        crop = tuple(_sides(entry["crop"], 2))
        if entry["interpolation"] not in INTERPOLATIONS:
            raise ValueError(f"an image_query's interpolation must be one of {INTERPOLATIONS}")
        mean, std = (tuple(_floats(entry[k], 3)) for k in ("mean", "std"))
        if not all(s > 0 for s in std):
            raise ValueError("an image_query's std must be positive")
        made = cls(resize, crop, entry["interpolation"], mean, std)
        if any(c > r for c, r in zip(crop, made._resized_short())):
            raise ValueError("an image_query's crop must fit in its resize")
        return made

    def _resized_short(self) -> tuple[int, int]:
        """The smallest (h, w) a resized image can have."""
        return (self.resize, self.resize) if isinstance(self.resize, int) else self.resize


def _side(value: Any) -> int:
    if type(value) is not int or not 1 <= value <= MAX_SIDE:
        raise ValueError(f"an image_query's sizes must be integers in 1..{MAX_SIDE}")
    return value


def _sides(value: Any, n: int) -> list[int]:
    if not isinstance(value, list) or len(value) != n:
        raise ValueError(f"an image_query's sizes must be lists of {n} integers")
    return [_side(v) for v in value]


def _floats(value: Any, n: int) -> list[float]:
    if (not isinstance(value, list) or len(value) != n
            or not all(type(v) in (int, float) and np.isfinite(v) for v in value)):
        raise ValueError(f"an image_query's mean and std must be lists of {n} numbers")
    return [float(v) for v in value]


def preprocess_of(transform: Any) -> Preprocess | None:
    """``transform`` as a ``Preprocess``, where it is open_clip's eval transform (torchvision's
    ``Resize``, a ``CenterCrop`` unless it squashes, an RGB conversion, ``ToTensor``,
    ``Normalize``); else None (its keep-ratio resize of non-square sizes, say)."""
    steps = list(getattr(transform, "transforms", ()))
    names = [type(s).__name__ for s in steps]
    tail = ["MaybeConvertMode", "MaybeToTensor", "Normalize"]
    if names not in (["Resize", "CenterCrop", *tail], ["Resize", *tail]):
        return None
    resize, convert, normalize = steps[0], steps[-3], steps[-1]
    if resize.max_size is not None or getattr(convert, "mode", None) != "RGB" or not resize.antialias:
        return None
    size = resize.size if isinstance(resize.size, int) else list(resize.size)
    if isinstance(size, list) and len(size) == 1:
        size = size[0]
    if len(steps) == 4 and not isinstance(size, list):  # a short-side resize without a crop: sizes vary
        return None
    crop = list(steps[1].size) if len(steps) == 5 else size
    try:
        return Preprocess.from_json({"resize": size, "crop": crop, "interpolation": resize.interpolation.value,
                                     "mean": list(normalize.mean), "std": list(normalize.std)})
    except ValueError:
        return None


def _sample_images() -> list[Any]:
    """Images of the shapes and modes queries come in: wide, tall, tiny, square, grey, with alpha, a palette."""
    from PIL import Image

    rng = np.random.default_rng(0)
    shapes = [(91, 37), (13, 200), (3, 5), (64, 64), (300, 301), (257, 128)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in shapes]
    return images + [images[0].convert("L"), images[1].convert("RGBA"), images[4].convert("P")]


@dataclass(frozen=True)
class ImageQuery:
    """The fast image path: ``preprocess`` (PIL image → (3, H, W)) and the tower's ``session``;
    called, PIL images → (Q, D) float32 features. The engine preprocesses outside its model
    lock and holds it for ``run`` only, as it does for the torch transform."""

    preprocess: Preprocess
    session: Any

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(Q, 3, H, W) preprocessed pixels → (Q, D) features."""
        name = self.session.get_inputs()[0].name  # the exporter's; read from the graph, not restated
        return np.asarray(self.session.run(None, {name: batch})[0], dtype=np.float32)

    def __call__(self, images: list[Any]) -> np.ndarray:
        return self.run(np.stack([self.preprocess(im) for im in images]))


def export_image_query(model: Any, transform: Callable, folder: str | os.PathLike,
                       identity: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Write ``model.encode_image(·, normalize=True)`` as ONNX into the index folder ``folder``.

    Args:
        transform: the model's eval transform, which queries go through on the full model path.
        identity: the model's identity (``retrieval.identity.model_identity``), recorded with the tower.

    Returns:
        The ``image_query`` entry of the folder's info, or None (no fast path for this model).
    """
    try:
        import torch

        preprocess = preprocess_of(transform)
        if preprocess is None:
            return None
        images = _sample_images()
        pixels = [transform(im.convert("RGB")) for im in images]  # as the full model path does
        if not all(np.array_equal(preprocess(im), want.numpy()) for im, want in zip(images, pixels)):
            return None

        def reference(batch: list[Any]) -> torch.Tensor:
            return model.encode_image(torch.stack([transform(im.convert("RGB")) for im in batch]), normalize=True)

        path = IndexFolder(folder).image_query
        if not keep_if_reproduced(model, "image", torch.stack(pixels[:2]), path,
                                  lambda data: ImageQuery(preprocess, onnx_session(data)), reference,
                                  (images[:1], images)):
            return None
    except Exception:  # any failure means: no fast path, never a wrong one
        return None
    entry = {"file": path.name, "preprocess": preprocess.to_json()}
    return entry | ({"model_identity": dict(identity)} if identity else {})


def load_image_query(info: dict[str, Any], data: bytes) -> ImageQuery:
    """``PIL images -> (Q, D)`` normalised features from the tower ``export_image_query`` wrote.

    ``info`` is the folder's ``image_query`` entry; ``data`` the tower's bytes, read and checked.

    Raises:
        ValueError: a malformed ``preprocess``; ImportError: no onnxruntime.
    """
    return ImageQuery(Preprocess.from_json(info.get("preprocess")), onnx_session(data))
