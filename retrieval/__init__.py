"""Retrieval: embeddings from a clipalign model into FAISS indexes, and search over them.

A stage: it imports the model library and the common formats (``clipalign.formats.folders``
owns what an embeddings and an index folder hold), never ``data_prep`` or the CLI.

* ``sources``  -- where images come from: shards (with member offsets) or an image folder, as units.
* ``embed``    -- units → resumable chunked embedding files (the embeddings folder).
* ``embeddings`` -- an embeddings folder's rows read without torch (a Ray task reads only its own).
* ``ray_embed`` -- ``embed --engine ray``: Ray Data over the units, one model per actor.
* ``ray_index`` -- ``index --engine ray``: the index's parts filled as Ray tasks, merged by the driver.
* ``identity`` -- a model's identity (name + weights hash), checked between embeddings, index and queries,
  and a file's (size + sha256), checked between an index's info and its files.
* ``choose``, ``tune`` -- the automatic index choice and the search-parameter tuning.
* ``faiss_parts`` -- one FAISS index trained on a sample, filled in parts, merged in row order, tuned.
* ``index``    -- FAISS indexes + metadata on disk, loaded memory-mapped.
* ``build``    -- whole index folders: from embeddings, in one step from shards, or appended to.
* ``atomic_folder`` -- a folder written in a temporary sibling and swapped into place whole.
* ``query_encoder`` -- the ONNX text tower that answers text queries without torch or open_clip.
* ``engine``   -- a query engine over an index folder; ``server``, ``page``, ``html``, ``thumbs``: the web side.
"""
