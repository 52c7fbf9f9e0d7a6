"""Training recipes compared on synthetic identities: held-out quality against images seen.

    OMP_NUM_THREADS=1 python bench/recipe.py                         # default recipe vs my3dgen, 4 identities, batch 4
    OMP_NUM_THREADS=1 python bench/recipe.py --recipes=my3dgen,adapter,adapter-b1 --identities=1
    OMP_NUM_THREADS=1 python bench/recipe.py --budgets=1,0.2,0.1     # also the default in 20% and 10% of the images

Each identity is made by `training/synthetic_identity.py` (its own tiny base, a rank-1 change of
every conv weight, FFHQ-like cameras): `--views` training selfies and `--heldout` more at other
poses. Every recipe trains a rank-1 LoRA on the unchanged base with the real training loop,
`--val-data` = the held-out poses (so nothing is taken from training), scored every tick.

Quality is the held-out MSE closed, 1 - mse / mse(base), in percent: 100 = the person exactly.
Per recipe (mean, and the spread over identities and seeds as min-max):
  - images to reach My3DGen's best: the first tick at which the recipe is at least as good as the
    best tick of the `my3dgen` run on the same identity and seed; the speed-up is their ratio; and
    the same in compute, forward/backward passes of a batch: steps (two passes each for a recipe with a
    step search, whose extra forward pass is counted as a whole one) plus the passes a recipe with
    init='gradient' spends on its first batch before training (`init_passes`);
  - best and final quality at the same compute (the same number of images);
  - the largest drop below the running best after the first 10% of training (points of MSE closed).
Writes results.json and curves.png (mean curve per recipe, min-max band) under --outdir; runs that
already finished there are reused. Variants for ablations are named `adapter-<change>` (see VARIANTS).

`--config=reduced` builds the identities on a generator with FFHQ's backbone widths (conv fan-ins up to 4608,
against 8-1152 on the tiny base) at 128 px, rendered and trained at 64 px: a check that a recipe tuned on the
tiny base transfers to the official layer shapes (seconds per step instead of a fraction of one).

`--reference-batch` trains `my3dgen` at another batch than the other recipes (the paper's is 4): every
recipe is then scored against My3DGen's best at that batch, and the compute ratio weighs each pass by its
images (a pass of one image costs a quarter of a pass of four, as it does in FLOPs).

`--budgets` adds shorter runs of the other recipes, named `<recipe>@<fraction>`: the same recipe trained
with `--kimg` times the fraction, each with its own full schedule and EMA (they are fractions of the run),
validated as often per run (the tick scales too, at least one step). They are scored against My3DGen's best
in the full run, so their speed-up is what a user gets by shortening `--kimg`.
"""

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import sys
import time

import numpy as np
import PIL.Image
import PIL.ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'eg3d'))

from training import recipe as recipes  # noqa: E402  (needs the path above)
from training import synthetic_identity as si  # noqa: E402

# Schedule-free Adam (training/schedule_free.py) in the default's place: constant rate after the warm-up, no EMA.
SCHEDULE_FREE = dict(optimizer='schedulefree', decay='constant', final_lr=1.0, ema_half_life=None, ema_rampup=None)

# --config: (generator kwargs of the identities' base, or None for the tiny one; neural rendering resolution).
CONFIGS = {'tiny': (None, 32), 'reduced': (si.reduced_ffhq_generator_kwargs, 64)}

# Ablations of the default recipe: one change each.
VARIANTS = {
    'adapter-b1': dict(b_lr_ratio=1.0),                        # no LoRA+
    'adapter-b16': dict(b_lr_ratio=16.0),                      # more LoRA+
    'adapter-nomomentum': dict(betas=(0.0, 0.99)),             # EG3D's betas
    'adapter-constant': dict(warmup=0.0, decay='constant'),    # no schedule
    'adapter-clip': dict(grad_clip=0.1),                       # gradient clipping
    'adapter-noema': dict(ema_half_life=None, ema_rampup=None),  # the raw weights instead of their EMA
    'adapter-v1': dict(lr=0.01, warmup=0.05, ema_half_life=None, ema_rampup=None),  # the first default (no EMA)
    'adapter-ginit': dict(init='gradient', init_passes=2),      # A from the first batch's weight gradients
    'adapter-ginit-lr0.005': dict(init='gradient', init_passes=2, lr=0.005),  # the same with a quarter of the rate
    'adapter-beta2-0.9': dict(betas=(0.9, 0.9)),              # a faster second-moment estimate
    'adapter-beta2-0.95': dict(betas=(0.9, 0.95)),
    'adapter-b8-lr0.01': dict(b_lr_ratio=8.0, lr=0.01),        # LoRA+ 8 at the same B rate, A at half
    'adapter-b8-lr0.015': dict(b_lr_ratio=8.0, lr=0.015),      # LoRA+ 8, B at 1.5x, A at 0.75x
    'adapter-ema2.5': dict(ema_half_life=0.025),               # half the EMA's half-life (1.5 steps here)
    'adapter-sf-lr0.04': dict(SCHEDULE_FREE, lr=0.04),
    'adapter-sf-beta1-0.95': dict(SCHEDULE_FREE, betas=(0.95, 0.99)),  # y nearer the average
    'adapter-sf-lr0.01': dict(SCHEDULE_FREE, lr=0.01),
    'adapter-sf-warmup0.2': dict(SCHEDULE_FREE, warmup=0.2),
    'adapter-sf-b2': dict(SCHEDULE_FREE, b_lr_ratio=2.0),      # B at 0.04: z has no momentum to damp its steps
    'adapter-fanin0.5': dict(a_fan_in_exponent=0.5),          # A's rate * (fan_in / 512)^-1/2 per layer
    'adapter-fanin0.25': dict(a_fan_in_exponent=0.25),
    'adapter-fanin0.5-b': dict(a_fan_in_exponent=0.5, b_fan_in_exponent=-0.5),  # and B's * (fan_in / 512)^+1/2
    'adapter-riemannian': dict(riemannian_reg=0.01),          # Riemannian-preconditioned LoRA, PEFT's damping
    'adapter-riemannian-reg0.1': dict(riemannian_reg=0.1),
    'adapter-sf-fanin0.5': dict(SCHEDULE_FREE, a_fan_in_exponent=0.5),  # schedule-free with the fan-in rates
    'adapter-search2': dict(step_search=2.0),                 # each step scaled by a quadratic line search, up to 2x
    'adapter-search4': dict(step_search=4.0),
    'adapter-search2-nowarmup': dict(step_search=2.0, warmup=0.0),   # the search in place of the warm-up
    'adapter-search2-lr0.04': dict(step_search=2.0, lr=0.04),        # the search with twice the rate
    'adapter-search2-constant': dict(step_search=2.0, warmup=0.0, decay='constant'),  # the search as the schedule
    'adapter-lr2x': None,                                      # twice the rate (filled in below)
    'my3dgen-cosine': None,                                    # the paper's optimizer with warm-up + cosine decay
}


def get_recipe(name: str) -> recipes.Recipe:
    if name in recipes.RECIPES:
        return recipes.RECIPES[name]
    default = recipes.RECIPES['adapter']
    if name == 'adapter-lr2x':
        return dataclasses.replace(default, name=name, lr=2 * default.lr)
    if name == 'my3dgen-cosine':
        return dataclasses.replace(recipes.RECIPES['my3dgen'], name=name, warmup=default.warmup, decay='cosine',
                                   final_lr=0.0)
    if name in VARIANTS:
        return dataclasses.replace(default, name=name, **VARIANTS[name])
    raise SystemExit(f'unknown recipe {name!r}: {", ".join(list(recipes.RECIPES) + list(VARIANTS))}')


def parse_budgets(text: str) -> list:
    """Run lengths as fractions of --kimg, e.g. '1,0.2,0.1' -> [1.0, 0.2, 0.1]; 1 (the full run) comes first."""
    try:
        budgets = [float(b) for b in text.split(',') if b.strip()]
    except ValueError:
        raise SystemExit(f'--budgets={text!r}: expected comma-separated fractions of --kimg, e.g. 1,0.2,0.1')
    bad = [b for b in budgets if not 0 < b <= 1]
    if bad:
        raise SystemExit(f'--budgets={text!r}: every fraction must be in (0, 1], got {bad}')
    return list(dict.fromkeys([1.0] + budgets))


def budget_run(kimg: float, tick: float, batch: int, budget: float) -> tuple:
    """(kimg, tick) of a run `budget` times as long: as many validations per run, at least one step apart."""
    if budget == 1.0:
        return kimg, tick
    step_kimg = batch / 1000
    short_tick = max(round(tick * budget / step_kimg), 1) * step_kimg
    return round(kimg * budget, 6), round(short_tick, 6)


def settings_hash(name: str, args: argparse.Namespace, kimg: float = None, tick: float = None,
                  batch: int = None) -> str:
    """Short hash of what a run depends on, so that finished runs are reused only when nothing changed.

    Recipe fields at their defaults are left out, so a field added later (off by default) keeps the
    finished runs of the other recipes, My3DGen's baseline among them, valid.
    """
    import hashlib
    recipe = get_recipe(name)
    changed = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)
               if f.default is dataclasses.MISSING or getattr(recipe, f.name) != f.default}
    config = [] if args.config == 'tiny' else [args.config]  # keeps the tiny runs' hashes of earlier rounds
    length = [args.kimg if kimg is None else kimg, args.tick if tick is None else tick]
    key = json.dumps(config + [changed, args.batch if batch is None else batch] + length, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def train_one(job: dict) -> str:
    """One training run (in a worker process); returns its stats.jsonl."""
    import torch
    torch.set_num_threads(1)
    from training.training_loop import training_loop
    stats = os.path.join(job['run_dir'], 'stats.jsonl')
    done = os.path.join(job['run_dir'], 'done')
    if os.path.isfile(done):
        return stats
    if os.path.isdir(job['run_dir']):
        import shutil
        shutil.rmtree(job['run_dir'])
    os.makedirs(job['run_dir'])
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        training_loop(run_dir=job['run_dir'], training_set_kwargs=dict(path=job['train']), resume_pkl=job['base_pkl'],
                      cfg='resume', neural_rendering_resolution=job['nrr'], batch_size=job['batch'],
                      batch_gpu=job['batch'],
                      total_kimg=job['kimg'], kimg_per_tick=job['tick'], network_snapshot_ticks=10**6,
                      random_seed=job['seed'], device='cpu', grid_rows=0, progress_bar=False,
                      loss_kwargs=dict(lpips_net='none'), adapter_config=dict(r=1, alpha=1.0),
                      recipe=get_recipe(job['recipe']).to_dict(), val_data=job['heldout'])
    open(done, 'w').close()
    return stats


def closed_curve(stats_path: str):
    """(images seen [T], held-out MSE closed in % [T]) from a run's stats.jsonl (tick 0 = the base)."""
    rows = [json.loads(line) for line in open(stats_path)]
    nimg = np.array([round(r['kimg'] * 1000) for r in rows])
    mse = np.array([r['val/mse'] for r in rows])
    return nimg, 100 * (1 - mse / mse[0])


def init_passes(name: str) -> int:
    """Forward/backward passes a recipe spends before its first step (on the first batch: no new images)."""
    recipe = get_recipe(name.split('@')[0])
    return recipe.init_passes if recipe.init == 'gradient' else 0


def passes_per_step(name: str) -> int:
    """Passes a recipe spends per step: 1, or 2 with a step search (its extra forward pass, without a backward
    pass, counted as a whole pass: an upper bound on its cost)."""
    return 1 if get_recipe(name.split('@')[0]).step_search is None else 2


def summarize(curves: dict, names: list, totals: dict, batch: int = 2) -> dict:
    """Per recipe: speed-up to My3DGen's best, best/final quality, worst drop after 10%, with spreads.

    `totals` gives each name's run length in images (short runs are scored against the full My3DGen run).
    The speed-up is counted twice: in images seen, and in compute, i.e. forward/backward passes of a
    `batch`-image batch (steps times the recipe's passes per step, plus its init passes); My3DGen's images
    are counted in the same passes, also when it trained at another batch (--reference-batch).
    """
    out = {}
    ref_passes = init_passes('my3dgen')
    for name in names:
        total = totals[name]
        passes, per_step = init_passes(name), passes_per_step(name)
        rows = []
        for key, (nimg, closed) in curves[name].items():
            ref_nimg, ref_closed = curves['my3dgen'][key]
            ref_best = ref_closed.max()
            ref_at = ref_nimg[int(np.argmax(ref_closed))]
            reached = np.flatnonzero(closed >= ref_best - 1e-9)
            at = nimg[reached[0]] if len(reached) else None
            running = np.maximum.accumulate(closed)
            late = nimg > 0.1 * total
            rows.append(dict(identity=key, my3dgen_best=float(ref_best), my3dgen_best_at=int(ref_at),
                             reach_images=None if at is None else int(at),
                             speedup=None if at is None or at == 0 else float(ref_at / at),
                             reach_passes=None if at is None else int(at // batch * per_step + passes),
                             speedup_compute=(None if at is None or at // batch * per_step + passes == 0 else
                                              float((ref_at // batch + ref_passes) /
                                                    (at // batch * per_step + passes))),
                             best=float(closed.max()), final=float(closed[-1]),
                             worst_drop=float((running - closed)[late].max()) if late.any() else 0.0))
        speedups = [r['speedup'] for r in rows if r['speedup'] is not None]
        compute = [r['speedup_compute'] for r in rows if r['speedup_compute'] is not None]
        out[name] = dict(runs=rows, reached=f'{len(speedups)}/{len(rows)}', init_passes=passes,
                         speedup_mean=float(np.mean(speedups)) if speedups else None,
                         speedup_min=float(np.min(speedups)) if speedups else None,
                         speedup_compute_mean=float(np.mean(compute)) if compute else None,
                         speedup_compute_min=float(np.min(compute)) if compute else None,
                         **{f'{m}_{agg}': float(fn([r[m] for r in rows]))
                            for m in ('best', 'final', 'worst_drop') for agg, fn in
                            (('mean', np.mean), ('min', np.min), ('max', np.max))})
    return out


def print_per_identity(summary: dict, names: list, totals: dict) -> None:
    """Per identity and run length: images and compute to reach My3DGen's best in its full run, best and final."""
    print('\n| recipe | images in the run | identity | My3DGen\'s best (at images) | images to reach it (speed-up) | '
          'compute to reach it: passes (speed-up) | best | final |')
    print('|---|---|---|---|---|---|---|---|')
    for name in names:
        if name == 'my3dgen':
            continue
        for r in summary[name]['runs']:
            reach, compute = 'not reached', '-'
            if r['reach_images'] is not None:
                reach = f'{r["reach_images"]} ({r["speedup"]:.1f}x)'
                compute = f'{r["reach_passes"]} ({r["speedup_compute"]:.1f}x)'
            print(f'| {name} | {totals[name]} | {r["identity"]} | {r["my3dgen_best"]:.1f} ({r["my3dgen_best_at"]}) | '
                  f'{reach} | {compute} | {r["best"]:.1f} | {r["final"]:.1f} |')


def plot(curves: dict, names: list, path: str, width: int = 900, height: int = 520) -> None:
    """Mean MSE-closed curve per recipe with its min-max band (PIL only, no plotting dependency)."""
    colours = [(200, 60, 40), (40, 110, 200), (60, 160, 80), (150, 80, 180), (220, 150, 30), (90, 90, 90), (20, 170, 170)]
    img = PIL.Image.new('RGB', (width, height), 'white')
    draw = PIL.ImageDraw.Draw(img)
    left, top, right, bottom = 70, 30, width - 200, height - 50
    xmax = max(int(n.max()) for c in curves.values() for n, _ in c.values())
    lo = min(0.0, min(float(v.min()) for c in curves.values() for _, v in c.values()))
    to_xy = lambda n, v: (left + (right - left) * n / xmax, bottom - (bottom - top) * (v - lo) / (100 - lo))
    for v in range(int(np.ceil(lo / 20) * 20), 101, 20):
        y = to_xy(0, v)[1]
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((left - 40, y - 6), f'{v}%', fill='black')
    for n in np.linspace(0, xmax, 5):
        x = to_xy(n, lo)[0]
        draw.text((x - 10, bottom + 8), f'{int(n)}', fill='black')
    draw.rectangle([left, top, right, bottom], outline='black')
    draw.text((left, bottom + 28), 'images seen', fill='black')
    draw.text((left, 8), 'held-out MSE closed (mean over identities; band: min-max)', fill='black')
    for i, name in enumerate(names):
        colour = colours[i % len(colours)]
        nimg = next(iter(curves[name].values()))[0]
        stack = np.stack([v for _, v in curves[name].values()])
        band = [to_xy(n, v) for n, v in zip(nimg, stack.max(0))] + [to_xy(n, v) for n, v in zip(nimg[::-1], stack.min(0)[::-1])]
        overlay = PIL.Image.new('RGBA', img.size, (0, 0, 0, 0))
        PIL.ImageDraw.Draw(overlay).polygon(band, fill=colour + (45,))
        img.paste(overlay, (0, 0), overlay)
        draw = PIL.ImageDraw.Draw(img)
        draw.line([to_xy(n, v) for n, v in zip(nimg, stack.mean(0))], fill=colour, width=3)
        draw.line([(right + 15, top + 10 + 22 * i), (right + 40, top + 10 + 22 * i)], fill=colour, width=3)
        draw.text((right + 46, top + 4 + 22 * i), name, fill='black')
    img.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--recipes', default=f'my3dgen,{recipes.DEFAULT_RECIPE}',
                        help='comma-separated; my3dgen is always included')
    parser.add_argument('--identities', type=int, default=4, help='synthetic identities (seeds 0, 10, 20, ...)')
    parser.add_argument('--seeds', default='0', help='training seeds, comma-separated')
    parser.add_argument('--views', type=int, default=16, help='training selfies per identity')
    parser.add_argument('--strength', type=float, default=0.5, help='size of the rank-1 personal change')
    parser.add_argument('--batch', type=int, default=4, help="images per step as EG3D counts them (--batch; the "
                        "paper's 4); a recipe with images_per_step takes it in several steps")
    parser.add_argument('--reference-batch', dest='reference_batch', type=int, default=None,
                        help="My3DGen's batch, the reference (default: --batch; the paper's is 4)")
    parser.add_argument('--heldout-views', dest='heldout', type=int, default=2, help='held-out poses per identity (the validation views)')
    parser.add_argument('--kimg', type=float, default=0.12, help='run length (every recipe gets the same)')
    parser.add_argument('--tick', type=float, default=0.008, help='validation interval in kimg')
    parser.add_argument('--jobs', type=int, default=2, help='runs in parallel (one thread each)')
    parser.add_argument('--budgets', default='1', help='run lengths as fractions of --kimg, e.g. 1,0.2,0.1: '
                        'every recipe but my3dgen is also run that much shorter (named <recipe>@<fraction>)')
    parser.add_argument('--config', choices=list(CONFIGS), default='tiny',
                        help="identities' base: the tiny generator, or FFHQ's layer widths at 128 px (reduced)")
    parser.add_argument('--outdir', default='bench-out/recipe')
    args = parser.parse_args()

    recipe_names = list(dict.fromkeys(['my3dgen'] + [n for n in args.recipes.split(',') if n]))
    for name in recipe_names:
        get_recipe(name)
    budgets = parse_budgets(args.budgets)
    runs = [(name, name, 1.0) for name in recipe_names]
    runs += [(f'{name}@{budget:g}', name, budget) for budget in budgets[1:] for name in recipe_names if name != 'my3dgen']
    names = [label for label, _, _ in runs]
    seeds = [int(s) for s in args.seeds.split(',')]
    reference_batch = args.batch if args.reference_batch is None else args.reference_batch
    jobs = []
    overrides, nrr = CONFIGS[args.config]
    for k in range(args.identities):
        extra = {} if overrides is None else dict(generator_overrides=overrides(), neural_rendering_resolution=nrr)
        person = si.ensure_identity(os.path.join(args.outdir, f'identity-{k}'), seed=10 * k, views=args.views,
                                    heldout=args.heldout, strength=args.strength, **extra)
        for seed in seeds:
            for label, name, budget in runs:
                batch = reference_batch if name == 'my3dgen' else args.batch
                kimg, tick = budget_run(args.kimg, args.tick, batch, budget)
                jobs.append(dict(train=person.train, heldout=person.heldout, base_pkl=person.base_pkl, recipe=name,
                                 label=label, seed=seed, batch=batch, nrr=nrr, kimg=kimg, tick=tick,
                                 key=f'identity-{k}/seed-{seed}',
                                 run_dir=os.path.join(args.outdir, 'runs', f'identity-{k}', f'seed-{seed}',
                                                      f'{name}-{settings_hash(name, args, kimg, tick, batch)}')))
    start = time.time()
    with multiprocessing.get_context('spawn').Pool(args.jobs) as pool:
        paths = pool.map(train_one, jobs, chunksize=1)
    curves = {name: {} for name in names}
    for job, path in zip(jobs, paths):
        curves[job['label']][job['key']] = closed_curve(path)
    totals = {label: int(round(budget_run(args.kimg, args.tick, args.batch, budget)[0] * 1000)) for label, _, budget in runs}
    total = totals['my3dgen']
    summary = summarize(curves, names, totals, args.batch)
    results = dict(args=vars(args), machine=f'{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}',
                   date=time.strftime('%Y-%m-%d'), wall_seconds=round(time.time() - start),
                   recipes={n: get_recipe(n).to_dict() for n in recipe_names}, summary=summary,
                   curves={n: {k: dict(nimg=c[0].tolist(), closed=c[1].round(3).tolist()) for k, c in curves[n].items()}
                           for n in names})
    with open(os.path.join(args.outdir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    plot(curves, names, os.path.join(args.outdir, 'curves.png'))

    reference = '' if reference_batch == args.batch else f' (my3dgen at batch {reference_batch})'
    print(f'{len(curves["my3dgen"])} identity x seed runs per recipe, {total} images each, '
          f'batch {args.batch}{reference}; '
          f'held-out MSE closed (%), mean [min, max]\n')
    print('| recipe | reaches My3DGen\'s best | images to get there: speed-up vs my3dgen | compute to get there '
          '(passes): speed-up | best | final | worst drop after 10% (points) |')
    print('|---|---|---|---|---|---|---|')
    for name in names:
        s = summary[name]
        speed = ('-' if s['speedup_mean'] is None else f'{s["speedup_mean"]:.1f}x (min {s["speedup_min"]:.1f}x)')
        compute = ('-' if s['speedup_compute_mean'] is None else
                   f'{s["speedup_compute_mean"]:.1f}x (min {s["speedup_compute_min"]:.1f}x)')
        print(f'| {name} | {s["reached"]} | {speed} | {compute} | {s["best_mean"]:.1f} [{s["best_min"]:.1f}, {s["best_max"]:.1f}] | '
              f'{s["final_mean"]:.1f} [{s["final_min"]:.1f}, {s["final_max"]:.1f}] | '
              f'{s["worst_drop_mean"]:.1f} [max {s["worst_drop_max"]:.1f}] |')
    print_per_identity(summary, names, totals)
    print(f'\nwrote {os.path.join(args.outdir, "results.json")} and curves.png ({time.time() - start:.0f} s)')


if __name__ == '__main__':
    main()
