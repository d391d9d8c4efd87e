"""The dual encoder: an open_clip CLIP model plus a masked-token (MLM) head on its text tower,
optionally conditioned on the image (``clipalign.fusion``). The text tower is open_clip's
transformer or a Hugging Face encoder (``clipalign.hf_text``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import text_global_pool
from torch import nn

from clipalign.fusion import ImageFusion, image_features_and_tokens, image_token_width
from clipalign.hf_text import is_hf_tower
from clipalign.masking import IGNORE_INDEX

MLM_CONDITIONS = ("none", "image")


def runs_channels_last(visual: nn.Module) -> bool:
    """Whether an image tower gets channels-last images: open_clip's ModifiedResNet, the one
    measured (1.3x a ca-tiny step, BENCHMARKS.md). ViTs gain nothing, and timm's ConvNet towers
    keep their layout: MobileCLIP2's crashed torch 2.14.1's channels-last backward (a segfault)."""
    return isinstance(visual, ModifiedResNet)


class MlmHead(nn.Module):
    """BERT's prediction head: dense → GELU → LayerNorm → decoder tied to the token embedding.

    Args:
        width: text tower width W.
        vocab_size: V, rows of the token embedding that the decoder shares.
        learned_mask: learn the input vector of the [MASK] token (a vocabulary without one);
            ``False`` where the tokenizer has its own.
    """

    def __init__(self, width: int, vocab_size: int, learned_mask: bool = True):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        # A learned input vector for the [MASK] token: open_clip's vocabulary has none, and a
        # new id above end-of-text would break its argmax pooling, so the id never reaches it.
        self.mask_embedding = nn.Parameter(torch.randn(width) * 0.02) if learned_mask else None

    def forward(self, hidden: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        """(M, W) hidden states at masked positions, (V, W) tied decoder weight → (M, V) logits."""
        h = self.norm(F.gelu(self.dense(hidden)))
        return F.linear(h, token_embedding.to(h.dtype), self.bias.to(h.dtype))


_TOWER_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final")


def _text_tower(clip: nn.Module) -> nn.Module:
    """The module that holds open_clip's text transformer pieces (CLIP or CustomTextCLIP)."""
    tower = getattr(clip, "text", clip)
    if is_hf_tower(clip):
        return tower
    if not all(hasattr(tower, name) for name in _TOWER_PARTS):
        raise ValueError(f"the MLM head needs an open_clip transformer text tower; {type(tower).__name__} is not one")
    return tower


def token_lengths(ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, L) ids → (B,) each row's tokens up to and including its end-of-text; ``L`` for a
    row without one (a caption cut at the context length)."""
    is_eot = ids == eot_id
    return torch.where(is_eot.any(1), is_eot.int().argmax(1) + 1, ids.shape[1])


def text_length(ids: torch.Tensor, eot_id: int) -> int:
    """Columns of (B, L) ids that hold a real token in some row: up to the batch's last end-of-text.

    The columns after it are padding in every row. ``L`` when a row has no end-of-text.
    """
    return int(token_lengths(ids, eot_id).max())


def _token_embedding(clip: nn.Module) -> nn.Embedding:
    """The text tower's (V, W) token embedding, which the MLM decoder shares."""
    tower = _text_tower(clip)
    return tower.transformer.get_input_embeddings() if is_hf_tower(clip) else tower.token_embedding


def _heads(clip: nn.Module) -> int:
    tower = _text_tower(clip)
    return tower.config.num_attention_heads if is_hf_tower(clip) else tower.transformer.resblocks[0].attn.num_heads


def _pool_type(tower: nn.Module) -> str | None:
    return getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))


def trims_text(clip: nn.Module) -> bool:
    """Whether ``encode_text`` gives the same features when the ids lose their trailing padding.

    True for causal transformer towers pooled at end-of-text or at the first token (CLIP's
    own): no position before end-of-text attends to the padding after it. Not for towers that
    attend both ways, append a class token (CoCa) or pool the last position (SigLIP).
    """
    tower = getattr(clip, "text", clip)
    return (all(hasattr(tower, name) for name in _TOWER_PARTS) and getattr(tower, "attn_mask", None) is not None
            and getattr(tower, "cls_emb", None) is None and not getattr(tower, "use_pad_mask", False)
            and _pool_type(tower) in ("argmax", "eos", "first"))


def encode_text(clip: nn.Module, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip's ``clip.encode_text`` that also takes ids shorter than the context.

    (B, L) ids, L ≤ context length → (B, D). Shorter ids are what ``text_length`` keeps of a
    batch; only towers for which ``trims_text`` holds accept them (the others get the ids
    unchanged to open_clip, which needs the full padded context).
    """
    tower = getattr(clip, "text", clip)
    length = text.shape[1]
    if not trims_text(clip) or length == tower.positional_embedding.shape[0]:
        return clip.encode_text(text, normalize=normalize)
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(text).to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask[:length, :length]))
    x = text_global_pool(x, text, _pool_type(tower), eos_token_id=getattr(tower, "text_eos_id", getattr(tower, "eos_id", None)))
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x


class ClipAlign(nn.Module):
    """open_clip dual encoder with an optional MLM head.

    Args:
        clip: an open_clip ``CLIP`` or ``CustomTextCLIP`` model (its text tower open_clip's
            transformer or a Hugging Face encoder, ``HFTextEncoder``).
        mlm_head: add the masked-token prediction head to the text tower.
        eot_id: the tokenizer's end-of-text id.
        mlm_condition: ``"none"``: the masked caption is predicted from text alone; ``"image"``:
            its token states cross-attend to the image tower's tokens first (``ImageFusion``).
        fusion_layers: fusion blocks for ``mlm_condition="image"``.
        mask_id: the tokenizer's own [MASK] id (a Hugging Face tower's); ``None``: one past the
            vocabulary, with a learned input vector.
        own_mlm_head: the tower's own pretrained masked-LM head ((M, W) → (M, V) logits, its
            decoder already tied; ``hf_text.masked_lm_head``), used instead of a fresh ``MlmHead``.
    """

    def __init__(self, clip: nn.Module, *, mlm_head: bool = True, eot_id: int = 49407, mlm_condition: str = "none",
                 fusion_layers: int = 1, mask_id: int | None = None, own_mlm_head: nn.Module | None = None):
        super().__init__()
        if mlm_condition not in MLM_CONDITIONS:
            raise ValueError(f"unknown MLM condition {mlm_condition!r} (one of {', '.join(MLM_CONDITIONS)})")
        if mlm_condition != "none" and not mlm_head:
            raise ValueError("an image-conditioned MLM needs the MLM head")
        if is_hf_tower(clip) and mlm_head and mask_id is None:
            raise ValueError("a Hugging Face text tower's MLM needs its tokenizer's [MASK] id")
        self.clip = clip
        self.eot_id = eot_id
        self._mask_id = mask_id
        emb = _token_embedding(clip)
        if not mlm_head:
            self.mlm_head = None
        elif own_mlm_head is not None:
            self.mlm_head = own_mlm_head
        else:
            self.mlm_head = MlmHead(emb.embedding_dim, emb.num_embeddings, learned_mask=mask_id is None)
        # oneDNN's convolutions run a ca-tiny step 1.3x faster on channels-last images, in bf16 and
        # fp32 alike (BENCHMARKS.md); the weights keep their layout
        self.channels_last = runs_channels_last(clip.visual)
        self.mlm_fusion = None
        if mlm_condition == "image":
            embed_dim = getattr(clip.visual, "output_dim", None) or emb.embedding_dim
            self.mlm_fusion = ImageFusion(emb.embedding_dim, image_token_width(clip.visual, embed_dim),
                                          layers=fusion_layers, heads=_heads(clip))

    @property
    def vocab_size(self) -> int:
        return _token_embedding(self.clip).num_embeddings

    @property
    def mask_id(self) -> int:
        """Id that ``mask_tokens`` writes at masked positions: the tokenizer's [MASK], or where
        it has none (open_clip's BPE) one past the vocabulary."""
        return self.vocab_size if self._mask_id is None else self._mask_id

    @property
    def image_size(self) -> int:
        """Side of the square input images."""
        size = self.clip.visual.image_size
        return size if isinstance(size, int) else size[0]

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def channel_layout(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in the memory layout the image tower runs fastest on."""
        return image.contiguous(memory_format=torch.channels_last) if self.channels_last else image

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) → (B, D)."""
        return self.clip.encode_image(self.channel_layout(image), normalize=normalize)

    def encode_image_and_tokens(self, image: torch.Tensor, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One image-tower pass: ``(encode_image(image) (B, D), tokens (B, N, C))`` for the fusion."""
        features, tokens = image_features_and_tokens(self.clip.visual, self.channel_layout(image))
        return (F.normalize(features, dim=-1) if normalize else features), tokens

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, L) token ids (no mask ids) → (B, D), with open_clip's causal text tower; L may
        be shorter than the context where ``trims_text`` allows (see ``text_length``)."""
        return encode_text(self.clip, text, normalize=normalize)

    @property
    def captions(self) -> bool:
        """Whether the model has a captioning decoder (open_clip's CoCa)."""
        return getattr(self.clip, "text_decoder", None) is not None

    def caption_logits(self, image_tokens: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CoCa's teacher-forced next-token predictions from one text pass.

        Args:
            image_tokens: (B, N, C) from ``encode_image_and_tokens``.
            text: (B, L) token ids.

        Returns:
            ``(text_features (B, D) normalised, logits (B, L-1, V), labels (B, L-1))``.
        """
        if not self.captions:
            raise ValueError("captioning needs a CoCa model (a config with multimodal_cfg)")
        features, token_embs = self.clip._encode_text(text, normalize=True)
        return features, self.clip.text_decoder(image_tokens, token_embs[:, :-1]), text[:, 1:]

    @property
    def trims_text(self) -> bool:
        """Whether ``encode_text`` takes ids with the batch's common padding dropped."""
        return trims_text(self.clip)

    def encode_text_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Bidirectional pass over (possibly masked) ids: (B, L) → (B, L, W) token states.

        Attention is full (no causal mask) except that no token attends to padding
        (positions after end-of-text; for a Hugging Face tower, its ``[PAD]`` ids, as in its
        contrastive pass).
        """
        tower = _text_tower(self.clip)
        if is_hf_tower(self.clip):  # an encoder that already attends both ways; [MASK] is in its vocabulary
            attention = (ids != tower.config.pad_token_id).long()
            return tower.transformer(input_ids=ids, attention_mask=attention).last_hidden_state
        emb = tower.token_embedding
        cast_dtype = tower.transformer.get_cast_dtype()
        is_mask = ids == self.mask_id
        x = emb(ids.masked_fill(is_mask, 0))
        if self.mlm_head is not None:
            x = torch.where(is_mask[..., None], self.mlm_head.mask_embedding.to(x.dtype), x)
        # [:L]: towers that append a CLS token (CoCa) have one position more than the ids
        x = x.to(cast_dtype) + tower.positional_embedding[: ids.shape[1]].to(cast_dtype)
        x = tower.transformer(x, attn_mask=self._padding_mask(ids, tower.transformer, x.dtype))
        return tower.ln_final(x)

    def _padding_mask(self, ids: torch.Tensor, transformer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """Additive (B*heads, L, L) mask hiding the keys after end-of-text."""
        batch, length = ids.shape
        heads = transformer.resblocks[0].attn.num_heads
        # (B, L) keys after end-of-text (a row without one hides nothing)
        pad = torch.arange(length, device=ids.device)[None, :] >= token_lengths(ids, self.eot_id)[:, None]
        mask = torch.zeros(batch, 1, 1, length, dtype=dtype, device=ids.device)
        mask = mask.masked_fill(pad[:, None, None, :], float("-inf"))
        return mask.expand(batch, heads, length, length).reshape(batch * heads, length, length)

    def mlm_logits(self, masked_ids: torch.Tensor, labels: torch.Tensor,
                   image_tokens: torch.Tensor | None = None, row_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the masked positions only.

        Args:
            masked_ids: (B, L) ids from ``mask_tokens``.
            labels: (B, L) original ids at chosen positions, ``IGNORE_INDEX`` elsewhere.
            image_tokens: (B, N, C) from ``encode_image_and_tokens``, for an image-conditioned MLM.
            row_multiple: pad the rows to a multiple of this with zero hidden states whose
                target is ``IGNORE_INDEX``. Cross-entropy (mean or sum) and top-1 hits leave
                them out, so the loss and its gradients are unchanged; what changes is that
                the (M, V) logits and their gradient come in a few sizes, not a new one each
                step, so a heap that keeps freed memory reuses them instead of growing.

        Returns:
            ``(logits, targets)``: (M, V) and (M,), M = number of chosen positions (rounded
            up to ``row_multiple``).
        """
        if self.mlm_head is None:
            raise RuntimeError("this model was built without an MLM head")
        hidden = self.encode_text_tokens(masked_ids)  # (B, L, W)
        if self.mlm_fusion is not None:
            if image_tokens is None:
                raise ValueError("this model's MLM is image-conditioned: pass the image tokens")
            hidden = self.mlm_fusion(hidden, image_tokens)
        chosen = labels != IGNORE_INDEX
        hidden, targets = hidden[chosen], labels[chosen]  # (M, W), (M,)
        pad = -len(targets) % row_multiple
        if pad:
            hidden = torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[1])])
            targets = torch.cat([targets, targets.new_full((pad,), IGNORE_INDEX)])
        if not isinstance(self.mlm_head, MlmHead):  # the tower's own head, its decoder tied already
            return self.mlm_head(hidden), targets
        return self.mlm_head(hidden, _token_embedding(self.clip).weight), targets

    def forward(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        masked_text: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        image_tokens: bool = False,
        caption: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Features for the contrastive loss and, given masked text, logits for the MLM loss.

        Returns:
            A dict with ``image_features`` (B, D) and ``text_features`` (B, D), both
            L2-normalised, ``logit_scale`` (scalar, already exponentiated), ``logit_bias`` for
            models that have one (SigLIP), with ``image_tokens`` (or an image-conditioned MLM)
            ``image_tokens`` (B, N, C) from the same image pass, with masked text
            ``mlm_logits`` (M, V) and ``mlm_targets`` (M,), and with ``caption`` (CoCa)
            ``caption_logits`` (B, L-1, V) and ``caption_labels`` (B, L-1) from the same passes.
        """
        out: dict[str, torch.Tensor] = {"logit_scale": self.clip.logit_scale.exp()}
        if getattr(self.clip, "logit_bias", None) is not None:
            out["logit_bias"] = self.clip.logit_bias
        wants_tokens = image_tokens or caption or (self.mlm_fusion is not None and masked_text is not None)
        if image is not None and wants_tokens:
            out["image_features"], out["image_tokens"] = self.encode_image_and_tokens(image, normalize=True)
        elif image is not None:
            out["image_features"] = self.encode_image(image, normalize=True)
        if text is not None and caption:
            out["text_features"], out["caption_logits"], out["caption_labels"] = self.caption_logits(
                out["image_tokens"], text)
        elif text is not None:
            out["text_features"] = self.encode_text(text, normalize=True)
        if masked_text is not None and mlm_labels is not None:
            out["mlm_logits"], out["mlm_targets"] = self.mlm_logits(masked_text, mlm_labels, out.get("image_tokens"))
        return out
