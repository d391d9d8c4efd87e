"""The common layer: every contract that two stages share, each in exactly one module.

Nothing here imports the model library, a stage or the CLI; everything above imports from here.

- ``atomic``: temp-then-rename writes.
- ``skips``: the skip reasons and the counter that every stage reports them with.
- ``images``: the image file extensions, the one folder walk and the one image decoder.
- ``sample``: a shard sample's keys and how its image, captions and token ids are read.
- ``evalset``: CLIP_benchmark's ``wds/`` evaluation-set layout.
- ``folders``: what a run, an embeddings and an index folder hold.
"""
