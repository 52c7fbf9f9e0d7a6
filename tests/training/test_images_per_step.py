"""A recipe's images per step (recipe.images_per_step): the batch taken in several optimizer steps."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from training import recipe as recipes

PER_IMAGE = recipes.get_recipe(recipes.DEFAULT_RECIPE)
WHOLE_BATCH = dataclasses.replace(PER_IMAGE, name='whole-batch', images_per_step=None)


@pytest.mark.parametrize('images_per_step, batch, batch_gpu, identities, gpus, expected', [
    (None, 4, 4, 1, 1, (4, 4)),    # EG3D's step: the whole batch
    (1, 4, 4, 1, 1, (1, 1)),       # one person, one image per step
    (2, 8, 4, 1, 1, (2, 2)),
    (1, 8, 8, 4, 1, (4, 4)),       # one image of each of 4 people per step
    (1, 16, 4, 4, 2, (4, 2)),      # on 2 processes, 2 people each
    (1, 4, 1, 1, 4, (4, 1)),       # one person on 4 processes: one image each, the smallest equal shares
    (1, 12, 6, 3, 2, (6, 3)),      # 3 people on 2 processes: 2 images of each
    (1, 12, 2, 3, 2, (6, 1)),      # a pass of 2 does not divide a process's 3: passes of 1
    (1, 2, 2, 4, 1, (2, 2)),       # never more than the batch
])
def test_the_step_is_the_recipes_images_of_each_identity_in_equal_shares(images_per_step, batch, batch_gpu,
                                                                         identities, gpus, expected):
    recipe = dataclasses.replace(PER_IMAGE, images_per_step=images_per_step)
    assert recipes.step_batch(recipe, batch, batch_gpu, identities, gpus) == expected


def test_the_field_is_checked_and_older_records_take_the_whole_batch():
    for bad in (0, -1, 1.5, True, '1'):
        with pytest.raises(ValueError, match='images_per_step must be an integer >= 1 or None'):
            dataclasses.replace(PER_IMAGE, images_per_step=bad)
    assert recipes.Recipe.from_dict(PER_IMAGE.to_dict()) == PER_IMAGE
    recorded = {k: v for k, v in PER_IMAGE.to_dict().items() if k != 'images_per_step'}  # saved before the field
    assert recipes.Recipe.from_dict(recorded).images_per_step is None
    assert recipes.get_recipe('my3dgen').images_per_step is None  # the paper's recipe keeps EG3D's step


def test_the_default_is_the_step_search_recipe_on_one_image_per_step():
    assert PER_IMAGE.images_per_step == 1
    assert PER_IMAGE == dataclasses.replace(recipes.get_recipe('adapter-search'), name=PER_IMAGE.name,
                                            images_per_step=1)


def _adapters(run_dir, tag='000000.004'):
    return load_file(str(run_dir / f'adapter-{tag}.safetensors'))


def test_a_batch_of_four_in_one_image_steps_is_a_run_at_batch_one(train_tiny, tmp_path):
    per_image = train_tiny(tmp_path / 'per-image', PER_IMAGE.to_dict(), batch_size=4, batch_gpu=4)
    at_one = train_tiny(tmp_path / 'at-one', WHOLE_BATCH.to_dict(), batch_size=1, batch_gpu=1)
    whole = train_tiny(tmp_path / 'whole', WHOLE_BATCH.to_dict(), batch_size=4, batch_gpu=4)
    assert per_image['step'] == at_one['step'] == 4 and whole['step'] == 1
    a, b, c = (_adapters(tmp_path / name) for name in ('per-image', 'at-one', 'whole'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # one step of four is another run
    stats = [json.loads(line) for line in open(tmp_path / 'per-image' / 'stats.jsonl')]
    assert [s['step'] for s in stats if 'loss/total' in s] == [1, 2, 3, 4]  # a tick per image, a step each
    log = (tmp_path / 'per-image' / 'log.txt').read_text()
    assert '4 steps of 1 images (recipe adapter-per-image: 1 image(s) of each identity per step' in log


def test_resume_keeps_the_steps(train_tiny, tmp_path, resume_halfway):
    run = tmp_path / 'run'
    train_tiny(run, PER_IMAGE.to_dict(), batch_size=2, batch_gpu=2)
    resumed = resume_halfway(run, PER_IMAGE.to_dict())
    assert 'the batches will differ' not in (resumed / 'log.txt').read_text()


def test_resume_at_another_step_warns(train_tiny, tmp_path):
    run = tmp_path / 'run'
    train_tiny(run, WHOLE_BATCH.to_dict(), batch_size=2, batch_gpu=2)
    resumed = tmp_path / 'resumed'
    train_tiny(resumed, WHOLE_BATCH.to_dict(), resume_pkl=str(run / 'network-snapshot-000000.002.pkl'),
               adapter_config=None, batch_size=1, batch_gpu=1)
    assert 'the run took steps of 2 images, this one 1: the batches will differ' in (resumed / 'log.txt').read_text()
