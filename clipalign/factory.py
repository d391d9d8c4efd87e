"""Model registry and factory: the project's JSON configs plus every open_clip architecture.

The configs in ``model_configs/`` use open_clip's schema (``embed_dim``, ``vision_cfg``,
``text_cfg``) and are registered with open_clip, so one name works in both libraries. More
configs (a text tower from a local Hugging Face folder, say) join with ``add_model_config``,
or for every process from the folders and files in ``$CLIPALIGN_MODEL_CONFIGS``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Iterator

import open_clip
import torch
from safetensors import SafetensorError

from clipalign import hf_text
from clipalign.attention import use_fast_attention
from clipalign.model import ClipAlign
from clipalign.torch_files import is_torch_file, refused_objects, unsafe_globals

CONFIG_DIR = Path(__file__).parent / "model_configs"
CONFIG_ENV = "CLIPALIGN_MODEL_CONFIGS"
open_clip.add_model_config(CONFIG_DIR)
_ADDED: dict[str, Path] = {}  # name -> the config file that added it, for its relative paths


def add_model_config(path: str | os.PathLike) -> list[str]:
    """Register a model config file, or every ``*.json`` in a folder, under its file name.

    A config's ``text_cfg.hf_model_name`` / ``hf_tokenizer_name`` may be relative to the
    file's folder.

    Returns:
        The names added.

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: a name that another config already has.
    """
    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"no model config at {path}")
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    taken = set(open_clip.list_models())
    clash = [f.stem for f in files if f.stem in taken and _ADDED.get(f.stem) != f]
    if clash:
        raise ValueError(f"{path}: model name {clash[0]!r} is taken (rename the config file)")
    open_clip.add_model_config(path)
    added = [f.stem for f in files if f.stem in open_clip.list_models()]
    _ADDED.update({f.stem: f for f in files if f.stem in added})
    get_tokenizer.cache_clear()  # a config added again may name another tokenizer
    return added


def list_models() -> list[str]:
    """Names accepted by ``create_model``: the project's configs first, then open_clip's."""
    ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    return ours + [name for name in open_clip.list_models() if name not in ours]


def get_model_config(name: str) -> dict[str, Any]:
    """The open_clip config dict of a registered model name (with the paths of a text tower
    from a local Hugging Face folder made absolute)."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown model {name!r}; see clipalign.list_models()")
    return hf_text.resolve_paths(cfg, _ADDED[name].parent) if name in _ADDED else cfg


@contextlib.contextmanager
def _quiet_random_init(quiet: bool) -> Iterator[None]:
    # open_clip warns "No pretrained weights loaded" on every random init, which is what we asked for.
    previous = logging.root.manager.disable
    if quiet:
        logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _check_pretrained(pretrained: str | None) -> None:
    # open_clip would download a named tag; this project only loads local files.
    if pretrained is not None and not Path(pretrained).is_file() and not is_hf_folder(pretrained):
        raise FileNotFoundError(f"pretrained weights must be a local file or Hugging Face CLIPModel folder: "
                                f"{pretrained}")


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local Hugging Face model folder (its ``config.json``)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_hf_weights(name: str, folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The open_clip state dict of the ``transformers.CLIPModel`` in ``folder``, checked to be of
    ``name``'s architecture (the converted configs must agree; the difference is named).

    Raises:
        ValueError: another architecture, or not a CLIPModel folder.
    """
    from transformers import CLIPConfig, CLIPModel

    from clipalign.hf_convert import hf_config, hf_to_open_clip

    try:
        theirs = CLIPConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: not a Hugging Face CLIPModel folder ({err})") from None
    ours = hf_config(get_model_config(name))
    fields = {"projection_dim": (ours.projection_dim, theirs.projection_dim)}
    for part in ("text_config", "vision_config"):
        a, b = getattr(ours, part).to_dict(), getattr(theirs, part).to_dict()
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
                    "image_size", "patch_size", "max_position_embeddings", "vocab_size"):
            if key in a or key in b:
                fields[f"{part}.{key}"] = (a.get(key), b.get(key))
    differ = [f"{k} {v[1]} (model {name}: {v[0]})" for k, v in fields.items() if v[0] != v[1]]
    if differ:
        raise ValueError(f"{folder} is not a {name}: " + ", ".join(differ[:4]))
    with _quiet_random_init(True):
        model = CLIPModel.from_pretrained(folder, use_safetensors=True)  # never a pickle
    return hf_to_open_clip(model.state_dict())


def _init_caption_decoder(clip: torch.nn.Module) -> None:
    """Give CoCa's decoder projection the values open_clip means it to have.

    open_clip 3.3 allocates ``MultimodalTransformer.text_projection`` with ``torch.empty`` and
    never calls the decoder's ``init_parameters`` (which would fail: it reads a
    ``self.transformer`` the class does not have), so a randomly initialised CoCa model starts
    from whatever the allocator left there, sometimes NaN. This draws it as that method would.
    """
    decoder = getattr(clip, "text_decoder", None)
    if decoder is not None and getattr(decoder, "text_projection", None) is not None:
        with torch.no_grad():
            torch.nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)


_UNFIT = "Error(s) in loading state_dict"  # torch's load_state_dict on missing, unexpected or misshapen weights


def _pretrained_error(pretrained: str, name: str, err: Exception) -> ValueError:
    """One line naming the ``pretrained`` file open_clip could not load into ``name``."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not str(pretrained).endswith(".safetensors") and not is_torch_file(pretrained):
        return ValueError(f"{pretrained}: not a PyTorch checkpoint (neither a file torch.save writes "
                          "nor a .safetensors file)")
    if isinstance(err, pickle.UnpicklingError):
        return ValueError(f"{pretrained}: refused: {refused_objects(unsafe_globals(pretrained))} "
                          "(weights are loaded without running code)")
    # open_clip asserts while it resizes position embeddings; torch names the weights that differ
    if isinstance(err, AssertionError) or (isinstance(err, RuntimeError) and lines and lines[0].startswith(_UNFIT)):
        detail = (lines[1] if len(lines) > 1 and lines[0].startswith(_UNFIT) else lines[0] if lines else "")[:200]
        return ValueError(f"{pretrained}: these weights do not fit the architecture of model {name}"
                          f"{' (' + detail + ')' if detail else ''}: give the --model they were trained as")
    detail = (lines[0].split(". ")[0] if lines else "")[:200]
    return ValueError(f"{pretrained}: not open_clip weights for {name}, or truncated or corrupt "
                      f"({type(err).__name__}{': ' + detail if detail else ''})")


def create_model_and_transforms(
    name: str,
    *,
    mlm_head: bool = True,
    mlm_condition: str = "none",
    fusion_layers: int = 1,
    pretrained: str | None = None,
    **overrides: Any,
) -> tuple[ClipAlign, Callable, Callable]:
    """Build a ``ClipAlign`` model and its train / eval image transforms.

    Args:
        name: a name from ``list_models()``.
        mlm_head: add the masked-token head to the text tower.
        mlm_condition: ``"image"`` conditions the masked-token head on the image (``ClipAlign``).
        fusion_layers: fusion blocks of an image-conditioned head.
        pretrained: a local open_clip checkpoint (never a download tag), loaded with
            ``weights_only=True``, or a local Hugging Face ``CLIPModel`` folder of ``name``'s
            architecture (converted by ``clipalign.hf_convert``; safetensors only).
            Where the config's text tower is a local Hugging Face folder (``hf_model_name``),
            the tower starts from that folder's weights unless ``pretrained`` is given, and the
            MLM uses the folder's own ``*ForMaskedLM`` head where it has one, and its
            tokenizer's [MASK] id (``clipalign.hf_text``).
        **overrides: keyword arguments for ``open_clip.create_model_and_transforms``
            (``force_image_size``, ``force_patch_dropout``, ...); ``None`` values are dropped
            so that CLI defaults never clobber a config's own values.

    Returns:
        ``(model, train_transform, eval_transform)``.

    Raises:
        ValueError: an unknown ``name``, or a ``pretrained`` file that does not load (one line
            naming it: not a PyTorch or safetensors file, refused, truncated or corrupt, or
            weights of another architecture).
        FileNotFoundError: ``pretrained`` is not a local file.
    """
    cfg = get_model_config(name)
    _check_pretrained(pretrained)
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    hf_state = load_hf_weights(name, pretrained) if pretrained is not None and is_hf_folder(pretrained) else None
    if hf_state is not None:
        pretrained = None  # the converted weights are loaded below
    hf_tower = hf_text.is_hf_text_config(cfg)
    if hf_tower:
        folder = hf_text.local_folder(cfg, name)
        hf_weights = cfg["text_cfg"].get("hf_model_pretrained", True)  # False: the folder's architecture only
        # the resolved path, and the folder's weights unless a checkpoint's replace them
        kwargs["text_cfg"] = {**cfg["text_cfg"], "hf_model_pretrained": hf_weights and pretrained is None}
    with _quiet_random_init(pretrained is None):
        try:
            # weights_only: open_clip's default, stated so that the file can never run code
            clip, train_tf, eval_tf = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, pretrained_text=False, weights_only=True, **kwargs
            )
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, AttributeError, TypeError,
                StopIteration, ValueError, AssertionError, SafetensorError, OSError) as err:
            # an OSError naming a file (unreadable, say) stands; torch's zip reader raises one
            # naming nothing for a damaged archive
            if pretrained is None or (isinstance(err, OSError) and err.filename is not None):
                raise
            raise _pretrained_error(pretrained, name, err) from None
    if pretrained is None:
        _init_caption_decoder(clip)
    if hf_state is not None:
        clip.load_state_dict(hf_state)
    use_fast_attention(clip)  # the same weights and math, without nn.MultiheadAttention's overhead
    tokenizer = get_tokenizer(name)
    if not hf_tower:
        model = ClipAlign(clip, mlm_head=mlm_head, eot_id=tokenizer.eot_token_id, mlm_condition=mlm_condition,
                          fusion_layers=fusion_layers)
        return model, train_tf, eval_tf
    vocab = clip.text.transformer.get_input_embeddings().num_embeddings
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"model {name}: its tokenizer has {tokenizer.vocab_size} ids, its text tower {vocab}")
    head = hf_text.masked_lm_head(folder, clip.text.transformer, hf_weights) if mlm_head else None
    model = ClipAlign(clip, mlm_head=mlm_head, eot_id=tokenizer.eot_token_id, mlm_condition=mlm_condition,
                      fusion_layers=fusion_layers, mask_id=tokenizer.mask_token_id, own_mlm_head=head)
    return model, train_tf, eval_tf


def create_model(name: str, **kwargs: Any) -> ClipAlign:
    """``create_model_and_transforms`` without the transforms."""
    return create_model_and_transforms(name, **kwargs)[0]


@functools.lru_cache(maxsize=8)
def get_tokenizer(name: str) -> Callable[..., torch.Tensor]:
    """``name``'s tokenizer: ``tokenizer(list[str]) -> (B, L)`` ids; open_clip's, or for a text
    tower from a local Hugging Face folder an ``HfTokenizer`` of that folder (or ``hf_tokenizer_name``).

    Raises:
        ValueError: for a name neither this project nor open_clip knows (open_clip would fall
            back to a default tokenizer).
        FileNotFoundError: the Hugging Face tokenizer is not a local folder.
    """
    cfg = get_model_config(name)
    if not hf_text.is_hf_text_config(cfg):
        return open_clip.get_tokenizer(name)
    text = cfg["text_cfg"]
    return hf_text.HfTokenizer(hf_text.local_folder(cfg, name, "hf_tokenizer_name"),
                               context_length=text.get("context_length", hf_text.DEFAULT_CONTEXT_LENGTH),
                               **text.get("tokenizer_kwargs", {}))


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """Equal for two tokenizers that give a caption the same ids (their context length aside);
    ``None`` for a callable that is no tokenizer this function knows."""
    if getattr(tokenizer, "fingerprint", None):  # hf_text.HfTokenizer
        return tokenizer.fingerprint
    if isinstance(tokenizer, open_clip.SimpleTokenizer):
        return f"open_clip-bpe:{len(tokenizer.encoder)}"
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's other tokenizers wrap a transformers one
    name = getattr(inner, "name_or_path", None)
    return f"{type(tokenizer).__name__}:{name}" if name else None



def stored_tokens_fingerprint(model: str | None) -> str | None:
    """The ``tokenizer_fingerprint`` of the tokenizer that made a shard's stored ids:
    ``model``'s (the name ``prep --tokenize`` records), or for shards that name none open_clip's
    BPE (the only one prep used before it recorded the name); ``None`` for an unknown model."""
    try:
        return tokenizer_fingerprint(get_tokenizer(model) if model is not None else open_clip.SimpleTokenizer())
    except (ValueError, OSError):
        return None


for _entry in filter(None, os.environ.get(CONFIG_ENV, "").split(os.pathsep)):
    add_model_config(_entry)
