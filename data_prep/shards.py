"""Writer stages: samples in, tar shards out.

``ShardSink`` rolls numbered shards with ``webdataset.ShardWriter``; ``TarShard`` writes
one shard with the standard library (what ``prep``'s workers use); ``filter_tar`` drops
samples from a written shard.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from types import TracebackType
from typing import Mapping

Sample = Mapping[str, "bytes | str"]


class ShardSink:
    """Write samples to ``out_dir/<pattern % i>`` shards and count samples per shard.

    Tar members get a fixed mtime, owner and mode, so the same samples always give
    byte-identical shards. Values must already be encoded: ``bytes`` or ``str``
    (stored as UTF-8); ``__key__`` names the sample.

    Args:
        out_dir: Folder for the shards (created if missing).
        pattern: printf-style shard file name, e.g. ``"%05d.tar"`` or ``"%d.tar"``.
        maxcount: Samples per shard at most.
        maxsize: Bytes per shard at most (checked before each write, as ShardWriter does).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        pattern: str = "%05d.tar",
        maxcount: int = 10_000,
        maxsize: float = 3e9,
    ) -> None:
        if maxcount < 1:
            raise ValueError(f"maxcount must be >= 1, got {maxcount}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # ShardWriter applies `%` to the whole path, so protect any `%` in the folder.
        full_pattern = os.path.join(str(self.out_dir).replace("%", "%%"), pattern)
        self.sizes: dict[str, int] = {}
        self.total = 0
        import webdataset as wds  # here, not at the top: it imports torch (~2 s)

        self._writer = wds.ShardWriter(
            full_pattern,
            maxcount=maxcount,
            maxsize=maxsize,
            verbose=0,
            encoder=False,
            mtime=0.0,
        )
        self._note_shard()

    def _note_shard(self) -> None:
        self.sizes.setdefault(os.path.basename(self._writer.fname), 0)

    def write(self, sample: Sample) -> None:
        """Append one sample to the current shard (starting a new shard when full)."""
        if "__key__" not in sample:
            raise ValueError("sample has no __key__")
        encoded = {k: (v.encode("utf-8") if isinstance(v, str) and k != "__key__" else v) for k, v in sample.items()}
        self._writer.write(encoded)
        self._note_shard()
        self.sizes[os.path.basename(self._writer.fname)] += 1
        self.total += 1

    @property
    def shard_names(self) -> list[str]:
        """Shard file names in write order (the first one exists even if nothing was written)."""
        return list(self.sizes)

    def close(self) -> dict[str, int]:
        """Finish the last shard; return ``{shard file name: samples}``."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return dict(self.sizes)

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # The same fixed metadata webdataset.TarWriter writes with mtime=0: reproducible bytes.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = "bigdata"
    return info


class TarShard:
    """Write one tar shard, sample by sample, with the standard library.

    Members are ``<key>.<field>`` in sorted field order, like ``webdataset.TarWriter``.
    Values are ``bytes`` or ``str`` (stored as UTF-8).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._tar = tarfile.open(self.path, "w")
        self.count = 0

    def write(self, sample: Sample) -> None:
        """Append one sample (needs ``__key__``)."""
        key = sample.get("__key__")
        if not isinstance(key, str):
            raise ValueError("sample has no __key__")
        for field in sorted(k for k in sample if k != "__key__"):
            value = sample[field]
            data = value.encode("utf-8") if isinstance(value, str) else value
            self._tar.addfile(_tarinfo(f"{key}.{field}", len(data)), io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> TarShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def filter_tar(src: str | os.PathLike, dst: str | os.PathLike, drop_keys: set[str]) -> int:
    """Copy tar ``src`` to ``dst`` without the members of samples in ``drop_keys``; return members kept."""
    kept = 0
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin:
            if info.name.split(".", 1)[0] in drop_keys:
                continue
            tout.addfile(info, tin.extractfile(info))
            kept += 1
    return kept
