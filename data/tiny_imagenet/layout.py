"""Finds the Tiny ImageNet files in a manual directory and checks their layout.

Plain Python (no TensorFlow), so that every layout rule is in one readable
place. The manual directory holds exactly one of:

  * `tiny-imagenet-200.zip`, as downloaded;
  * `tiny-imagenet-200/`, the extracted folder;
  * the contents of that folder (the manual directory *is* the folder).

Inside, the layout of the original archive is required:

  wnids.txt                              the 200 class wnids, one a line
  words.txt                              optional: `<wnid>\\t<words>` lines
  train/<wnid>/images/<wnid>_<k>.JPEG    label = the folder's wnid
  train/<wnid>/<wnid>_boxes.txt          ignored
  val/val_annotations.txt                `<file>\\t<wnid>\\t<box>` lines
  val/images/val_<k>.JPEG                label = its line in the annotations
  test/images/test_<k>.JPEG              unlabelled (label -1)

Validation labels come only from `val/val_annotations.txt`, and every file in
`val/images/` must be listed there exactly once. Taking validation labels from
folders instead (all of `val/images/` then falls into one class) is the
well-known bug that yields ~1% validation accuracy; a `val/` re-folded into
class folders is therefore rejected rather than guessed at.
"""

import collections
import contextlib
import dataclasses
import pathlib
from typing import Callable, Iterator
import zipfile

from etils import epath

ZIP_NAME = "tiny-imagenet-200.zip"
FOLDER_NAME = "tiny-imagenet-200"
TEST_LABEL = -1

_WNIDS = "wnids.txt"
_WORDS = "words.txt"
_ANNOTATIONS = "val/val_annotations.txt"
# Entries that mark a folder as an extracted Tiny ImageNet.
_MARKERS = (_WNIDS, "train", "val", "test")
# Subtrees read from a folder; anything else in the manual dir is ignored.
_TOP_LEVEL_FILES = (_WNIDS, _WORDS)
_SUBTREES = ("train", "val", "test")


class LayoutError(ValueError):
  """The manual files do not have the layout of `tiny-imagenet-200.zip`."""


@dataclasses.dataclass(frozen=True)
class Tree:
  """A read-only view of one extracted Tiny ImageNet (folder or zip).

  Attributes:
    root: the folder holding `wnids.txt`, or the zip file.
    prefix: inside a zip, the folder holding `wnids.txt` ('' or
      'tiny-imagenet-200/'); always '' for a folder.
    names: relative POSIX paths of all files of interest (no folders).
    is_zip: whether `root` is a zip file.
  """

  root: epath.Path
  prefix: str
  names: frozenset[str]
  is_zip: bool

  def where(self, name: str) -> str:
    """Returns a full, human-readable location of `name`, for messages."""
    if self.is_zip:
      return f"{self.root} (member {self.prefix}{name})"
    return str(self.root / name)

  @contextlib.contextmanager
  def reader(self) -> Iterator[Callable[[str], bytes]]:
    """Yields a function that returns the bytes of a relative name."""
    if not self.is_zip:
      yield lambda name: (self.root / name).read_bytes()
      return
    with self.root.open("rb") as f, zipfile.ZipFile(f) as archive:
      yield lambda name: archive.read(self.prefix + name)


@dataclasses.dataclass(frozen=True)
class Example:
  """One image to write.

  Attributes:
    id: the file name stem, e.g. 'val_17'; unique within its split.
    name: the relative path of the image inside the tree.
    label: the class wnid, or TEST_LABEL for the unlabelled test split.
  """

  id: str
  name: str
  label: str | int


@dataclasses.dataclass(frozen=True)
class Plan:
  """The checked contents of a tree.

  Attributes:
    words: wnid -> human-readable words from `words.txt` (empty if absent).
    splits: split name ('train', 'validation', 'test') -> examples, sorted.
  """

  words: dict[str, str]
  splits: dict[str, list[Example]]


def find_tree(manual_dir: epath.PathLike) -> Tree:
  """Finds the one Tiny ImageNet layout in `manual_dir`.

  Args:
    manual_dir: the TFDS manual directory.

  Returns:
    A view of the zip or of the extracted folder.

  Raises:
    LayoutError: if neither or several layouts are present.
  """
  manual_dir = epath.Path(manual_dir)
  found = []
  if (manual_dir / ZIP_NAME).exists():
    found.append(manual_dir / ZIP_NAME)
  if (manual_dir / FOLDER_NAME).is_dir():
    found.append(manual_dir / FOLDER_NAME)
  if any((manual_dir / marker).exists() for marker in _MARKERS):
    found.append(manual_dir)
  if not found:
    present = sorted(p.name for p in manual_dir.iterdir())[:10]
    raise LayoutError(
        f"No Tiny ImageNet in manual dir {manual_dir}: expected {ZIP_NAME}, "
        f"the extracted folder {FOLDER_NAME}/, or that folder's contents "
        f"(wnids.txt, train/, val/, test/). Found: {present}"
    )
  if len(found) > 1:
    raise LayoutError(
        f"Ambiguous manual dir {manual_dir}: found both "
        f"{' and '.join(str(p) for p in found)}. Keep exactly one of "
        f"{ZIP_NAME} or the extracted {FOLDER_NAME}/."
    )
  if found[0].name == ZIP_NAME:
    return _zip_tree(found[0])
  return _folder_tree(found[0])


def _is_ignored(name: str) -> bool:
  """Skips OS litter such as `.DS_Store` and `__MACOSX/`."""
  return any(
      part.startswith(".") or part == "__MACOSX" for part in name.split("/")
  )


def _folder_tree(root: epath.Path) -> Tree:
  """Lists the files of interest of an extracted folder."""
  names = {name for name in _TOP_LEVEL_FILES if (root / name).is_file()}
  for subtree in _SUBTREES:
    if (root / subtree).is_dir():
      for folder, _, files in (root / subtree).walk():
        relative = folder.relative_to(root).as_posix()
        names.update(f"{relative}/{file}" for file in files)
  names = frozenset(name for name in names if not _is_ignored(name))
  if _WNIDS not in names:
    raise LayoutError(f"Missing {root / _WNIDS}: it defines the classes.")
  return Tree(root=root, prefix="", names=names, is_zip=False)


def _zip_tree(zip_path: epath.Path) -> Tree:
  """Lists the members of a zip and finds the folder holding `wnids.txt`."""
  with zip_path.open("rb") as f, zipfile.ZipFile(f) as archive:
    members = [
        m for m in archive.namelist()
        if not m.endswith("/") and not _is_ignored(m)
    ]
  wnids_files = [
      m for m in members if m.rsplit("/", 1)[-1] == _WNIDS and m.count("/") <= 1
  ]
  if len(wnids_files) != 1:
    raise LayoutError(
        f"Expected one {FOLDER_NAME}/{_WNIDS} (or top-level {_WNIDS}) in "
        f"{zip_path}, found {wnids_files or 'none'}."
    )
  prefix = wnids_files[0][: -len(_WNIDS)]
  names = frozenset(m[len(prefix):] for m in members if m.startswith(prefix))
  return Tree(root=zip_path, prefix=prefix, names=names, is_zip=True)


def read_plan(tree: Tree, class_names: list[str]) -> Plan:
  """Checks the layout of `tree` and lists the examples of each split.

  Args:
    tree: the tree returned by `find_tree`.
    class_names: the expected wnids, in the order of `wnids.txt`.

  Returns:
    The words of each class and the examples of each split.

  Raises:
    LayoutError: naming the file, if anything deviates from the layout.
  """
  with tree.reader() as read:
    _check_wnids(tree, _read_text(tree, read, _WNIDS), class_names)
    words = _parse_words(tree, read, set(class_names))
    annotations = _parse_annotations(tree, read, set(class_names))
  splits = {
      "train": _train_examples(tree, set(class_names)),
      "validation": _validation_examples(tree, annotations),
      "test": _test_examples(tree),
  }
  for split, examples in splits.items():
    _check_unique_ids(tree, split, examples)
  return Plan(words=words, splits=splits)


def _read_text(tree: Tree, read: Callable[[str], bytes], name: str) -> str:
  try:
    return read(name).decode("utf-8")
  except UnicodeDecodeError as e:
    raise LayoutError(f"{tree.where(name)} is not UTF-8 text: {e}") from e


def _check_wnids(tree: Tree, text: str, class_names: list[str]) -> None:
  """Requires `wnids.txt` to list exactly `class_names`, in order."""
  wnids = [line.strip() for line in text.splitlines() if line.strip()]
  if wnids == class_names:
    return
  if len(wnids) != len(class_names):
    detail = f"it has {len(wnids)} wnids, expected {len(class_names)}"
  else:
    i = next(i for i, (a, b) in enumerate(zip(wnids, class_names)) if a != b)
    detail = f"line {i + 1} is {wnids[i]!r}, expected {class_names[i]!r}"
  raise LayoutError(
      f"{tree.where(_WNIDS)} does not list the Tiny ImageNet classes in their "
      f"original order: {detail}."
  )


def _parse_words(
    tree: Tree, read: Callable[[str], bytes], known: set[str]
) -> dict[str, str]:
  """Reads `words.txt` (all of ImageNet) and keeps the known wnids."""
  if _WORDS not in tree.names:
    return {}
  words = {}
  for number, line in enumerate(_read_text(tree, read, _WORDS).splitlines()):
    if not line.strip():
      continue
    fields = line.split("\t", 1)
    if len(fields) != 2:
      raise LayoutError(
          f"{tree.where(_WORDS)}:{number + 1}: expected '<wnid>\\t<words>', "
          f"got {line!r}"
      )
    if fields[0] in known:
      words[fields[0]] = fields[1].strip()
  return words


def _parse_annotations(
    tree: Tree, read: Callable[[str], bytes], known: set[str]
) -> dict[str, str]:
  """Reads `val/val_annotations.txt` into {file name: wnid}."""
  where = tree.where(_ANNOTATIONS)
  if _ANNOTATIONS not in tree.names:
    raise LayoutError(
        f"Missing {where}: validation labels come only from this file."
    )
  labels = {}
  text = _read_text(tree, read, _ANNOTATIONS)
  for number, line in enumerate(text.splitlines()):
    fields = line.split()
    if not fields:
      continue
    if len(fields) < 2:
      raise LayoutError(
          f"{where}:{number + 1}: expected '<file>\\t<wnid>\\t<box>', got "
          f"{line!r}"
      )
    file_name, wnid = fields[:2]
    if wnid not in known:
      raise LayoutError(
          f"{where}:{number + 1}: unknown wnid {wnid!r} for {file_name} "
          f"(not in {tree.where(_WNIDS)})."
      )
    if file_name in labels:
      raise LayoutError(f"{where}:{number + 1}: {file_name} is listed twice.")
    labels[file_name] = wnid
  if not labels:
    raise LayoutError(f"{where} lists no images.")
  return labels


def _stem(name: str) -> str:
  return pathlib.PurePosixPath(name).stem


def _train_examples(tree: Tree, known: set[str]) -> list[Example]:
  """Labels train images by their `train/<wnid>/images/` folder."""
  examples = []
  for name in sorted(n for n in tree.names if n.startswith("train/")):
    parts = name.split("/")
    wnid = parts[1]
    if len(parts) > 2 and wnid not in known:
      raise LayoutError(
          f"Unknown wnid {wnid!r}: folder {tree.where('train/' + wnid)} is "
          f"not in {tree.where(_WNIDS)}."
      )
    if len(parts) == 3 and parts[2] == f"{wnid}_boxes.txt":
      continue
    if len(parts) != 4 or parts[2] != "images":
      raise LayoutError(
          f"Unexpected file {tree.where(name)}: train images must be at "
          "train/<wnid>/images/<wnid>_<k>.JPEG."
      )
    if not _stem(name).startswith(wnid + "_"):
      raise LayoutError(
          f"Train image {tree.where(name)} is not named {wnid}_<k>: it seems "
          "to be in another class's folder."
      )
    examples.append(Example(id=_stem(name), name=name, label=wnid))
  if not examples:
    raise LayoutError(
        f"No train images in {tree.where('train')}/<wnid>/images/."
    )
  return examples


def _validation_examples(
    tree: Tree, annotations: dict[str, str]
) -> list[Example]:
  """Labels val images by the annotations; each listed exactly once."""
  listed = {"val/images/" + file_name for file_name in annotations}
  for name in sorted(n for n in tree.names if n.startswith("val/")):
    if name == _ANNOTATIONS:
      continue
    if not name.startswith("val/images/") or name.count("/") != 2:
      raise LayoutError(
          f"Unexpected file {tree.where(name)}: val/ must hold only "
          "val_annotations.txt and images/. Validation labels come only from "
          "val_annotations.txt, so a val/ re-folded into class folders is "
          "rejected (labels taken from val folders give ~1% accuracy)."
      )
    if name not in listed:
      raise LayoutError(
          f"Validation image {tree.where(name)} is not listed in "
          f"{tree.where(_ANNOTATIONS)}; every one must be listed exactly once."
      )
  examples = []
  for file_name, wnid in annotations.items():
    name = "val/images/" + file_name
    if name not in tree.names:
      raise LayoutError(
          f"{tree.where(_ANNOTATIONS)} lists {file_name}, but "
          f"{tree.where(name)} is missing."
      )
    examples.append(Example(id=_stem(name), name=name, label=wnid))
  return sorted(examples, key=lambda example: example.name)


def _test_examples(tree: Tree) -> list[Example]:
  """Lists the unlabelled test images."""
  examples = []
  for name in sorted(n for n in tree.names if n.startswith("test/")):
    if not name.startswith("test/images/") or name.count("/") != 2:
      raise LayoutError(
          f"Unexpected file {tree.where(name)}: test images must be at "
          "test/images/<file>."
      )
    examples.append(Example(id=_stem(name), name=name, label=TEST_LABEL))
  if not examples:
    raise LayoutError(f"No test images in {tree.where('test/images')}/.")
  return examples


def _check_unique_ids(tree: Tree, split: str, examples: list[Example]) -> None:
  """Ids are the example keys, so two files with one stem would collide."""
  counts = collections.Counter(example.id for example in examples)
  duplicates = sorted(i for i, count in counts.items() if count > 1)
  if duplicates:
    names = [tree.where(e.name) for e in examples if e.id == duplicates[0]]
    raise LayoutError(
        f"Split {split!r} has several files with id {duplicates[0]!r}: {names}"
    )
