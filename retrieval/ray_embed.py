"""Embedding on a Ray cluster (``--engine ray``): Ray Data over the units, a pool of actors, one model each.

The unit (a shard, or a slice of a folder's images) stays the unit of work: each actor embeds
a whole unit with the code of the local run (``retrieval.embed.embed_and_write``: the same
batches, so the same vectors) and writes its files, the ``done`` record last, into the
embeddings folder, which every node must see (as it sees the shards and the model). The
driver writes the folder's info before and the model copy after; a re-run skips done units.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clipalign.formats.folders import EmbeddingsFolder
from clipalign.model_source import ModelSource
from retrieval.sources import Unit


def pinned_source(source: ModelSource, loaded_from: str) -> ModelSource:
    """``source`` as every node reads it: absolute paths, and a run folder's checkpoint fixed to the
    file the driver loaded (``loaded_from``), not whatever is latest when an actor starts."""
    if source.checkpoint is not None:
        return ModelSource(checkpoint=os.path.abspath(loaded_from))

    def absolute(value: str | None) -> str | None:
        return os.path.abspath(value) if value is not None and Path(value).exists() else value

    return replace(source, model=absolute(source.model), pretrained=absolute(source.pretrained))


# retrieval.embed.embed_and_write: (model, transform, tokenizer, unit, folder, **options) -> the done record
WriteUnit = Callable[..., dict[str, Any]]


class UnitEmbedder:
    """A Ray Data actor: builds the model once, then embeds and writes one unit per row it is given
    with ``write_unit`` (handed in: ``retrieval.embed`` owns the work, and calls this module)."""

    def __init__(self, source: ModelSource, identity: dict[str, str], out: str, write_unit: WriteUnit, *,
                 captions: bool, dtype: str, batch_size: int, precision: str, exact_decode: bool = False,
                 device: str) -> None:
        self.folder, self.write_unit = EmbeddingsFolder(out), write_unit
        self.options = {"captions": captions, "dtype": dtype, "batch_size": batch_size, "precision": precision,
                        "exact_decode": exact_decode}
        self.failed: Exception | None = None
        try:
            self._build(source, identity, device)
        except Exception as err:  # raised at the first call: Ray reports a failed __init__ flattened to text
            self.failed = err

    def _build(self, source: ModelSource, identity: dict[str, str], device: str) -> None:
        from clipalign.model_source import load_model_source
        from retrieval.identity import model_identity

        model, self.transform, self.tokenizer, meta = load_model_source(source)
        got = model_identity(meta["model_name"], model.state_dict())
        if got != identity:  # the file changed since the driver read it
            raise ValueError(f"{meta['path']} now holds weights {got['weights_sha256']}, not the "
                             f"{identity['weights_sha256']} this run started with")
        self.model = model.to(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{"unit": [unit JSON, ...]}`` → ``{"name", "count"}`` of each unit, embedded and written."""
        if self.failed is not None:
            raise self.failed
        names, counts = [], []
        for text in batch["unit"]:
            fields = json.loads(str(text))
            unit = Unit(**(fields | {"files": tuple(fields["files"])}))
            done = self.write_unit(self.model, self.transform, self.tokenizer, unit, self.folder, **self.options)
            names.append(unit.name)
            counts.append(done["count"])
        return {"name": np.array(names), "count": np.array(counts, np.int64)}


def embed_on_ray(source: ModelSource, identity: dict[str, str], units: list[Unit], out: str | os.PathLike,
                 write_unit: WriteUnit, *, captions: bool, dtype: str, batch_size: int, precision: str,
                 exact_decode: bool = False, address: str | None = None, num_gpus: float = 0, actors: int | None = None,
                 on_unit: Callable[[str, int], None] | None = None) -> None:
    """Embed ``units`` into the started embeddings folder ``out`` with a pool of Ray actors.

    Args:
        source: the model, as every node reads it (``pinned_source``); each actor checks that
            it loads the weights of ``identity``.
        write_unit: embeds one unit and writes its files (``retrieval.embed.embed_and_write``).
        address: the cluster (``clipalign.cluster.connect``).
        num_gpus: GPUs per actor (0: the model runs on the CPU).
        actors: the pool's size; by default as many as the cluster's CPUs (or GPUs) hold.
        on_unit: called with each unit's name and image count once it is written.

    Raises:
        RuntimeError: Ray is not installed; ConnectionError: no cluster at ``address``.
    """
    from clipalign.cluster import connect
    from retrieval.ray_index import task_errors

    if not units:
        return
    ray = connect(address)
    resources = ray.cluster_resources()
    room = resources.get("GPU", 0) / num_gpus if num_gpus else resources.get("CPU", 1)
    size = max(1, min(len(units), actors or int(room)))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller counts the images (``on_unit``)
    context.print_on_execution_start = False
    context.raise_original_map_exception = True  # an actor's error as it raised it, not wrapped
    items = [{"unit": json.dumps(asdict(u) | {"files": list(u.files)})} for u in units]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        UnitEmbedder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=size), num_cpus=1,
        num_gpus=num_gpus or None, fn_constructor_args=(source, identity, str(Path(out).resolve()), write_unit),
        fn_constructor_kwargs={"captions": captions, "dtype": dtype, "batch_size": batch_size,
                               "precision": precision, "exact_decode": exact_decode,
                               "device": "cuda" if num_gpus else "cpu"})
    with task_errors():
        for row in dataset.iter_rows():
            if on_unit is not None:
                on_unit(str(row["name"]), int(row["count"]))


__all__ = ["UnitEmbedder", "embed_on_ray", "pinned_source"]
