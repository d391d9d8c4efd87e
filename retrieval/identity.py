"""Model identity: the name and a hash of the weights, so an index is only queried by its own model."""
from __future__ import annotations

import hashlib
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
