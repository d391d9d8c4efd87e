"""Text towers from Hugging Face transformers (open_clip's ``hf_model_name`` towers), from a
local folder only: the folder check, the tokenizer with the special ids that masking needs,
and the folder's own masked-LM head.

A model config names the folder in ``text_cfg.hf_model_name`` (and the tokenizer's in
``hf_tokenizer_name``, by default the same). Nothing is ever downloaded: a name that is not a
local folder is refused.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from open_clip.hf_model import HFTextEncoder
from open_clip.tokenizer import HFTokenizer
from torch import nn

PATH_KEYS = ("hf_model_name", "hf_tokenizer_name")
DEFAULT_CONTEXT_LENGTH = 77  # open_clip's


def is_hf_text_config(cfg: dict[str, Any]) -> bool:
    """Whether an open_clip model config's text tower is a Hugging Face model."""
    return "hf_model_name" in cfg.get("text_cfg", {})


def is_hf_tower(clip: nn.Module) -> bool:
    """Whether an open_clip model's text tower is a Hugging Face model (``HFTextEncoder``)."""
    return isinstance(getattr(clip, "text", None), HFTextEncoder)


def resolve_paths(cfg: dict[str, Any], base: Path) -> dict[str, Any]:
    """``cfg`` with relative ``hf_model_name`` / ``hf_tokenizer_name`` made absolute against
    ``base`` (the folder of the config file that names them), so a config travels with its model."""
    text = dict(cfg.get("text_cfg", {}))
    for key in PATH_KEYS:
        if text.get(key) and not Path(text[key]).is_absolute():
            text[key] = str((base / text[key]).resolve())
    return {**cfg, "text_cfg": text}


def local_folder(cfg: dict[str, Any], name: str, key: str = "hf_model_name") -> Path:
    """The local Hugging Face folder that ``cfg``'s text tower names under ``key``.

    Raises:
        FileNotFoundError: it is not a folder holding ``config.json`` (a Hub name, say: this
            project never downloads one).
    """
    text = cfg["text_cfg"]
    folder = Path(text.get(key) or text["hf_model_name"])
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model {name}: its text tower {str(folder)!r} is not a local Hugging Face folder "
                                "with a config.json (clipalign never downloads one)")
    return folder


class HfTokenizer(HFTokenizer):
    """open_clip's ``HFTokenizer`` on a local folder, with the ids the trainer needs by the
    names open_clip's ``SimpleTokenizer`` gives them.

    ``tokenizer(list[str]) -> (B, context_length)`` ids: ``[CLS] tokens [SEP] [PAD]...``
    for BERT (padding on the right, truncation keeps ``[SEP]``).

    Attributes:
        sot_token_id: the start token (``[CLS]``, else BOS).
        eot_token_id: the token that ends every caption (``[SEP]``, else EOS): padding follows it.
        pad_token_id, mask_token_id: ``[PAD]`` and ``[MASK]``.
        special_ids: every special id (they sit anywhere in the vocabulary): never masked,
            never drawn as a random replacement.
        vocab_size: ids are in ``[0, vocab_size)``.
        fingerprint: equal for tokenizers that give equal ids (a hash of the vocabulary and rules).

    Raises:
        ValueError: the tokenizer lacks an end, padding or mask token.
    """

    def __init__(self, folder: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH, **kwargs: Any):
        super().__init__(str(folder), context_length=context_length, local_files_only=True, **kwargs)
        tok = self.tokenizer
        tok.padding_side = "right"  # the trainer finds padding after the end token
        self.sot_token_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        self.eot_token_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        self.pad_token_id, self.mask_token_id = tok.pad_token_id, tok.mask_token_id
        missing = [n for n, v in (("end (SEP/EOS)", self.eot_token_id), ("padding", self.pad_token_id),
                                  ("mask", self.mask_token_id)) if v is None]
        if missing:
            raise ValueError(f"{folder}: the tokenizer has no {', '.join(missing)} token "
                             "(the MLM objective needs them)")
        self.special_ids = tuple(sorted(set(tok.all_special_ids)))
        self.vocab_size = len(tok)
        backend = getattr(tok, "backend_tokenizer", None)
        rules = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
        self.fingerprint = "hf:" + hashlib.sha256(rules.encode("utf-8")).hexdigest()[:16]


def masked_lm_head(folder: Path, transformer: nn.Module, pretrained: bool = True) -> nn.Module | None:
    """The masked-LM head of the ``*ForMaskedLM`` model in ``folder`` (BERT's ``cls``), its
    decoder tied to ``transformer``'s token embedding as Hugging Face ties it; ``None`` when
    the folder holds another kind of model (a bare encoder).

    The head maps (M, W) hidden states to (M, V) logits.

    Args:
        folder: the text tower's local folder.
        transformer: the tower's ``transformers`` model (``HFTextEncoder.transformer``).
        pretrained: load the head's weights from the folder; ``False``: draw them as the
            model's own initialisation does.

    Raises:
        ValueError: the masked-LM model's head is not one module applied to the hidden states.
    """
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if not any(arch.endswith("ForMaskedLM") for arch in (config.architectures or ())):
        return None
    mlm = (AutoModelForMaskedLM.from_pretrained(folder, local_files_only=True) if pretrained
           else AutoModelForMaskedLM.from_config(config))
    heads = [(n, m) for n, m in mlm.named_children() if n != mlm.base_model_prefix]
    if len(heads) != 1:
        raise ValueError(f"{folder}: the masked-LM head of {type(mlm).__name__} is not one module "
                         f"({', '.join(n for n, _ in heads)}); clipalign cannot use it")
    head = heads[0][1]
    decoder = mlm.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", True) and decoder is not None:
        decoder.weight = transformer.get_input_embeddings().weight  # one tensor, as in the HF model
    return head
