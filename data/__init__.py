"""TFDS dataset builders that TFDS lacks, with their fixtures.

Importing a subpackage registers its builder with TFDS, e.g.

  import data.tiny_imagenet  # registers "tiny_imagenet"
  ds = tfds.load("tiny_imagenet", split="validation", data_dir=...)
"""
