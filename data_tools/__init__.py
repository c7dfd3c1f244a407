"""Real media -> WebDataset shards: ``sources`` (folder trees, CSV/JSONL manifests), ``media`` (ffprobe/ffmpeg
normalisation of one input, in worker processes), ``build`` (parallel, resumable shard writing with a report
of every rejected input), ``check`` (``inspect`` and ``validate`` of shards). CLI: ``mmcl shards build |
inspect | validate``."""
