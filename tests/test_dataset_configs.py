"""STL-10 and Tiny ImageNet configs: a few pretraining steps and a probe under mock data."""

import json

import pytest
import tensorflow_datasets as tfds

from configs import clapp_stl10
from configs import clapp_tinyimagenet
from configs import infonce_stl10
from configs import infonce_tinyimagenet
from localssl import input_pipeline
from localssl import linear_eval
from localssl import objectives
from localssl import train
from localssl import validation


def shrink(config):
  config.model.width_multiplier = 1 / 16
  config.batch_size = 8
  config.num_train_steps = 2
  config.checkpoint_every_steps = 2
  config.eval.val_size = 8
  config.eval.num_epochs = 1
  config.eval.batch_size = 16
  return config


@pytest.mark.parametrize('module,preset', [(clapp_stl10, 'dfb,tiny'),
                                           (clapp_tinyimagenet, 'both,tiny')])
def test_pretrain_and_probe_under_mock_data(tmp_path, module, preset):
  config = shrink(module.get_config(preset))
  with tfds.testing.mock_data(num_examples=32):
    state = train.train_and_evaluate(config, str(tmp_path))
    result = linear_eval.evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  assert result['checkpoint_step'] == 2 and result['num_test'] == 32
  assert json.loads((tmp_path / 'linear_eval.json').read_text())['dataset'] == config.data.name


@pytest.mark.parametrize('module', [clapp_stl10, clapp_tinyimagenet, infonce_stl10,
                                    infonce_tinyimagenet])
def test_every_preset_validates_with_the_paper_sizes(module):
  presets = ('', 'bf16', 'tiny') if module.__name__.startswith('configs.infonce') else (
      'both', 'dfb', 'lateral', 'nospatial', 'bp', 'ff', 'fixedb', 'tiny')
  for preset in presets:
    config = module.get_config(preset)
    validation.validate(config)
    channels = objectives.block_output_shapes(config)[0][-1]
    # Layer 0 is pooled to the paper's 8x8 grid, or globally (no spatial dependence).
    assert objectives.representation_dims(config)[0] in (64 * channels, channels)


def test_dataset_facts():
  stl = clapp_stl10.get_config()
  assert (stl.data.pretrain_split, stl.eval.probe_split, stl.eval.test_split) == (
      'unlabelled', 'train', 'test')
  assert clapp_stl10.get_config('with_train').data.pretrain_split == 'train+unlabelled'
  tiny = clapp_tinyimagenet.get_config()
  assert tiny.optim.weight_decay == 1e-5 and tiny.eval.test_split == 'validation'
  assert tuple(tiny.loss.pool_sizes) == (8, 8, 8, 4, 4, 2) and tiny.eval.num_classes == 200


def test_missing_dataset_stops_the_run_at_once_naming_dataset_and_dir(tmp_path):
  config = shrink(clapp_tinyimagenet.get_config('tiny'))
  config.data.data_dir = str(tmp_path / 'empty')
  with pytest.raises(input_pipeline.DatasetNotFoundError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'tiny_imagenet' in str(error.value) and str(tmp_path / 'empty') in str(error.value)
  assert 'data.prepare' in str(error.value)


def test_importing_the_project_registers_tiny_imagenet():
  import main  # pylint: disable=g-import-not-at-top,unused-import
  assert tfds.builder('tiny_imagenet').info.features['label'].num_classes == 200


def test_a_failed_download_is_reported_as_a_missing_dataset(tmp_path):
  config = shrink(clapp_tinyimagenet.get_config('tiny'))
  config.data.data_dir = str(tmp_path)
  config.data.download = True  # Tiny ImageNet cannot be downloaded: it needs data.prepare.
  with pytest.raises(input_pipeline.DatasetNotFoundError, match='could not download'):
    input_pipeline.load_split(config, 'train')
