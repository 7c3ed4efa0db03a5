"""TFDS builder for Tiny ImageNet (200 classes, 64x64 RGB), from manual files.

Prepare it offline with

  python -m data.prepare tiny_imagenet --manual_dir=DIR --data_dir=DIR2

Features:
  image: uint8 (64, 64, 3). Every source JPEG is decoded to RGB (the ~2%
    grayscale ones are converted, never dropped) and re-encoded as PNG, which
    is lossless: the stored pixels are exactly the decoded source pixels.
  label: ClassLabel whose names are the 200 wnids of `wnids.txt`, in file
    order (shipped as `labels.txt`, so `num_classes` is known before any data
    is prepared). The test split is unlabelled: its label is -1.
  id: the source file name stem ('n01443537_0', 'val_17', 'test_3'), also the
    example key.
Human-readable class names are not a feature: when the manual files include
`words.txt`, `info.metadata["wnid_to_words"]` maps each wnid to its words
(e.g. 'n02124075' -> 'Egyptian cat'); it is empty otherwise.
"""

import io
from typing import Any, Iterator

from etils import epath
import PIL.Image
import tensorflow_datasets as tfds

from data.tiny_imagenet import layout

NUM_CLASSES = 200
# Split sizes of the full dataset; a sample has fewer.
EXPECTED_SPLIT_SIZES = {"train": 100_000, "validation": 10_000, "test": 10_000}
IMAGE_SHAPE = (64, 64, 3)
# A copy of the original `wnids.txt`: label i is line i + 1.
_LABELS_FILE = epath.Path(__file__).parent / "labels.txt"

_DESCRIPTION = """\
Tiny ImageNet: 200 ImageNet classes at 64x64, with 500 train, 50 validation
and 50 unlabelled test images per class. Labels index the wnids of wnids.txt
in file order; test labels are -1. Images are re-encoded as PNG (lossless)
after decoding to RGB. `id` is the source file name stem.
"""

_CITATION = """\
@misc{le2015tiny,
  title={Tiny ImageNet Visual Recognition Challenge},
  author={Le, Ya and Yang, Xuan},
  howpublished={CS 231N, Stanford University},
  year={2015}
}
"""


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
  """Tiny ImageNet from `tiny-imagenet-200.zip` or its extracted folder."""

  name = "tiny_imagenet"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Download {layout.ZIP_NAME} (http://cs231n.stanford.edu/{layout.ZIP_NAME})
  and put in the manual dir exactly one of: the zip itself, the extracted
  folder {layout.FOLDER_NAME}/, or the contents of that folder. Keep the
  original layout: validation labels are read only from
  val/val_annotations.txt, so do not re-fold val/ into class folders.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=IMAGE_SHAPE, encoding_format="png"
            ),
            "label": tfds.features.ClassLabel(names_file=_LABELS_FILE),
            "id": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://www.kaggle.com/c/tiny-imagenet",
        citation=_CITATION,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(
      self, dl_manager: tfds.download.DownloadManager
  ) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
    """Checks the whole layout (names only) before any image is written."""
    tree = layout.find_tree(dl_manager.manual_dir)
    plan = layout.read_plan(tree, self.info.features["label"].names)
    self.info.metadata["wnid_to_words"] = plan.words
    return {
        split: self._generate_examples(tree, examples)
        for split, examples in plan.splits.items()
    }

  def _generate_examples(
      self, tree: layout.Tree, examples: list[layout.Example]
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields (id, example); images are decoded here, one at a time."""
    with tree.reader() as read:
      for example in examples:
        image = decode_rgb(read(example.name), tree.where(example.name))
        yield example.id, {
            "image": image,
            "label": example.label,
            "id": example.id,
        }


def decode_rgb(data: bytes, where: str) -> PIL.Image.Image:
  """Decodes one source image to a 64x64 RGB image.

  Args:
    data: the encoded image.
    where: its location, for error messages.

  Returns:
    The image in RGB mode (grayscale sources get three equal channels).

  Raises:
    layout.LayoutError: if the image cannot be decoded or is not 64x64.
  """
  try:
    image = PIL.Image.open(io.BytesIO(data))
    image.load()
  except (PIL.UnidentifiedImageError, OSError) as e:
    raise layout.LayoutError(f"Cannot decode image {where}: {e}") from e
  height, width = IMAGE_SHAPE[:2]
  if image.size != (width, height):
    raise layout.LayoutError(
        f"Image {where} is {image.size[0]}x{image.size[1]}, expected "
        f"{width}x{height}."
    )
  return image.convert("RGB")
