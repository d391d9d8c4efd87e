"""Data preparation: the synthetic corpus, manifest readers, image processing and shards.

Modules, one job each:

* ``synth``     -- the embedded synthetic shapes corpus (scenes, rendering, captions).
* ``manifest``  -- readers that stream CSV/TSV/JSONL (.gz)/Parquet manifests or caption folders as records.
* ``coco``      -- a reader for COCO captions files (one sample per image or per caption).
* ``fetch``     -- image bytes from disk or over HTTP(S): retries, timeouts, size/type/robots checks.
* ``captions``  -- caption normalisation and checks.
* ``images``    -- decode, filter, convert to RGB, resize and encode images (pure functions).
* ``tokens``    -- pre-tokenisation of captions (``tok.npy``).
* ``sample``    -- the per-record stage: record -> sample or skip reason.
* ``shards``    -- tar writers (``ShardSink`` around ``webdataset.ShardWriter``, ``TarShard``).
* ``shard_job`` -- one shard as a unit of work: built in a worker, committed in order.
* ``evalsets``  -- writers for CLIP_benchmark's ``wds/`` classification and retrieval layouts.
* ``prep``      -- composes reader -> shard jobs -> commit into resumable WebDataset training shards.
"""
