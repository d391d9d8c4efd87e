"""Streaming training data: WebDataset shards → batches of (images, token ids).

Bad samples never stop a run: an undecodable image, an empty caption or a truncated shard
is skipped, counted by reason in the worker that met it, and the counts travel to the
trainer with every batch.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import webdataset as wds

from clipalign.formats.sample import (JSON, TOKENS, caption_char_limit, sample_captions, sample_image, sample_text,
                                     sample_tokens)
from clipalign.formats.skips import EMPTY_CAPTION, BadSample, SkipCounter, merge_counts


def resolve_shards(spec: str | os.PathLike | Iterable[str]) -> list[str]:
    """Shard paths from a folder (its ``*.tar``), a glob, a brace pattern or a list.

    Local paths that do not exist are dropped, so a wrong path yields an empty list rather
    than a stream that retries a missing file forever; URLs (``scheme://``) pass through.
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = str(spec)
        if os.path.isdir(spec):
            paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
        elif any(ch in spec for ch in "*?["):
            paths = sorted(glob.glob(spec))
        else:
            paths = wds.shardlists.expand_urls(spec)
    else:
        paths = [str(s) for s in spec]
    return [p for p in paths if "://" in p or p.startswith("pipe:") or os.path.isfile(p)]


def decode_tokens(sample: dict, context_length: int) -> torch.Tensor | None:
    """Token ids stored by ``clipalign prep --tokenize`` as a (K, L) tensor, one row per caption;
    ``None`` when the sample has none or they were made for another context length."""
    ids = sample_tokens(sample, context_length)
    return None if ids is None else torch.from_numpy(ids)


def _stored_tokenizer(sample: dict) -> str | None:
    """The model name whose tokenizer made the sample's stored ids (``prep --tokenize``'s
    ``tokenizer`` in the metadata); ``None`` when it does not say."""
    try:
        meta = json.loads(sample.get(JSON, b"{}"))
    except (ValueError, TypeError):
        return None
    name = meta.get("tokenizer") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else None


@contextlib.contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Run the block on torch's CPU RNG seeded with ``seed``, then give the RNG back its state.

    ``torch.random.fork_rng(devices=[])`` with ``torch.manual_seed`` draws the same numbers, but
    ``manual_seed`` also queues a seed for every accelerator backend, and a CUDA build of
    torch formats a stack trace for each: 0.7-1 ms a sample, about a third of the loader.
    """
    rng = torch.default_generator
    state = rng.get_state()
    rng.manual_seed(seed)
    try:
        yield
    finally:
        rng.set_state(state)


class SampleDecoder:
    """Raw tar sample → ``{"image", "text"[, "views"]}``; raises ``BadSample`` on bad input.

    Stored token ids (``tok.npy``) are used when they were made by a tokenizer that gives the
    same ids as ``tokenizer`` (a text tower from Hugging Face has its own vocabulary); else the
    caption is tokenised.

    Every random augmentation is drawn from a torch RNG seeded by the sample's place in the
    stream (``sample["__seed__"]``), never from the process's own RNG, so a resumed run
    that skips the samples already seen augments the rest exactly as before.

    Args:
        transform: PIL image → (3, H, W) tensor (open_clip's train or eval transform).
        tokenizer: ``list[str] → (1, L)`` ids (open_clip's, or ``hf_text.HfTokenizer``).
        view_transform: if given, also make two augmented ``views`` (2, 3, H, W) of the image
            for an image self-supervised objective.
        masker: if given, ``(1, L) ids → (masked ids, labels)`` (``mask_tokens``): the sample
            also gets ``masked_text`` and ``mlm_labels`` (L,) for the MLM objective.
    """

    def __init__(self, transform: Callable, tokenizer: Callable, view_transform: Callable | None = None,
                 masker: Callable | None = None):
        self.transform = transform
        self.tokenizer = tokenizer
        self.view_transform = view_transform
        self.masker = masker
        self.context_length = getattr(tokenizer, "context_length", 77)
        self._fits: dict[str | None, bool] = {}  # the stored ids' model name -> whether they are ours

    def _stored_tokens_fit(self, sample: dict) -> bool:
        """Whether the sample's stored ids, if any, are what ``tokenizer`` gives (a plain
        callable, unknown to ``tokenizer_fingerprint``, takes them as they are)."""
        if TOKENS not in sample:
            return False
        made_by = _stored_tokenizer(sample)
        if made_by not in self._fits:
            # open_clip's import, only for samples with stored ids
            from clipalign.factory import stored_tokens_fingerprint, tokenizer_fingerprint

            ours = tokenizer_fingerprint(self.tokenizer)
            self._fits[made_by] = ours is None or stored_tokens_fingerprint(made_by) == ours
        return self._fits[made_by]

    def __call__(self, sample: dict) -> dict[str, torch.Tensor]:
        # (K, L) stored ids, or None
        tokens = decode_tokens(sample, self.context_length) if self._stored_tokens_fit(sample) else None
        captions = sample_captions(sample, caption_char_limit(self.context_length)) if tokens is None else None
        if tokens is not None and not sample_text(sample):
            raise BadSample(EMPTY_CAPTION, sample.get("__key__", ""))
        image = sample_image(sample)
        with seeded_cpu_rng(sample.get("__seed__", 0)):
            # several captions of one image: each pass over it trains on one, drawn at random
            options = len(tokens) if tokens is not None else len(captions)
            pick = int(torch.randint(options, ())) if options > 1 else 0
            text = tokens[pick] if tokens is not None else self.tokenizer([captions[pick]])[0]
            out = {"image": self.transform(image), "text": text, "__index__": sample.get("__index__", 0)}
            if self.view_transform is not None:
                out["views"] = torch.stack([self.view_transform(image), self.view_transform(image)])
            if self.masker is not None:
                masked, labels = self.masker(text[None])
                out["masked_text"], out["mlm_labels"] = masked[0], labels[0]
        return out


class DataStreamError(RuntimeError):
    """The shards yield no usable sample at all."""


class ProgressGuard:
    """Stops an endless resampled stream that never yields a usable sample.

    ``ResampledShards`` repeats forever, so shards that are all empty, or samples that are
    all bad, would make the loader wait forever. The guard raises ``DataStreamError`` after
    ``max_barren_shards`` shards in a row without a sample, or ``max_skips`` skipped samples
    in a row without a good one.
    """

    def __init__(self, counter: SkipCounter, max_barren_shards: int, max_skips: int):
        self.counter = counter
        self.max_barren_shards, self.max_skips = max_barren_shards, max_skips
        self.barren_shards = 0
        self.skips_in_a_row = 0

    def _fail(self, what: str) -> None:
        raise DataStreamError(f"{what}; skipped so far: {dict(self.counter.counts)}")

    def shards(self, urls: Iterable[dict]) -> Iterator[dict]:
        for url in urls:
            self.barren_shards += 1
            if self.barren_shards > self.max_barren_shards:
                self._fail(f"the last {self.max_barren_shards} shards read held no sample")
            yield url

    def raw(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            self.barren_shards = 0
            yield sample

    def skipped(self, exn: BaseException) -> bool:
        """The stream's exception handler: count, then give up after too many in a row."""
        self.counter(exn)
        self.skips_in_a_row += 1
        if self.skips_in_a_row > self.max_skips:
            self._fail(f"{self.max_skips} samples in a row were unusable")
        return True

    def good(self, samples: Iterable) -> Iterator:
        for sample in samples:
            self.skips_in_a_row = 0
            yield sample


@dataclass(frozen=True)
class StreamPosition:
    """Where a training stream stands, so a resumed run continues it sample for sample.

    The loader's workers are *roles*: role ``j`` of rank ``r`` reads its own seeded stream,
    and batch ``t`` of the run comes from role ``t % workers``. ``consumed[j]`` counts the
    raw samples role ``j`` had taken from its stream when its last used batch was made.

    Attributes:
        step: batches used so far.
        consumed: role → raw samples consumed.
    """

    step: int = 0
    consumed: dict[int, int] = field(default_factory=dict)

    def advance(self, role: int, consumed: int) -> "StreamPosition":
        return StreamPosition(self.step + 1, {**self.consumed, role: consumed})


@dataclass(frozen=True)
class _Role:
    """The stream role of the current loader worker (evaluated inside the worker).

    Physical worker ``i`` plays role ``(i + rotate) % workers``: after resuming at step ``s``
    (``rotate = s % workers``) the loader's first batch comes from the role whose turn it is.
    """

    rotate: int
    workers: int
    seed: int
    rank: int

    def __call__(self) -> int:
        worker = torch.utils.data.get_worker_info()
        return ((worker.id if worker is not None else 0) + self.rotate) % max(1, self.workers)

    def stream_seed(self) -> int:
        """The seed of this role's whole stream: shard draws, shuffle and augmentations."""
        return (self.seed * 1_000_003 + self.rank) * 1009 + self()


def train_pipeline(
    shards: list[str],
    *,
    transform: Callable,
    tokenizer: Callable,
    batch_size: int,
    seed: int = 0,
    shuffle_buffer: int = 2000,
    workers: int = 1,
    rank: int = 0,
    position: StreamPosition | None = None,
    view_transform: Callable | None = None,
    masker: Callable | None = None,
) -> wds.DataPipeline:
    """An endless, reproducible stream of ``(batch, info)`` pairs.

    ``batch`` is ``{"image": (B, 3, H, W), "text": (B, L)}`` (plus ``"views"``: (B, 2, 3, H, W)
    with ``view_transform``; ``"masked_text"``, ``"mlm_labels"``: (B, L) with ``masker``). ``info`` is ``{"role", "consumed", "skipped"}``: the stream role
    that made the batch, how many raw samples that role has consumed, and its cumulative
    skip counts by reason (bad samples are skipped and counted, never fatal).

    Shards are drawn at random with replacement, each role its own seeded stream (as
    open_clip's ``--dataset-resampled``), then mixed in a seeded shuffle buffer. The stream
    depends only on (``seed``, ``rank``, role), so given the ``position`` of a checkpoint it
    is replayed without decoding up to that point and continues exactly where it was. A
    stream that yields no usable sample from many shards in a row raises
    ``DataStreamError`` instead of waiting forever.
    """
    position = position or StreamPosition()
    role = _Role(rotate=position.step % max(1, workers), workers=workers, seed=seed, rank=rank)
    counter = SkipCounter()
    guard = ProgressGuard(counter, max_barren_shards=max(20, 2 * len(shards)), max_skips=max(1000, 2 * shuffle_buffer))
    return wds.DataPipeline(
        wds.ResampledShards(shards, seed=seed, deterministic=True, worker_seed=role.stream_seed),
        guard.shards,
        wds.tarfile_to_samples(handler=guard.skipped),
        guard.raw,
        _seeded_shuffle(shuffle_buffer, role),
        _numbered(role, position.consumed, counter),
        wds.map(SampleDecoder(transform, tokenizer, view_transform, masker), handler=guard.skipped),
        guard.good,
        _batched(batch_size, counter, role),
    )


def _numbered(role: _Role, consumed: dict[int, int], counter: SkipCounter) -> Callable[[Iterable], Iterator]:
    """Number the raw samples of a role's stream; drop the ones used before a resume
    (``consumed[role]``) without decoding them (and without counting again what the run
    before already counted), and give each sample its augmentation seed."""

    def stage(samples: Iterable[dict]) -> Iterator[dict]:
        first, base = consumed.get(role(), 0), role.stream_seed()
        counter.active = first == 0
        for index, sample in enumerate(samples):
            if index >= first:
                counter.active = True
                yield {**sample, "__index__": index, "__seed__": (base * 1_000_003 + index) % 2**63}

    return stage


def _batched(batch_size: int, counter: SkipCounter, role: _Role) -> Callable[[Iterable], Iterator]:
    def stage(samples: Iterable[dict]) -> Iterator[tuple[dict, dict]]:
        me, pending = role(), []
        for sample in samples:
            pending.append(sample)
            if len(pending) == batch_size:
                batch = {k: torch.stack([s[k] for s in pending]) for k in pending[0] if not k.startswith("__")}
                info = {"role": me, "consumed": pending[-1]["__index__"] + 1, "skipped": dict(counter.counts)}
                pending = []
                yield batch, info

    return stage


def _seeded_shuffle(bufsize: int, role: _Role) -> Callable[[Iterable], Iterator]:
    """webdataset's shuffle buffer with an RNG seeded by the role's stream seed."""

    def stage(samples: Iterable) -> Iterator:
        rng = random.Random(role.stream_seed())
        return wds.shuffle(bufsize, initial=min(bufsize, 500), rng=rng)(samples)

    return stage


def train_loader(pipeline: wds.DataPipeline, workers: int) -> wds.WebLoader:
    """A DataLoader over the pipeline's ready-made batches (in role order, round robin).

    Its own generator: a DataLoader draws its workers' base seed when it starts, and from the
    global RNG that would shift every later draw of a resumed run (patch dropout's, say). The
    streams are seeded by role (``_Role``), so the base seed decides nothing else.
    """
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(0),
    )


def merge_skip_counts(per_worker: dict[int, dict[str, int]]) -> dict[str, int]:
    """Sum the latest cumulative counts of every worker."""
    return merge_counts(*per_worker.values())
