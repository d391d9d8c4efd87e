"""Data preparation: the synthetic corpus, manifest readers, image processing and shards.

A stage: it imports the model library (``clipalign``) and the common formats
(``clipalign.formats``: sample keys, image extensions, skip reasons, the ``wds/`` layout),
never ``retrieval`` or the CLI.

Modules, one job each:

* ``scenes``    -- the synthetic scenes: vocabulary, held-out pairs, sampling, rendering, true captions.
* ``synth``     -- the embedded synthetic corpus written from the scenes (train manifest, eval sets).
* ``records``   -- ``Record``, one input row as every reader yields it, and ``ManifestError``.
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
* ``labelled``  -- labelled image collections: an ImageFolder tree or an (image, label) manifest.
* ``evalprep``  -- a user's labelled or captioned images written as ``wds/`` evaluation sets.
* ``eval_source`` -- any evaluation source (``wds/``, ImageFolder, label manifest) opened as an ``EvalSet``.
* ``memory``    -- keep freed heap pages in workers (glibc ``mallopt``).
* ``resample``  -- torch's uint8 bicubic resize for prep.
* ``splits``    -- where each shard's rows start in a CSV/TSV/JSONL or Parquet manifest, without reading them.
* ``ranges``    -- a manifest's records read from a row range, as a Ray task reads its shard's.
* ``shard_plan`` -- a run's shard jobs: which are left, and their rows or the row range their task reads.
* ``retry``     -- ``--retry-failed``: only the rows that failed for a reason that may pass, fetched again.
* ``ray_prep``  -- shard jobs as Ray tasks (``--engine ray``), retried when a worker dies.
* ``prep``      -- composes reader -> shard jobs -> commit into resumable WebDataset training shards.
"""
