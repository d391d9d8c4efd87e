"""Data preparation: the synthetic corpus, manifest readers, image processing and shards.

Modules, one job each:

* ``synth``    -- the embedded synthetic shapes corpus (scenes, rendering, captions).
* ``manifest`` -- readers that stream CSV/TSV/JSONL manifests or caption folders as records.
* ``images``   -- decode, convert to RGB, resize and encode images (pure functions).
* ``shards``   -- a small writer stage around ``webdataset.ShardWriter``.
* ``evalsets`` -- writers for CLIP_benchmark's ``wds/`` classification and retrieval layouts.
* ``prep``     -- composes reader -> process -> writer into WebDataset training shards.
"""
