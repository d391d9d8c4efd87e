"""Run ``open_clip_train`` as installed, with the two adjustments it needs on this machine.

    python scripts/run_open_clip_train.py [--model-config-dir DIR] [--math-attention] -- OPEN_CLIP_TRAIN_ARGS...

- open_clip_train 3.3.0 groups tar members with its own ``group_by_keys_nothrow``, which fails
  (``KeyError: 'fname'``) on the end-of-shard marker that webdataset 1.0.2's
  ``tar_file_expander`` yields; ``eof_value=None`` turns the marker off (open_clip#935,
  webdataset#384; ../shared/MEASURED.md).
- ``--model-config-dir`` registers JSON model configs (clipalign's own) by name, as
  ``open_clip.add_model_config`` does, so ``--model ca-small`` names the same architecture.

``--math-attention`` runs it under PyTorch's math attention kernels, the setting clipalign's
trainer uses on CPUs: it shows how much of a speed difference that one setting explains.
Used by ``scripts/bench_train.py``; needs pandas, which open_clip_train imports.
"""
from __future__ import annotations

import argparse
import functools
import sys

import open_clip
import open_clip_train.data
import webdataset.tariterators
from open_clip_train.main import main as open_clip_train_main

from clipalign.precision import attention_backend


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config-dir", default=None, help="folder of JSON model configs to register")
    p.add_argument("--math-attention", action="store_true", help="force the math attention kernels")
    args, rest = p.parse_known_args(argv)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if args.model_config_dir:
        open_clip.add_model_config(args.model_config_dir)
    open_clip_train.data.tar_file_expander = functools.partial(webdataset.tariterators.tar_file_expander, eof_value=None)
    with attention_backend("math" if args.math_attention else "auto"):
        open_clip_train_main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
