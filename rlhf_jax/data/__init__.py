"""Data: JSONL readers -> TFDS array_record datasets -> grain pipelines -> batches.

  jsonl           line-numbered readers (demonstrations, Alpaca seed tasks, preferences, HH)
  tfds_builders   prepare / load / read_metadata of array_record datasets (no TensorFlow)
  collate         tokenize one record into the batch layouts of ARCHITECTURE.md
  pipeline        seeded, checkpointable train iterator; fixed eval batches
"""
