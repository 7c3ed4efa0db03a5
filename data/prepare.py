r"""Prepares a TFDS dataset from manually downloaded files, offline.

  python -m data.prepare tiny_imagenet --manual_dir=DIR --data_dir=DIR2 \
      [--expect_full] [--overwrite]

Runs `download_and_prepare` with `manual_dir` (nothing is downloaded), then
prints the split sizes and the number of classes and compares them with the
full dataset: a difference is a warning (a sample is smaller), or an error
with --expect_full.
"""

from typing import Sequence

from absl import app
from absl import flags
import tensorflow_datasets as tfds

import data.tiny_imagenet

_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Folder with the manually downloaded files.",
    required=True)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None,
    "TFDS data dir to write to (default: $TFDS_DATA_DIR or "
    "~/tensorflow_datasets).")
_EXPECT_FULL = flags.DEFINE_bool(
    "expect_full", False,
    "Exit with an error when the sizes differ from the full dataset.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "Regenerate even if this version is already prepared in data_dir.")

# Dataset name -> (split sizes, number of classes) of the full dataset.
_EXPECTED = {
    "tiny_imagenet": (
        data.tiny_imagenet.EXPECTED_SPLIT_SIZES,
        data.tiny_imagenet.NUM_CLASSES,
    ),
}


def prepare(
    name: str, manual_dir: str, data_dir: str | None, overwrite: bool
) -> tfds.core.DatasetBuilder:
  """Prepares dataset `name` from `manual_dir` into `data_dir`.

  Args:
    name: a registered TFDS dataset name.
    manual_dir: folder with the manually downloaded files.
    data_dir: TFDS data dir, or None for the TFDS default.
    overwrite: regenerate even if already prepared.

  Returns:
    The builder, prepared.
  """
  mode = (
      tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
      if overwrite
      else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  )
  builder = tfds.builder(name, data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir,
          download_mode=mode,
          # Feature statistics would cost a full pass; nothing here uses them.
          compute_stats=tfds.download.ComputeStatsMode.SKIP,
      )
  )
  return builder


def differences(
    builder: tfds.core.DatasetBuilder,
    expected_sizes: dict[str, int],
    expected_classes: int,
) -> list[str]:
  """Lists how the prepared sizes differ from the expected ones.

  Args:
    builder: a prepared builder.
    expected_sizes: split name -> expected number of examples.
    expected_classes: expected number of classes.

  Returns:
    One line per difference; empty when everything matches.
  """
  splits = builder.info.splits
  lines = []
  for split, expected in expected_sizes.items():
    actual = splits[split].num_examples if split in splits else 0
    if actual != expected:
      lines.append(f"{split}: {actual:,} examples, expected {expected:,}")
  num_classes = builder.info.features["label"].num_classes
  if num_classes != expected_classes:
    lines.append(f"classes: {num_classes}, expected {expected_classes}")
  return lines


def run(
    name: str,
    manual_dir: str,
    data_dir: str | None,
    expect_full: bool = False,
    overwrite: bool = False,
) -> int:
  """Prepares `name`, prints its sizes and checks them against the full set.

  Args:
    name: a key of `_EXPECTED`.
    manual_dir: folder with the manually downloaded files.
    data_dir: TFDS data dir, or None for the TFDS default.
    expect_full: return 1 when the sizes differ from the full dataset.
    overwrite: regenerate even if already prepared.

  Returns:
    The exit status: 0, or 1 when `expect_full` and the sizes differ.
  """
  builder = prepare(name, manual_dir, data_dir, overwrite)
  print(f"{builder.info.full_name} prepared in {builder.data_dir}")
  for split, info in builder.info.splits.items():
    print(f"  {split}: {info.num_examples:,} examples")
  print(f"  classes: {builder.info.features['label'].num_classes}")
  problems = differences(builder, *_EXPECTED[name])
  if not problems:
    print(f"OK: sizes match the full {name}.")
    return 0
  summary = "; ".join(problems)
  if expect_full:
    print(f"ERROR: not the full {name}: {summary}.")
    return 1
  print(
      f"WARNING: sizes differ from the full {name} ({summary}). Expected for "
      "a sample; pass --expect_full to make this an error."
  )
  return 0


def main(argv: Sequence[str]) -> int:
  if len(argv) != 2 or argv[1] not in _EXPECTED:
    raise app.UsageError(
        f"Usage: python -m data.prepare {{{','.join(_EXPECTED)}}} "
        "--manual_dir=DIR [--data_dir=DIR] [--expect_full] [--overwrite]"
    )
  return run(
      argv[1],
      _MANUAL_DIR.value,
      _DATA_DIR.value,
      expect_full=_EXPECT_FULL.value,
      overwrite=_OVERWRITE.value,
  )


if __name__ == "__main__":
  app.run(main)
