"""Checkpoints: atomic writes, finding the latest, loading them safely, and rebuilding a model.

A checkpoint is untrusted input: every load is ``torch.load(weights_only=True)``, which
rebuilds tensors and plain types only and never runs code from the file. A file that does
not load that way, or does not hold a checkpoint, raises ``CheckpointError`` (one line naming
the file and the problem). Checkpoints of earlier versions, which pickled NumPy's RNG state,
are rewritten in the safe form by ``upgrade_checkpoint`` (``clipalign checkpoint upgrade``).
"""
from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

import torch

from clipalign.formats.atomic import replace_file
from clipalign.formats.folders import RunFolder
from clipalign.torch_files import ZIP_MAGIC, file_head, refused_objects, unsafe_globals

if TYPE_CHECKING:  # the model (and open_clip) is imported only to build one: a refused file costs no more than torch
    from clipalign.model import ClipAlign

# What an earlier clipalign's checkpoint pickled besides tensors and plain types: the ndarray
# of np.random.get_state() (numpy 1.x and 2.x module names).
_LEGACY_GLOBALS = frozenset({
    "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
})
CORRUPT, LEGACY, FOREIGN = "corrupt", "legacy", "foreign"


class CheckpointError(ValueError):
    """A file that is not a loadable clipalign checkpoint.

    Attributes:
        path: the file.
        problem: what is wrong with it (the message is ``"<path>: <problem>"``).
        kind: ``CORRUPT`` (truncated or damaged: an earlier checkpoint of the run may still
            load), ``LEGACY`` (an earlier clipalign's: ``upgrade_checkpoint`` rewrites it) or
            ``FOREIGN`` (not a clipalign checkpoint, or one that does not fit).
    """

    def __init__(self, path: str | os.PathLike, problem: str, kind: str = FOREIGN):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem, self.kind = Path(path), problem, kind


def _upgrade_hint(path: Path) -> str:
    return f"made by an earlier clipalign: run `clipalign checkpoint upgrade {path} --trust` if you trust it"


# -- writing -------------------------------------------------------------------------------------
class _Sink(io.RawIOBase):
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write: torch replaces
    it by a RuntimeError that no longer says why (a full disk, a file-size limit)."""

    def __init__(self, handle: IO[bytes]):
        super().__init__()
        self.handle, self.error = handle, None

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise


def _save_into(state: Any, handle: IO[bytes]) -> None:
    sink = _Sink(handle)
    try:
        torch.save(state, sink)
    except RuntimeError:
        if sink.error is None:
            raise
        raise sink.error from None


def _write_atomically(path: Path, dump: Callable[[IO[bytes]], None]) -> Path:
    """``replace_file`` with ``dump(handle)`` writing the temporary file, synced before the rename
    (a crash must not leave the new name on a torn file); a failed write leaves no temporary
    file, and its ``OSError`` names ``path``."""
    def write(tmp: Path) -> None:
        try:
            with tmp.open("wb") as handle:
                dump(handle)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno is None:
                raise
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    return replace_file(path, write)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file, then rename: a killed write never leaves a torn file.

    Raises:
        OSError: the write failed (read-only folder, full disk, ...), naming ``path``; no
            temporary file is left behind.
    """
    return _write_atomically(Path(path), lambda handle: _save_into(state, handle))


# -- finding -------------------------------------------------------------------------------------
def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return RunFolder(run_dir).checkpoint(step)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoints, oldest first."""
    folder = RunFolder(run_dir).checkpoints  # the file names are RunFolder's: no pattern of them here
    found = [p for p in folder.iterdir() if RunFolder.checkpoint_step(p) is not None] if folder.is_dir() else []
    return sorted(found, key=RunFolder.checkpoint_step)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep <= 0`` keeps all)."""
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in run folder {path}")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


# -- reading -------------------------------------------------------------------------------------
def _refusal(path: Path) -> CheckpointError:
    """Why ``weights_only`` refused ``path``: the globals its pickle names, read without running it."""
    names = unsafe_globals(path)
    if names and set(names) <= _LEGACY_GLOBALS:
        return CheckpointError(path, _upgrade_hint(path), LEGACY)
    return CheckpointError(path, f"not a clipalign checkpoint: {refused_objects(names)} "
                                 "(refused: files are loaded without running code)")


def _torch_file(path: str | os.PathLike) -> Path:
    """``path``, unless it is empty or not a zip archive (what ``torch.save`` writes)."""
    path = Path(path)
    head = file_head(path)
    if not head:
        raise CheckpointError(path, "empty file (truncated or corrupt)", CORRUPT)
    if head != ZIP_MAGIC:
        raise CheckpointError(path, "not a clipalign checkpoint (not a file torch.save writes)")
    return path


def read_weights_file(path: str | os.PathLike) -> Any:
    """What ``torch.save`` wrote to ``path``, loaded with ``weights_only=True``.

    Raises:
        CheckpointError: empty, truncated or corrupt, not written by ``torch.save``, or
            holding anything but tensors and plain types (it would run code).
        OSError: the file cannot be read (naming it).
    """
    path = _torch_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _refusal(path) from None
    except OSError as err:
        if err.filename is not None:  # the file itself could not be opened or read
            raise
        # torch's zip reader seeks by the damaged archive's offsets: EINVAL, naming nothing
        raise CheckpointError(path, "truncated or corrupt", CORRUPT) from None
    except Exception:  # torch's reader raises RuntimeError, EOFError, KeyError, ... on damaged archives
        if zipfile.is_zipfile(path) and not _holds_pickle(path):
            raise CheckpointError(path, "not a clipalign checkpoint (a zip archive torch.save did not write)") from None
        raise CheckpointError(path, "truncated or corrupt", CORRUPT) from None


def _holds_pickle(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def check_checkpoint(path: str | os.PathLike, state: Any) -> dict[str, Any]:
    """``state`` if it is a clipalign checkpoint (``model_name`` and ``model`` weights), else
    ``CheckpointError`` naming ``path``."""
    if isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path, "not a clipalign checkpoint: a plain state dict (an open_clip export? "
                                    "`clipalign train --pretrained` starts from one)")
    if not isinstance(state, Mapping):
        raise CheckpointError(path, f"not a clipalign checkpoint (it holds a {type(state).__name__})")
    weights = state.get("model")
    if not isinstance(state.get("model_name"), str) or not isinstance(weights, Mapping) or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise CheckpointError(path, "not a clipalign checkpoint (no model_name and model weights)")
    return dict(state)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint in a file, or in a run folder's latest, loaded without running code.

    Raises:
        FileNotFoundError: no such file, or a run folder without checkpoints.
        CheckpointError: the file is not a loadable clipalign checkpoint.
    """
    path = resolve_checkpoint(path)
    return check_checkpoint(path, read_weights_file(path))


def load_model(path: str | os.PathLike) -> tuple[ClipAlign, Callable, Callable, dict[str, Any]]:
    """Rebuild a trained model for inference from a checkpoint file or run folder.

    Returns:
        ``(model in eval mode, eval image transform, tokenizer, checkpoint metadata)``.

    Raises:
        FileNotFoundError, CheckpointError: as ``load_checkpoint``; ``CheckpointError`` also
            for weights of an unknown model or that do not fit its architecture.
    """
    path = resolve_checkpoint(path)
    return build_model(path, load_checkpoint(path))


def build_model(path: Path, state: dict[str, Any]) -> tuple[ClipAlign, Callable, Callable, dict[str, Any]]:
    """``load_model`` for the checked checkpoint ``state`` already read from ``path``
    (``clipalign.model_source`` registers a carried architecture in between)."""
    from clipalign.factory import create_model_and_transforms, get_model_config, get_tokenizer

    name, weights = state["model_name"], state["model"]
    if ":" in name:  # open_clip would fetch an "hf-hub:" config, or read a "local-dir:" one
        raise CheckpointError(path, f"names model {name!r}, which is not a model name (refused: nothing is fetched)")
    try:
        get_model_config(name)
    except ValueError:
        raise CheckpointError(path, f"made with model {name!r}, which this clipalign does not know") from None
    has_head = any(k.startswith("mlm_head.") for k in weights)
    has_bias = "clip.logit_bias" in weights  # SigLIP-trained
    fusion = {k.split(".")[2] for k in weights if k.startswith("mlm_fusion.blocks.")}
    model, _, eval_tf = create_model_and_transforms(
        name, mlm_head=has_head, mlm_condition="image" if fusion else "none", fusion_layers=max(1, len(fusion)),
        init_logit_bias=0.0 if has_bias else None)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # missing, unexpected or misshapen weights
        detail = str(err).strip().splitlines()[-1].strip()[:200]
        raise CheckpointError(path, f"its weights do not fit model {name!r} ({detail})") from None
    model.eval()
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler", "rng")}
    meta["path"] = str(path.resolve())
    return model, eval_tf, get_tokenizer(name), meta


def load_latest(run_dir: str | os.PathLike, require: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of a run that loads, and its state; ``None`` if the run has none.

    A truncated or corrupt checkpoint (a write cut short by a crash or a full disk) is passed
    over, with a warning, for the one before it; any other ``CheckpointError`` stands.

    Args:
        require: keys the checkpoint must hold (a training state: ``clipalign.resume.TRAINING_STATE``).

    Raises:
        CheckpointError: the newest loadable file lacks a ``require``d key or is no
            checkpoint, or none of the run's checkpoints loads.
    """
    broken: list[Path] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            if err.kind != CORRUPT:
                raise
            broken.append(path)
            continue
        missing = [key for key in require if key not in state]
        if missing:
            raise CheckpointError(path, f"holds no training state to resume ({', '.join(missing)} missing)")
        if broken:
            more = f" (and {len(broken) - 1} later ones)" if len(broken) > 1 else ""
            warnings.warn(f"{broken[-1]}{more} is truncated or corrupt: resuming from the earlier {path.name}",
                          stacklevel=2)
        return path, state
    if broken:
        raise CheckpointError(broken[0], "truncated or corrupt, and no earlier checkpoint of the run loads", CORRUPT)
    return None


# -- upgrading -----------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """``value`` with NumPy arrays as tensors and NumPy scalars as Python numbers, at any depth.

    Containers are changed in place, so that a state dict keeps its type and ``_metadata``.
    """
    import numpy as np

    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (dict, list)):
        for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
            value[key] = _plain(item)
    elif type(value) is tuple:  # (a named tuple stays as it is, and the safe load below refuses it)
        return tuple(_plain(item) for item in value)
    return value


def upgrade_checkpoint(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Rewrite a checkpoint of an earlier clipalign in the form ``load_checkpoint`` accepts.

    It unpickles the file with ``weights_only=False``, which runs whatever code the file
    holds: only for files you trust. The NumPy RNG state becomes plain types; the new file
    (``out``, default ``path`` itself) is written atomically and checked to load safely.

    Raises:
        CheckpointError: the file is not a checkpoint, or holds objects with no safe form.
    """
    from clipalign.resume import upgrade_rng_state

    path = _torch_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=False)
    except OSError as err:
        if err.filename is not None:
            raise
        raise CheckpointError(path, "truncated or corrupt", CORRUPT) from None
    except Exception:
        raise CheckpointError(path, "truncated or corrupt", CORRUPT) from None
    state = check_checkpoint(path, state)
    if isinstance(state.get("rng"), dict):
        state["rng"] = upgrade_rng_state(state["rng"])
    state = _plain(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        buffer.seek(0)
        torch.load(buffer, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        buffer.seek(0)
        names = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(buffer)))
        raise CheckpointError(path, f"holds objects with no safe form ({', '.join(names[:3]) or 'unknown'})") from None
    data = buffer.getvalue()
    return _write_atomically(Path(out) if out is not None else path, lambda handle: handle.write(data))
