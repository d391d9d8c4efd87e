"""Export a run's model for plain open_clip: a model config JSON plus a safetensors state dict.

The exported folder is self-contained for open_clip users::

    open_clip.add_model_config(out_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=f"{out_dir}/{name}.safetensors")

Only the open_clip model is written (the ``clip.`` prefix stripped): no MLM head, optimizer,
scheduler or RNG state.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from clipalign.formats.atomic import replace_file, write_json
from clipalign.model_source import ModelSource, load_model_source

# A name becomes a file name and an open_clip registry key: no path separators, and not
# open_clip's "hf-hub:" / "local-dir:" schemas.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust writer reports the OS's errno


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"invalid export name {name!r}: use letters, digits and . _ + - only")


def _safetensors_writes(path: str | os.PathLike, write: Callable[[], None]) -> None:
    """Run ``write()``; a ``SafetensorError`` of the system's (a read-only folder, a full disk:
    safetensors gives the errno in its text only) becomes that ``OSError``, naming ``path``.

    Raises:
        OSError: an I/O error, naming ``path``.
        ValueError: any other refusal of safetensors', naming ``path``.
    """
    try:
        write()
    except SafetensorError as err:
        found = _OS_ERROR.search(str(err))
        if found is None:
            raise ValueError(f"{path}: {err}") from None
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def save_safetensors(path: str | os.PathLike, state: dict[str, torch.Tensor]) -> Path:
    """Write ``state`` (name -> tensor) to ``path`` as safetensors, atomically.

    Raises:
        OSError: the write failed (read-only folder, full disk, ...), naming ``path``; no
            temporary file is left behind.
    """
    tensors = {k: v.contiguous() for k, v in state.items()}
    return replace_file(path, lambda tmp: _safetensors_writes(tmp, lambda: save_file(tensors, str(tmp))))


def export_open_clip(checkpoint: ModelSource | str | Path, out_dir: str | Path, name: str | None = None
                     ) -> dict[str, Any]:
    """Write ``out_dir/<name>.json`` (open_clip model config) and ``out_dir/<name>.safetensors`` (state dict).

    Args:
        checkpoint: a checkpoint file or run folder (its latest checkpoint), or a ``ModelSource``
            (pretrained weights: a Hugging Face folder is converted to open_clip's form).
        out_dir: folder to write into (created if missing).
        name: model name under which open_clip will know the export; defaults to the run's
            model name.

    Returns:
        ``{"name", "config", "weights", "model_name", "step", "checkpoint"}``: the export's
        name, the two written paths, and where the weights came from.

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint``.
        ValueError: an invalid ``name``, or a model name no longer registered.
        OSError: a file could not be written (read-only folder, full disk, ...), naming it.
    """
    from clipalign.factory import get_model_config

    if name is not None:
        _check_name(name)
    # the model is rebuilt from the registered config and loads the weights strictly, so a
    # config that no longer matches the checkpoint fails here, not in the user's hands.
    model, _, _, meta = load_model_source(checkpoint)
    name = name or meta["model_name"]
    _check_name(name)
    config = get_model_config(meta["model_name"])
    state = {k: v.detach().clone() for k, v in model.clip.state_dict().items()}
    if "logit_bias" in state:  # a SigLIP-trained model: open_clip builds the bias only when told to
        config = {**config, "init_logit_bias": float(state["logit_bias"])}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path, weights_path = out / f"{name}.json", out / f"{name}.safetensors"
    # safetensors: tensors and nothing else, readable by any tool without unpickling
    save_safetensors(weights_path, state)
    write_json(config_path, config)
    return {
        "name": name,
        "config": str(config_path),
        "weights": str(weights_path),
        "model_name": meta["model_name"],
        "step": meta.get("step"),
        "checkpoint": meta["path"],
    }


def export_hf(checkpoint: ModelSource | str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write a run's model as a Hugging Face ``transformers.CLIPModel`` folder.

    ``out_dir`` gets ``config.json``, ``model.safetensors``, and tokenizer and image-processor
    files made from the run's own tokenizer and preprocessing, so that
    ``CLIPModel.from_pretrained(out_dir)`` and ``pipeline("zero-shot-image-classification",
    model=out_dir)`` load it with no download. Only the dual encoder is written.

    Raises:
        UnsupportedArchitecture: a part HF's CLIP cannot express (named in the message).
        OSError: the weights could not be written (read-only folder, full disk, ...), naming
            the file.
    """
    import json
    import tempfile

    import open_clip
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from clipalign.factory import get_model_config
    from clipalign.hf_convert import UnsupportedArchitecture, hf_config, open_clip_to_hf

    model, _, tokenizer, meta = load_model_source(checkpoint)
    config = hf_config(get_model_config(meta["model_name"]))
    state = model.clip.state_dict()
    if "logit_bias" in state:
        raise UnsupportedArchitecture("a SigLIP-trained logit bias (Hugging Face's CLIPModel has none)")
    if type(tokenizer).__name__ != "SimpleTokenizer":
        raise UnsupportedArchitecture(f"the tokenizer {type(tokenizer).__name__} (only open_clip's CLIP BPE converts)")
    hf = CLIPModel(config)
    hf.load_state_dict(open_clip_to_hf({k: v.detach().clone() for k, v in state.items()}))

    visual = model.clip.visual
    size = model.image_size
    images = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,  # bicubic
        image_mean=list(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
        image_std=list(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD))
    specials = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # HF's names, same ids
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab.write_text(json.dumps({specials.get(t, t): i for t, i in tokenizer.encoder.items()}), encoding="utf-8")
        ranked = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
        merges.write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in ranked) + "\n", encoding="utf-8")
        text = CLIPTokenizer(str(vocab), str(merges), model_max_length=tokenizer.context_length)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _safetensors_writes(out / "model.safetensors", lambda: hf.save_pretrained(out, safe_serialization=True))
    CLIPProcessor(image_processor=images, tokenizer=text).save_pretrained(out)
    return {"name": meta["model_name"], "folder": str(out), "weights": str(out / "model.safetensors"),
            "model_name": meta["model_name"], "step": meta.get("step"), "checkpoint": meta["path"]}
