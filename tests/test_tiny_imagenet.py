"""Tests of the Tiny ImageNet builder on its fixture (offline, a few seconds).

The fixture, data/tiny_imagenet/dummy_data/, holds real images: 4 classes x 2
train images, 7 validation and 3 test images, 5 of them grayscale JPEGs, as an
extracted folder (folder/) and as the zip (zip/). Its wnids.txt is the full,
original one, because the builder requires the 200 classes in their order.
"""

import contextlib
import io
import shutil
import tempfile

from etils import epath
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from data import prepare
from data import tiny_imagenet

_DUMMY_DATA = epath.Path(tiny_imagenet.__file__).parent / "dummy_data"
_FOLDER = _DUMMY_DATA / "folder" / tiny_imagenet.layout.FOLDER_NAME
_SPLITS = {"train": 8, "validation": 7, "test": 3}
# Sources whose JPEG is single-channel ('L'), checked in test_fixture_*.
_GRAYSCALE = {
    "n03544143_0": "train/n03544143/images/n03544143_0.JPEG",
    "n03970156_1": "train/n03970156/images/n03970156_1.JPEG",
    "n03447447_2": "train/n03447447/images/n03447447_2.JPEG",
    "val_396": "val/images/val_396.JPEG",
    "test_9": "test/images/test_9.JPEG",
}


def _prepare(manual_dir: epath.PathLike, data_dir: str):
  return prepare.prepare(
      "tiny_imagenet", str(manual_dir), data_dir, overwrite=False
  )


def _examples(builder, split: str) -> dict[str, dict[str, np.ndarray]]:
  """Returns id -> example of one split, as numpy."""
  return {
      ex["id"].decode(): ex
      for ex in tfds.as_numpy(builder.as_dataset(split=split))
  }


def _annotations(root: epath.Path) -> dict[str, str]:
  """Reads val_annotations.txt independently of the builder: id -> wnid."""
  lines = (root / "val" / "val_annotations.txt").read_text().splitlines()
  return {
      line.split("\t")[0].removesuffix(".JPEG"): line.split("\t")[1]
      for line in lines
  }


class FolderLayoutTest(tfds.testing.DatasetBuilderTestCase):
  """The manual dir holds the extracted tiny-imagenet-200/."""

  DATASET_CLASS = tiny_imagenet.TinyImagenet
  EXAMPLE_DIR = _DUMMY_DATA / "folder"
  SPLITS = _SPLITS


class ZipLayoutTest(tfds.testing.DatasetBuilderTestCase):
  """The manual dir holds tiny-imagenet-200.zip."""

  DATASET_CLASS = tiny_imagenet.TinyImagenet
  EXAMPLE_DIR = _DUMMY_DATA / "zip"
  SPLITS = _SPLITS


class PreparedFixtureTest(tfds.testing.TestCase):
  """Checks the contents of the fixture once prepared."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.data_dir)
    cls.builder = _prepare(_DUMMY_DATA / "folder", cls.data_dir)

  def test_fixture_has_grayscale_sources(self):
    for name in _GRAYSCALE.values():
      self.assertEqual(PIL.Image.open(_FOLDER / name).mode, "L", name)

  def test_validation_labels_match_annotations(self):
    names = self.builder.info.features["label"].names
    labels = {
        i: names[ex["label"]]
        for i, ex in _examples(self.builder, "validation").items()
    }
    self.assertEqual(labels, _annotations(_FOLDER))

  def test_train_labels_come_from_folders(self):
    names = self.builder.info.features["label"].names
    for i, ex in _examples(self.builder, "train").items():
      self.assertEqual(names[ex["label"]], i.split("_")[0])

  def test_test_labels_are_minus_one(self):
    labels = [ex["label"] for ex in _examples(self.builder, "test").values()]
    self.assertEqual(labels, [tiny_imagenet.TEST_LABEL] * _SPLITS["test"])

  def test_grayscale_images_come_out_rgb_and_lossless(self):
    examples = {}
    for split in _SPLITS:
      examples.update(_examples(self.builder, split))
    for i, name in _GRAYSCALE.items():
      image = examples[i]["image"]
      self.assertEqual(image.shape, (64, 64, 3), i)
      self.assertEqual(image.dtype, np.uint8, i)
      gray = np.asarray(PIL.Image.open(_FOLDER / name))
      for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], gray, err_msg=i)

  def test_label_names_are_wnids_in_file_order(self):
    label = self.builder.info.features["label"]
    wnids = (_FOLDER / "wnids.txt").read_text().split()
    self.assertEqual(label.names, wnids)
    self.assertEqual(label.num_classes, tiny_imagenet.NUM_CLASSES)
    self.assertEqual(self.builder.info.features["image"].encoding_format, "png")

  def test_load_by_name_after_import(self):
    ds = tfds.load("tiny_imagenet", split="test", data_dir=self.data_dir)
    self.assertLen(list(ds), _SPLITS["test"])
    builder = tfds.builder("tiny_imagenet", data_dir=self.data_dir)
    self.assertEqual(builder.info.metadata["wnid_to_words"], {})

  def test_differences_from_the_full_dataset(self):
    problems = prepare.differences(
        self.builder,
        tiny_imagenet.EXPECTED_SPLIT_SIZES,
        tiny_imagenet.NUM_CLASSES,
    )
    self.assertLen(problems, 3)
    self.assertIn("validation: 7 examples, expected 10,000", problems)
    self.assertEmpty(
        prepare.differences(self.builder, _SPLITS, tiny_imagenet.NUM_CLASSES)
    )

  def test_prepare_run_warns_or_fails_on_a_sample(self):
    manual_dir = str(_DUMMY_DATA / "folder")
    with contextlib.redirect_stdout(io.StringIO()) as out:
      status = prepare.run("tiny_imagenet", manual_dir, self.data_dir)
    self.assertEqual(status, 0)
    self.assertIn("validation: 7 examples", out.getvalue())
    self.assertIn("WARNING: sizes differ", out.getvalue())
    with contextlib.redirect_stdout(io.StringIO()) as out:
      status = prepare.run(
          "tiny_imagenet", manual_dir, self.data_dir, expect_full=True
      )
    self.assertEqual(status, 1)
    self.assertIn("ERROR: not the full tiny_imagenet", out.getvalue())


class LayoutTest(tfds.testing.TestCase):
  """Other layouts, and broken ones that must fail naming the file."""

  def setUp(self):
    super().setUp()
    self.manual_dir = epath.Path(self.tmp_dir) / "manual"
    self.data_dir = str(epath.Path(self.tmp_dir) / "data")
    self.root = self.manual_dir / tiny_imagenet.layout.FOLDER_NAME
    shutil.copytree(_FOLDER, self.root)

  def assert_layout_error(self, regex: str):
    with self.assertRaisesRegex(tiny_imagenet.LayoutError, regex):
      _prepare(self.manual_dir, self.data_dir)

  def test_manual_dir_is_the_folder_and_words_go_to_metadata(self):
    (self.root / "words.txt").write_text(
        "n00001740\tentity\nn02056570\tking penguin, Aptenodytes patagonica\n"
    )
    builder = _prepare(self.root, self.data_dir)
    self.assertEqual(
        {s: builder.info.splits[s].num_examples for s in _SPLITS}, _SPLITS
    )
    reloaded = tfds.builder("tiny_imagenet", data_dir=self.data_dir)
    self.assertEqual(
        reloaded.info.metadata["wnid_to_words"],
        {"n02056570": "king penguin, Aptenodytes patagonica"},
    )

  def test_unknown_wnid_in_annotations(self):
    annotations = self.root / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    lines[1] = lines[1].replace("n03544143", "n99999999")
    annotations.write_text("\n".join(lines) + "\n")
    self.assert_layout_error(
        r"val/val_annotations\.txt:2: unknown wnid 'n99999999' for val_83\.JPEG"
    )

  def test_unknown_wnid_in_zipped_annotations_names_the_member(self):
    annotations = self.root / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_9.JPEG\tn0\n")
    shutil.make_archive(
        str(self.root), "zip", self.manual_dir, self.root.name
    )
    shutil.rmtree(self.root)
    self.assert_layout_error(
        r"tiny-imagenet-200\.zip \(member tiny-imagenet-200/val/"
        r"val_annotations\.txt\):8: unknown wnid 'n0'"
    )

  def test_listed_val_image_is_missing(self):
    (self.root / "val" / "images" / "val_14.JPEG").unlink()
    self.assert_layout_error(
        r"val_annotations\.txt lists val_14\.JPEG, but "
        r".*val/images/val_14\.JPEG is missing"
    )

  def test_unlisted_val_image(self):
    shutil.copy(
        self.root / "val" / "images" / "val_14.JPEG",
        self.root / "val" / "images" / "val_999.JPEG",
    )
    self.assert_layout_error(
        r"val/images/val_999\.JPEG is not listed in .*val_annotations\.txt"
    )

  def test_val_refolded_into_class_folders(self):
    # The layout that ImageFolder-style loaders want, and that gives ~1%.
    (self.root / "val" / "n02056570").mkdir()
    (self.root / "val" / "images" / "val_14.JPEG").rename(
        self.root / "val" / "n02056570" / "val_14.JPEG"
    )
    self.assert_layout_error(
        r"Unexpected file .*val/n02056570/val_14\.JPEG: val/ must hold only"
    )

  def test_unknown_wnid_train_folder(self):
    (self.root / "train" / "n03544143").rename(
        self.root / "train" / "n99999999"
    )
    self.assert_layout_error(
        r"Unknown wnid 'n99999999': folder .*train/n99999999 is not in "
        r".*wnids\.txt"
    )

  def test_wrong_image_size(self):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (32, 32)).save(buffer, format="JPEG")
    (self.root / "val" / "images" / "val_14.JPEG").write_bytes(
        buffer.getvalue()
    )
    self.assert_layout_error(
        r"Image .*val/images/val_14\.JPEG is 32x32, expected 64x64"
    )

  def test_missing_wnids_txt(self):
    (self.root / "wnids.txt").unlink()
    self.assert_layout_error(r"Missing .*tiny-imagenet-200/wnids\.txt")

  def test_wnids_txt_in_another_order(self):
    wnids = (self.root / "wnids.txt").read_text().split()
    (self.root / "wnids.txt").write_text("\n".join(wnids[::-1]) + "\n")
    self.assert_layout_error(r"wnids\.txt does not list .* line 1 is")

  def test_neither_layout(self):
    shutil.rmtree(self.root)
    (self.manual_dir / "notes.txt").write_text("not the dataset")
    self.assert_layout_error(
        r"No Tiny ImageNet in manual dir .*: expected tiny-imagenet-200\.zip"
    )

  def test_both_layouts(self):
    shutil.copy(
        _DUMMY_DATA / "zip" / tiny_imagenet.layout.ZIP_NAME, self.manual_dir
    )
    self.assert_layout_error(r"Ambiguous manual dir .*found both")


if __name__ == "__main__":
  tfds.testing.test_main()
