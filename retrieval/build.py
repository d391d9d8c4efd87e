"""Index folders, written whole: from an embeddings folder, from images embedded on the way, or
appended to.

Each function here writes the whole index folder (``clipalign.formats.folders.IndexFolder``):
the FAISS files, the metadata, the model copy, the ONNX text tower of the fast text-query path and, last and once,
the folder's info. A folder without its info is not an index. Every write goes into a
temporary sibling swapped into place whole (``retrieval.atomic_folder``): a killed build or
add leaves the previous complete index.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from clipalign.formats.atomic import replace_file
from clipalign.formats.folders import EmbeddingsFolder, IndexFolder
from clipalign.model_source import ModelSource
from retrieval.atomic_folder import replaced_folder
from retrieval.embed import ENGINES, embed_folder, load_embeddings, summary
from retrieval.embeddings import Embeddings
from retrieval.identity import ModelMismatch, file_digest
from retrieval.faiss_parts import PART_ROWS
from retrieval.index import SearchIndex, add_to_index, build_indexes, load_index, write_index
from retrieval.image_query import export_image_query
from retrieval.query_encoder import export_text_query


def _model_copy(source: EmbeddingsFolder, info: dict[str, Any]
                ) -> tuple[Any, Callable, Callable, dict[str, str], dict[str, Any]]:
    """Load the embeddings folder's own model copy (before any index is built: a file that does
    not load fails at once, named as it is) and check it is the model its info names.

    Returns:
        ``(model, its eval transform, tokenizer, its identity, the file's digest)``.

    Raises:
        FileNotFoundError: no model copy; ValueError: one that does not load, or
            ``ModelMismatch``: the weights of another model than the info names.
    """
    from clipalign.model_source import load_model_source
    from retrieval.identity import model_identity

    if not source.model.is_file():
        raise FileNotFoundError(f"{source.model} is missing: an embeddings folder holds the model of its vectors")
    digest = file_digest(source.model)
    model, transform, tokenizer, meta = load_model_source(source.model)
    identity = model_identity(meta["model_name"], model.state_dict())
    named = info["model"]
    if any(identity[f] != named.get(f) for f in ("name", "weights_sha256")):  # the weights, not their label
        raise ModelMismatch(f"{source.model} holds model {identity['name']!r} "
                            f"(weights {identity['weights_sha256']}), not the {named.get('name')!r} (weights {named.get('weights_sha256')}) that "
                            f"{source.info} names")
    return model, transform, tokenizer, identity, digest


def build_index_folder(embeddings: str | os.PathLike, out: str | os.PathLike, *, kind: str = "auto",
                       max_memory: int = 4 << 30, target_recall: float = 0.95, seed: int = 0,
                       record_embeddings: bool = True, engine: str = "local", ray_address: str | None = None,
                       part_rows: int = PART_ROWS) -> tuple[SearchIndex, int]:
    """Build a tuned index folder at ``out`` over a complete embeddings folder.

    Args:
        kind: ``"auto"`` or an index type (see ``retrieval.choose``); ``max_memory`` is the
            budget of all targets' index files together.
        record_embeddings: name the embeddings folder in the info (not for a temporary one).
        engine: ``"local"`` (the vectors in this process's memory) or ``"ray"``: the parts of
            each index filled as Ray tasks on the cluster at ``ray_address``
            (``retrieval.ray_index``); the folder is the same either way.
        part_rows: rows of each part an index is filled in (``retrieval.faiss_parts.plan_target``).

    Returns:
        ``(the index, the number of vectors it holds)``.

    Raises:
        FileNotFoundError: not an embeddings folder, or it has no model copy.
        ValueError: unfinished embeddings, fewer than 2 vectors, a model copy that does not
            load or is not the info's model, no index within the budget, or ``out`` is a
            folder of something else.
        RuntimeError, ConnectionError: with ``engine="ray"``, Ray is missing or no cluster answers.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
    source = EmbeddingsFolder(embeddings)
    emb = Embeddings.open(source.root)
    if emb.count < 2:
        raise ValueError(f"{source.root} holds {emb.count} vectors; an index needs at least 2")
    model, transform, tokenizer, identity, digest = _model_copy(source, emb.info)
    options = {"kind": kind, "max_memory": max_memory, "target_recall": target_recall, "seed": seed,
               "part_rows": part_rows}
    if engine == "ray":
        from retrieval.ray_index import build_indexes_on_ray

        indexes, stats = build_indexes_on_ray(emb, address=ray_address, **options)
    else:
        indexes, stats = build_indexes({t: emb.vectors(t) for t in emb.targets}, emb.count, **options)
    with replaced_folder(out, IndexFolder(out).info.name) as tmp:
        folder = IndexFolder(tmp)
        # queries are embedded with the vectors' own model: the very file loaded and checked above
        replace_file(folder.model, lambda t: shutil.copyfile(source.model, t))
        if file_digest(folder.model) != digest:
            raise ValueError(f"{source.model} changed while the index was built; run 'clipalign index' again")
        fast = export_text_query(model, tokenizer, folder.root, identity)
        fast_images = export_image_query(model, transform, folder.root, identity)
        # "embeddings" records where the vectors came from; no query ever opens it
        info: dict[str, Any] = {"model": emb.info["model"]["name"], "model_identity": emb.info["model"],
                                "embeddings": str(source.root.resolve()) if record_embeddings else None,
                                "skipped": summary(source.root)["skipped"]}
        if emb.info.get("model_source") is not None:  # where the model came from: its kind, name and files
            info["model_source"] = emb.info["model_source"]
        if fast:
            info["text_query"] = fast
        if fast_images:
            info["image_query"] = fast_images
        write_index(folder.root, indexes, stats, emb.metadata_tables(), info)
    return load_index(out), emb.count


def add_to_index_folder(embeddings: str | os.PathLike, out: str | os.PathLike) -> tuple[SearchIndex, int, int]:
    """Append a complete embeddings folder to the index folder ``out``, made with the same model.
    Rows whose key ``out`` already holds are skipped: adding twice adds once.

    Returns:
        ``(the grown index, the number of vectors added, the number skipped as already indexed)``.

    Raises:
        FileNotFoundError: ``out`` or ``embeddings`` is not such a folder.
        KeyError, ValueError: unfinished embeddings, other targets; ``ModelMismatch`` for
            embeddings of another model.
    """
    vectors, rows, emb_info = load_embeddings(embeddings)
    old = load_index(out, mmap=True)
    old.check_model(emb_info["model"], emb_info["dim"])
    index, skipped = add_to_index(out, {t: vectors[t] for t in old.indexes if t in vectors}, rows)
    return index, len(rows) - skipped, skipped


def index_images(source: ModelSource | str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                 add: bool = False, batch_size: int = 256, precision: str = "fp32",
                 progress: Callable[..., Any] | None = None, engine: str = "local", ray_address: str | None = None,
                 num_gpus: float = 0, actors: int | None = None, **index_options: Any) -> tuple[SearchIndex, int, int]:
    """Embed the images (and captions) at ``data`` with the model of ``source`` (a checkpoint or
    run folder, or pretrained weights) into a temporary
    embeddings folder (float32), then build the index folder ``out`` from it, or with ``add``
    append to it.

    Args:
        progress: a tqdm-like factory for the embedding's progress bar.
        engine: ``"ray"`` embeds and builds on the Ray cluster at ``ray_address`` (``num_gpus``
            and ``actors`` as ``embed_folder``), the temporary folder beside ``out``, where
            every node sees it; an ``add`` is made in this process.
        index_options: ``kind``, ``max_memory``, ``target_recall``, ``seed`` of
            ``build_index_folder`` (unused with ``add``).

    Returns:
        ``(the index, the number of vectors this call put in, the number skipped as already
        indexed)`` (none skipped without ``add``).

    Raises:
        FileNotFoundError, KeyError, ValueError: as ``embed_folder`` and ``build_index_folder``
            (or ``add_to_index_folder``); ValueError too when no image at ``data`` decodes.
    """
    ray = {"engine": engine, "ray_address": ray_address}
    place = {}
    if engine == "ray":
        place = {"dir": Path(out).resolve().parent, "prefix": f".{Path(out).name}.embed-"}
        place["dir"].mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(**({"prefix": "clipalign-embed-"} | place)) as tmp:
        totals = embed_folder(source, data, tmp, captions=True, dtype="float32", batch_size=batch_size,
                              precision=precision, progress=progress, num_gpus=num_gpus, actors=actors, **ray)
        if not totals["count"]:
            raise ValueError(f"no decodable images in {data}")
        if add:
            return add_to_index_folder(Path(tmp), out)
        return (*build_index_folder(Path(tmp), out, record_embeddings=False, **ray, **index_options), 0)
