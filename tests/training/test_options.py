"""training/options.py: one typed options object for train.py and the loop, the layout of training_options.json."""
import json
import os

import pytest
from click.testing import CliRunner

import train
from training import synthetic_identity as si
from training.options import TrainingOptions
from training.recipe import DEFAULT_RECIPE, RECIPES, Recipe

# training_options.json as train.py wrote it before TrainingOptions (commit 9a06e15), for
#   --cfg=resume --batch=2 --kimg=0.4 --tick=0.05 --snap=1 --lora=1 --lpips=none --device=cpu --val-views=1
#   --early-stop=3 on the 8-view synthetic identity; paths replaced by <data>, <resume>, <run_dir>.
RECORDED = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'data', 'training_options_before_15a.json')


def _recorded(data: str, resume: str, run_dir: str) -> dict:
    text = open(RECORDED).read().replace('<data>', data).replace('<resume>', resume).replace('<run_dir>', run_dir)
    return json.loads(text)


def test_a_recorded_training_options_json_gives_back_its_options():
    record = _recorded('/d', '/r.pkl', '/runs/00000')
    options = TrainingOptions(**record)
    assert options.to_dict() == record
    assert options.loss_kwargs.lpips_net == 'none' and options.training_set_kwargs['path'] == '/d'
    assert options.make_recipe() == Recipe.from_dict(record['recipe'])


def test_train_py_records_the_same_options_as_before(tmp_path, tmp_path_factory, monkeypatch):
    identity = si.ensure_identity(str(tmp_path_factory.getbasetemp() / 'synthetic-identity-8'), views=8, heldout=0,
                                  strength=0.3)
    captured = {}
    monkeypatch.setattr(train, 'launch_training', lambda c, desc, outdir, dry_run: captured.update(c=c))
    args = [f'--outdir={tmp_path}', f'--data={identity.train}', f'--resume={identity.base_pkl}', '--cfg=resume',
            '--batch=2', '--kimg=0.4', '--tick=0.05', '--snap=1', '--lora=1', '--lpips=none', '--device=cpu',
            '--val-views=1', '--early-stop=3']
    result = CliRunner().invoke(train.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    c = captured['c']
    assert isinstance(c, TrainingOptions)
    train.write_options(c, str(tmp_path))
    written = json.load(open(tmp_path / 'training_options.json'))
    # The default recipe itself changed after the record (issue 20: its rate and EMA, then its step search and
    # images per step); everything else must not.
    default = RECIPES[DEFAULT_RECIPE]
    assert Recipe.from_dict(written.pop('recipe')) == default
    assert written.pop('G_opt_kwargs') == dict(class_name='torch.optim.Adam', lr=default.lr,
                                               betas=list(default.betas), eps=default.eps)
    expected = _recorded(identity.train, identity.base_pkl, str(tmp_path))
    del expected['recipe'], expected['G_opt_kwargs']
    assert written == expected


def test_unknown_options_and_metrics_are_errors():
    with pytest.raises(TypeError, match="unexpected keyword argument 'kimg'"):
        TrainingOptions(kimg=1)
    with pytest.raises(ValueError, match=r"metrics=\['fid50k_full'\].*evaluate.py"):
        TrainingOptions(metrics=['fid50k_full'])


def test_the_options_own_their_dicts_and_default_to_eg3d_adam():
    loss_kwargs = dict(lpips_net='none')
    options = TrainingOptions(loss_kwargs=loss_kwargs)
    options.loss_kwargs['lpips_net'] = 'vgg'
    assert loss_kwargs == dict(lpips_net='none')  # the caller's dict is untouched
    recipe = options.make_recipe()
    assert (recipe.name, recipe.lr, recipe.betas, recipe.eps, recipe.decay) == ('constant', 0.0025, (0, 0.99), 1e-8,
                                                                             'constant')
