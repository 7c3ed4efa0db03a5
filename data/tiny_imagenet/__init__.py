"""Tiny ImageNet for TFDS; importing this package registers `tiny_imagenet`."""

from data.tiny_imagenet import layout
from data.tiny_imagenet import tiny_imagenet_dataset_builder

TinyImagenet = tiny_imagenet_dataset_builder.TinyImagenet
LayoutError = layout.LayoutError
NUM_CLASSES = tiny_imagenet_dataset_builder.NUM_CLASSES
EXPECTED_SPLIT_SIZES = tiny_imagenet_dataset_builder.EXPECTED_SPLIT_SIZES
TEST_LABEL = layout.TEST_LABEL
