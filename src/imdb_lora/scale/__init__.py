"""Bulk scoring of review files: `imdb-lora score`, in-process (pyarrow) or on a Ray cluster (Ray Data).

sources  input files and folders (JSONL, CSV, Parquet; local paths or pyarrow filesystem URIs), read as
         Arrow batches that carry their id columns and where each row came from
batch    ScoreBatch: one loaded Classifier turning an Arrow batch into scored rows (the Ray actor)
engines  local (pyarrow only, no Ray import) and ray (map_batches over an actor pool); output Parquet
output   the output folder: where it may be (never on an input), its _imdb_lora_score.json marker
         (running/finished/failed), what --overwrite may replace (only a folder holding that marker), and
         its lock (local outputs: one job writes it at a time)
resume   --resume: a record of each finished input file, and continuing a stopped local job from them
"""
