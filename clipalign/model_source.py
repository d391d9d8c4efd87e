"""Where an inference model comes from, and the one function that loads it for every command.

A ``ModelSource`` is one of:

- a clipalign checkpoint file or run folder (``checkpoint``), which is also what the model copy
  of an embeddings or index folder is;
- open_clip weights: ``model`` (an architecture name from ``clipalign.list_models()``, or an
  open_clip model config JSON) plus ``pretrained`` (a state dict or checkpoint file);
- a local Hugging Face ``CLIPModel`` folder (``pretrained``), with or without ``model``: without
  it, the open_clip config is derived from the folder's ``config.json`` and registered under a
  name made from its digest (``hf-clip-<12 hex>``), the same name in every process.

Nothing is downloaded: a download tag (``openai``, ``hf-hub:...``) is refused naming the
open_clip call that fetches it. Files are read without running code (``clipalign.factory``
loads open_clip files with ``weights_only=True`` and HF folders as safetensors;
``clipalign.checkpoint`` reads checkpoints). A registered config travels in the model copy
(``carried_state``), so a later process rebuilds the same model from the copy alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch and open_clip are imported only to build a model
    from clipalign.model import ClipAlign

CHECKPOINT, OPEN_CLIP, HF = "checkpoint", "open_clip", "hf"  # the kinds of source
HF_NAME_PREFIX = "hf-clip-"
MAX_CONFIG_BYTES = 1 << 20  # of a model config JSON (or an HF config.json) read before parsing
_SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip names that fetch a config (and weights) from elsewhere
# A config entry with which open_clip would download an image tower's weights at build time (a
# text tower's Hugging Face folder and tokenizer are clipalign.factory's: local folders only).
_FETCHING = ("vision_cfg", "timm_model_pretrained")
_LOCAL_ONLY = "pretrained weights must be a local file or Hugging Face CLIPModel folder"  # as clipalign.factory says


class ModelSourceError(ValueError):
    """A model source that cannot be used: one line saying why."""


def _open_clip_call(model: str | None, pretrained: str) -> str:
    if pretrained.startswith("hf-hub:"):
        return f"open_clip.create_model_and_transforms({pretrained!r})"
    return f"open_clip.create_model_and_transforms({model or 'ViT-B-32'!r}, pretrained={pretrained!r})"


def _download_refusal(model: str | None, tag: str) -> ModelSourceError:
    return ModelSourceError(
        f"{tag!r} is a download tag, and clipalign downloads nothing ({_LOCAL_ONLY}): pass a local file or folder; "
        f"where you have a network, {_open_clip_call(model, tag)} downloads it into the Hugging Face cache, "
        "whose file you can then pass")


def _is_download_tag(text: str) -> bool:
    """``hf-hub:...``, or a bare word (``openai``, ``laion2b_s34b_b79k``) that names no local file."""
    if text.startswith(_SCHEMAS):
        return True
    return not Path(text).exists() and os.sep not in text and "/" not in text and not Path(text).suffix


@dataclass(frozen=True)
class ModelSource:
    """A model to load for inference: exactly one of ``checkpoint`` or ``pretrained``.

    Attributes:
        checkpoint: a clipalign checkpoint file or run folder (its latest checkpoint).
        model: with ``pretrained``: an open_clip architecture name or model config JSON file;
            optional for a Hugging Face folder (its config is derived then).
        pretrained: an open_clip state dict or checkpoint file, or a Hugging Face ``CLIPModel`` folder.

    Raises:
        ModelSourceError: at construction, for a combination that names no one model, or a
            download tag instead of a local file.
    """

    checkpoint: str | None = None
    model: str | None = None
    pretrained: str | None = None

    def __post_init__(self) -> None:
        for field in ("checkpoint", "model", "pretrained"):
            value = getattr(self, field)
            object.__setattr__(self, field, None if value is None else os.fspath(value))
        if self.checkpoint is not None and (self.model is not None or self.pretrained is not None):
            raise ModelSourceError("give a checkpoint (or run folder), or pretrained weights with their model, not both")
        if self.checkpoint is None and self.pretrained is None:
            if self.model is not None:
                raise ModelSourceError(f"model {self.model!r} needs its pretrained weights: a local open_clip "
                                       "state dict or checkpoint file")
            raise ModelSourceError("no model: give a checkpoint (or run folder), or pretrained weights (a local "
                                   "open_clip file with its model name, or a Hugging Face CLIPModel folder)")
        if self.model is not None and self.model.startswith(_SCHEMAS):
            raise _download_refusal(None, self.model)
        if self.pretrained is not None and _is_download_tag(self.pretrained):
            raise _download_refusal(self.model, self.pretrained)

    @classmethod
    def of(cls, source: ModelSource | str | os.PathLike) -> ModelSource:
        """``source`` itself, or a checkpoint path as a source."""
        return source if isinstance(source, ModelSource) else cls(checkpoint=os.fspath(source))

    @property
    def kind(self) -> str:
        """``CHECKPOINT``, ``OPEN_CLIP`` (a weights file) or ``HF`` (a Hugging Face folder)."""
        if self.checkpoint is not None:
            return CHECKPOINT
        from clipalign.factory import is_hf_folder

        return HF if is_hf_folder(self.pretrained) else OPEN_CLIP


# -- the registry ------------------------------------------------------------------------------
def config_digest(cfg: Mapping[str, Any]) -> str:
    """First 12 hex digits of the sha256 of the config's canonical JSON."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def check_config(cfg: Any, where: str) -> dict[str, Any]:
    """``cfg`` if it is an open_clip model config whose image tower builds without a download,
    else ``ModelSourceError`` naming ``where``."""
    if not isinstance(cfg, Mapping) or not all(isinstance(cfg.get(k), Mapping) for k in ("vision_cfg", "text_cfg")) \
            or not isinstance(cfg.get("embed_dim"), int):
        raise ModelSourceError(f"{where}: not an open_clip model config (embed_dim, vision_cfg and text_cfg)")
    tower, key = _FETCHING
    if cfg[tower].get(key):
        raise ModelSourceError(f"{where}: its {tower}.{key}={cfg[tower][key]!r} would be downloaded when the model "
                               "is built, and clipalign downloads nothing")
    return dict(cfg)


def register_config(name: str, cfg: Mapping[str, Any], where: str) -> str:
    """Register the config ``cfg`` (a model copy's, or one derived from a Hugging Face folder) as
    ``name`` (``clipalign.factory.add_model_config``); a no-op when ``name`` already is this config.

    Raises:
        ModelSourceError: ``name`` is registered with another config, or is no plain name.
    """
    from clipalign.factory import add_model_config, get_model_config

    cfg = check_config(cfg, where)
    if not name or name.startswith(".") or any(c in name for c in "/\\:") or name != name.strip():
        raise ModelSourceError(f"{where}: {name!r} cannot name a model")
    try:
        known = get_model_config(name)
    except ValueError:
        known = None
    if known is not None:
        if known != cfg:
            raise ModelSourceError(f"{where}: its config for model {name!r} differs from the registered {name!r}")
        return name
    with tempfile.TemporaryDirectory(prefix="clipalign-config-") as tmp:
        path = Path(tmp) / f"{name}.json"  # a config is named after its file
        path.write_text(json.dumps(cfg))
        add_model_config(path)  # open_clip keeps what it has read: the file is no longer needed
    return name


def _read_json(path: Path, what: str) -> Any:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelSourceError(f"{path}: too large for {what} ({path.stat().st_size} bytes)")
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelSourceError(f"{path}: not {what} ({err})") from None


def hf_folder_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The open_clip config of the Hugging Face ``CLIPModel`` in ``folder`` (``hf_convert.open_clip_config``).

    Raises:
        ModelSourceError: not a CLIP folder; ``UnsupportedArchitecture``: a setting open_clip lacks.
    """
    from transformers import CLIPConfig

    from clipalign.hf_convert import open_clip_config

    folder = Path(folder)
    raw = _read_json(folder / "config.json", "a Hugging Face config")
    kind = raw.get("model_type") if isinstance(raw, Mapping) else None
    if kind != "clip":
        raise ModelSourceError(f"{folder}: not a Hugging Face CLIPModel folder (model_type {kind!r}); "
                               "only CLIP converts to open_clip")
    return open_clip_config(CLIPConfig.from_dict(raw))


def _architecture(source: ModelSource) -> tuple[str, dict[str, Any] | None]:
    """The registered name of ``source``'s architecture, and its config when this module registered it."""
    from clipalign.factory import add_model_config, get_model_config

    if source.model is None:  # a Hugging Face folder (ModelSource checked that one of them is given)
        if source.kind != HF:
            raise ModelSourceError(f"{source.pretrained}: open_clip weights do not name their architecture: "
                                   "give the model name (or config JSON) they are for")
        cfg = hf_folder_config(source.pretrained)
        name = HF_NAME_PREFIX + config_digest(cfg)
        return register_config(name, cfg, source.pretrained), cfg
    path = Path(source.model)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path}")
        check_config(_read_json(path, "an open_clip model config"), str(path))
        name = add_model_config(path)[0]  # ValueError: its name is another config's
        return name, get_model_config(name)  # its relative paths made absolute: the config travels
    try:
        cfg = get_model_config(source.model)
    except ValueError:
        raise ModelSourceError(f"unknown model {source.model!r}: give an open_clip architecture name "
                               "(clipalign.list_models()) or a model config JSON file") from None
    check_config(cfg, source.model)
    return source.model, None


def _pretrained_files(source: ModelSource) -> list[str]:
    """The files pretrained weights are read from (recorded, with their digests, by the folders
    made with them)."""
    root = Path(source.pretrained).resolve()
    files = [root / "config.json", *sorted(root.glob("*.safetensors"))] if root.is_dir() else [root]
    if source.model is not None and Path(source.model).is_file():
        files.insert(0, Path(source.model).resolve())
    return [str(f) for f in files]


# -- loading -----------------------------------------------------------------------------------
def _load_checkpoint_source(path: str) -> tuple[ClipAlign, Callable, Callable, dict[str, Any]]:
    from clipalign.checkpoint import CheckpointError, build_model, load_checkpoint, resolve_checkpoint

    resolved = resolve_checkpoint(path)
    state = load_checkpoint(resolved)
    if "model_config" in state:  # a model copy of pretrained weights: its architecture travels with it
        try:
            register_config(state["model_name"], state["model_config"], str(resolved))
        except ModelSourceError as err:
            raise CheckpointError(resolved, str(err).removeprefix(f"{resolved}: ")) from None
    return build_model(resolved, state)


def _load_pretrained(source: ModelSource) -> tuple[ClipAlign, Callable, Callable, dict[str, Any]]:
    from clipalign.factory import create_model_and_transforms, get_tokenizer

    if not Path(source.pretrained).exists():
        raise FileNotFoundError(f"{_LOCAL_ONLY}: {source.pretrained} (not found)")
    name, registered = _architecture(source)
    # inference only: no masked-token head, whose random weights would also change the identity
    model, _, eval_tf = create_model_and_transforms(name, mlm_head=False, pretrained=source.pretrained)
    model.eval()
    meta: dict[str, Any] = {"model_name": name, "step": None, "path": str(Path(source.pretrained).resolve())}
    if registered is not None:
        meta["model_config"] = registered
    return model, eval_tf, get_tokenizer(name), meta


def load_model_source(source: ModelSource | str | os.PathLike) -> tuple[ClipAlign, Callable, Callable, dict[str, Any]]:
    """Build the model of ``source`` for inference (a path is a checkpoint or run folder).

    Returns:
        ``(model in eval mode, eval image transform, tokenizer, meta)``; ``meta`` holds
        ``model_name``, ``path`` (the file or folder read), ``step`` (None for pretrained
        weights), ``source`` (``{"kind", "model", "pretrained" or "checkpoint", "files"}``: what
        a folder made with the model records) and, for an architecture registered from a
        config JSON or HF folder, ``model_config``.

    Raises:
        ModelSourceError, CheckpointError (both ValueError), ValueError: a source that does not
            load, in one line naming the file; FileNotFoundError: a missing file.
    """
    source = ModelSource.of(source)
    if source.kind == CHECKPOINT:
        model, transform, tokenizer, meta = _load_checkpoint_source(source.checkpoint)
        record = {"kind": CHECKPOINT, "model": meta["model_name"], "checkpoint": meta["path"], "files": [meta["path"]]}
    else:
        model, transform, tokenizer, meta = _load_pretrained(source)
        record = {"kind": source.kind, "model": source.model or meta["model_name"], "pretrained": meta["path"],
                  "files": _pretrained_files(source)}
    meta["source"] = record
    return model, transform, tokenizer, meta


def carried_state(model: ClipAlign, meta: Mapping[str, Any], identity: Mapping[str, str]) -> dict[str, Any]:
    """What a folder's model copy holds (saved with ``clipalign.checkpoint.save_checkpoint``):
    the weights, their name and identity, where they came from, and a registered architecture's
    config; tensors and plain types only, so the copy loads with ``weights_only=True``."""
    state = {"model_name": meta["model_name"], "step": meta.get("step"), "model_identity": dict(identity),
             "source_checkpoint": meta["path"], "model": model.state_dict()}
    if meta.get("model_config") is not None:
        state["model_config"] = dict(meta["model_config"])
    return state
