"""bench/recipe.py: shorter runs (--budgets) keep the full runs' cache and are scored against My3DGen's full run."""
import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'bench'))

import recipe as bench_recipe  # noqa: E402


def test_budgets_put_the_full_run_first_and_reject_bad_fractions():
    assert bench_recipe.parse_budgets('0.2,1,0.1,0.2') == [1.0, 0.2, 0.1]
    for text in ('0,0.2', '1.5', 'a,0.2'):
        with pytest.raises(SystemExit, match='--budgets'):
            bench_recipe.parse_budgets(text)


def test_a_short_run_has_its_own_length_and_tick_and_the_full_run_keeps_its_cache_key():
    assert bench_recipe.budget_run(0.12, 0.008, 2, 1.0) == (0.12, 0.008)
    assert bench_recipe.budget_run(0.12, 0.008, 2, 0.2) == (0.024, 0.002)  # 24 images, validated every step
    assert bench_recipe.budget_run(0.4, 0.05, 4, 0.5) == (0.2, 0.024)       # 25 images per tick -> 6 steps
    args = argparse.Namespace(batch=2, kimg=0.12, tick=0.008, config='tiny')
    full = bench_recipe.settings_hash('adapter', args)
    assert bench_recipe.settings_hash('adapter', args, 0.12, 0.008) == full
    assert bench_recipe.settings_hash('adapter', args, 0.024, 0.002) != full


def test_a_short_run_is_scored_against_my3dgens_best_in_the_full_run():
    full_nimg = np.arange(0, 121, 8)
    my3dgen = np.minimum(full_nimg, 90.0)  # best 90 at image 96
    short_nimg = np.arange(0, 25, 2)
    curves = {'my3dgen': {'a': (full_nimg, my3dgen), 'b': (full_nimg, my3dgen)},
              'adapter@0.2': {'a': (short_nimg, np.where(short_nimg >= 16, 91.0, 50.0)),
                              'b': (short_nimg, np.full(len(short_nimg), 89.0))}}
    summary = bench_recipe.summarize(curves, ['my3dgen', 'adapter@0.2'], {'my3dgen': 120, 'adapter@0.2': 24})
    reached, missed = summary['adapter@0.2']['runs']
    assert (reached['my3dgen_best'], reached['my3dgen_best_at']) == (90.0, 96)
    assert (reached['reach_images'], reached['speedup']) == (16, 6.0)
    assert (missed['reach_images'], missed['speedup']) == (None, None)
    assert summary['adapter@0.2']['reached'] == '1/2'


def test_the_speed_up_is_counted_in_images_and_in_compute_with_the_init_passes():
    nimg = np.arange(0, 121, 8)
    my3dgen = np.minimum(nimg, 96.0)  # best 96 at image 96: 48 steps of 2 images
    curves = {'my3dgen': {'a': (nimg, my3dgen)}, 'adapter-ginit': {'a': (nimg, np.where(nimg >= 16, 97.0, 0.0))}}
    summary = bench_recipe.summarize(curves, ['my3dgen', 'adapter-ginit'], {'my3dgen': 120, 'adapter-ginit': 120},
                                     batch=2)
    run = summary['adapter-ginit']['runs'][0]
    passes = bench_recipe.get_recipe('adapter-ginit').init_passes
    assert summary['adapter-ginit']['init_passes'] == passes > 0 and bench_recipe.init_passes('my3dgen') == 0
    assert (run['reach_images'], run['speedup']) == (16, 6.0)
    assert (run['reach_passes'], run['speedup_compute']) == (8 + passes, 48 / (8 + passes))
    assert summary['my3dgen']['runs'][0]['speedup_compute'] == 1.0


def test_a_step_search_counts_its_extra_forward_pass_as_a_whole_pass():
    nimg = np.arange(0, 121, 8)
    curves = {'my3dgen': {'a': (nimg, np.minimum(nimg, 96.0))},
              'adapter-search2': {'a': (nimg, np.where(nimg >= 16, 97.0, 0.0))}}
    summary = bench_recipe.summarize(curves, ['my3dgen', 'adapter-search2'],
                                     {'my3dgen': 120, 'adapter-search2': 120}, batch=2)
    run = summary['adapter-search2']['runs'][0]
    assert bench_recipe.passes_per_step('adapter-search2') == 2 and bench_recipe.passes_per_step('adapter') == 1
    assert (run['reach_images'], run['speedup']) == (16, 6.0)
    assert (run['reach_passes'], run['speedup_compute']) == (16, 3.0)


def test_every_variant_is_a_valid_recipe_that_differs_from_the_default():
    default = bench_recipe.get_recipe('adapter')
    for name in bench_recipe.VARIANTS:
        recipe = bench_recipe.get_recipe(name)  # a schedule-free variant that kept the cosine or the EMA is refused
        assert recipe.name == name and recipe.to_dict() != dict(default.to_dict(), name=name), name
    assert bench_recipe.get_recipe('adapter-sf').optimizer == 'schedulefree'


def test_the_reduced_config_has_ffhqs_layer_widths_and_its_own_cache_key():
    kwargs = bench_recipe.CONFIGS['reduced'][0]()
    assert (kwargs['channel_base'], kwargs['channel_max'], kwargs['img_resolution']) == (32768, 512, 128)
    assert kwargs['rendering_kwargs']['superresolution_module'].endswith('SuperresolutionHybrid2X')
    assert bench_recipe.CONFIGS['tiny'] == (None, 32)
    tiny = argparse.Namespace(batch=4, kimg=0.4, tick=0.05, config='tiny')
    reduced = argparse.Namespace(batch=4, kimg=0.4, tick=0.05, config='reduced')
    assert bench_recipe.settings_hash('adapter', tiny) != bench_recipe.settings_hash('adapter', reduced)


def test_my3dgen_at_another_batch_is_the_reference_and_compute_weighs_passes_by_their_images():
    nimg4, nimg1 = np.arange(0, 121, 8), np.arange(0, 121, 8)
    curves = {'my3dgen': {'a': (nimg4, np.minimum(nimg4, 96.0))},  # trained at batch 4: best 96 at image 96
              'adapter': {'a': (nimg1, np.where(nimg1 >= 16, 97.0, 0.0))},  # trained at batch 1
              'adapter-search2': {'a': (nimg1, np.where(nimg1 >= 24, 97.0, 0.0))}}
    names = ['my3dgen', 'adapter', 'adapter-search2']
    summary = bench_recipe.summarize(curves, names, dict.fromkeys(names, 120), batch=1)
    plain, searched = summary['adapter']['runs'][0], summary['adapter-search2']['runs'][0]
    assert (plain['reach_images'], plain['speedup'], plain['reach_passes']) == (16, 6.0, 16)
    assert plain['speedup_compute'] == 6.0  # 24 passes of 4 images against 16 passes of 1
    assert (searched['reach_images'], searched['reach_passes'], searched['speedup_compute']) == (24, 48, 2.0)


def test_the_reference_runs_keep_the_cache_key_of_a_run_at_their_batch():
    at4 = argparse.Namespace(batch=4, kimg=0.12, tick=0.008, config='tiny')
    at1 = argparse.Namespace(batch=1, kimg=0.12, tick=0.008, config='tiny')
    assert bench_recipe.settings_hash('my3dgen', at1, batch=4) == bench_recipe.settings_hash('my3dgen', at4)
    assert bench_recipe.settings_hash('my3dgen', at1) != bench_recipe.settings_hash('my3dgen', at4)
