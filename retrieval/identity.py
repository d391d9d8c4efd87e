"""Identities: a model's (its name and a hash of its weights), so an index is only queried by its own
model, and a file's (its size and sha256), so an index folder's files are the ones its info records."""
from __future__ import annotations

import hashlib
import io
import os
from typing import Any, Mapping


class ModelMismatch(ValueError):
    """A query model (or its embedding dimension) differs from the one the index was built with."""


def weights_hash(state_dict: Mapping[str, Any]) -> str:
    """sha256 over the parameter names, shapes, dtypes and bytes, in name order (first 16 hex digits)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(name: str, state_dict: Mapping[str, Any]) -> dict[str, str]:
    return {"name": name, "weights_sha256": weights_hash(state_dict)}


def check_model(expected: Mapping[str, Any], got: Mapping[str, Any], expected_dim: int, got_dim: int) -> None:
    """Raise ``ModelMismatch`` unless the query model is the index's model, with the same dimension."""
    if got_dim != expected_dim:
        raise ModelMismatch(f"the query model embeds into {got_dim} dimensions, the index holds {expected_dim}-d vectors: "
                            "search with the model the index was built with")
    for field in ("name", "weights_sha256"):
        if expected.get(field) and got.get(field) and expected[field] != got[field]:
            raise ModelMismatch(f"the index was built with model {expected.get('name')!r} (weights {expected.get('weights_sha256')}), "
                                f"the query model is {got.get('name')!r} (weights {got.get('weights_sha256')}): "
                                "search with the model the index was built with")


# Files above this are hashed by their size and their two ends only: hashing all of a
# multi-GB index at every load would cost seconds. A file swapped for another index's, or
# rebuilt, differs in its size or its ends (the FAISS header, trained quantizers and first
# codes at the front, the last codes and ids at the back) unless crafted to match them.
HASH_WHOLE_BELOW = 256 << 20
HASH_ENDS = 16 << 20
WHOLE, ENDS = "all", "size and first and last 16 MiB"  # the two ways, as records name them


def file_digest(path: str | os.PathLike | None = None, whole: bool | None = None, data: bytes | None = None
                ) -> dict[str, Any]:
    """``{"size", "sha256", "hashed"}`` of a file (or of its bytes ``data``, already read):
    sha256 of all of it or (``whole=False``, and by default past ``HASH_WHOLE_BELOW`` bytes) of
    its size and its first and last ``HASH_ENDS`` bytes."""
    with (io.BytesIO(data) if data is not None else open(path, "rb")) as f:
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
        whole = size <= HASH_WHOLE_BELOW if whole is None else whole
        h = hashlib.sha256()
        if whole:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(HASH_ENDS))
            f.seek(max(0, size - HASH_ENDS))
            h.update(f.read(HASH_ENDS))
    return {"size": size, "sha256": h.hexdigest(), "hashed": WHOLE if whole else ENDS}


def check_digest(path: str | os.PathLike, recorded: Mapping[str, Any] | None, record_name: str,
                 shown: str | os.PathLike | None = None, data: bytes | None = None) -> None:
    """Raise ``ValueError`` unless the file ``path`` (or its bytes ``data``, already read; named
    ``shown`` in the message) is the one ``recorded`` describes; no record (folders written before
    records were kept) passes."""
    if recorded is None:
        return
    got = file_digest(path, recorded.get("hashed") != ENDS, data)
    if (got["size"], got["sha256"]) != (recorded.get("size"), recorded.get("sha256")):
        raise ValueError(f"{shown or path} is not the file {record_name} records (its size or sha256 differs): "
                         "the folder was changed after it was written; rebuild it with 'clipalign index'")
