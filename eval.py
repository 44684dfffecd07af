"""Evaluate any checkpoint this project writes: accuracy, params, FLOPs/image, latency; side by side for several.

    python eval.py runs/vitae/001/last.pt --dataset digits                          # one checkpoint, CPU
    python eval.py runs/dense/001/last.pt runs/monarch/001/last.pt --dataset digits --json cmp.json
    python eval.py runs/seam/001/base.pt runs/seam/001/masks.pt runs/seam/001/module.pt \\
        --dataset cifar10 --data-dir ~/data --per-class     # base CNN vs SeaM masks vs extracted module
    python eval.py last.pt --dataset imagenet --data-dir /imagenet --split val --real-json real.json \\
        --device cuda --amp bf16 --batch-size 256 --nproc 8                        # 8 GPUs (mp.spawn), ReaL too
    torchrun --nproc_per_node 8 eval.py last.pt --dataset imagenet --data-dir /imagenet --split val --device cuda
    python eval.py --model vitae_basic_tiny --weights ViTAE-T.pth.tar --weights-key state_dict_ema \
        --dataset imagenet --data-dir /imagenet --split val --img-size 224     # an official (or any) weights file
    python eval.py --model vit_tiny_patch16_224 --weights vit.safetensors --mlp monarch --dataset imagenet ...

--model NAME --weights PATH (with or next to checkpoints): NAME is a ViTAE variant, one of this project's CIFAR nets
(resnet20, vgg16_bn: chenyaofo/pytorch-cifar-models files load as they are) or any timm model, built with
pretrained=False for the dataset's classes at --img-size (default: the dataset's), with --mlp/--nblocks applied by
models/structured.py; PATH is any file models/weights.py reads (this project's, official ViTAE/timm training
dicts, raw state dicts, .safetensors). Dense MLP weights are projected into structured layers. Keys that do not
fit: one-line error, or with --allow-partial a warning (those weights stay as initialised).

Kinds: 'vitae_train' (EMA weights when the checkpoint has them, unless --no-ema), 'cifar_base', 'seam_module' and
'seam_masks' (the base weights + SeaM masks + module head, all in its state dict: masks are re-enabled with the
stored granularity, then loaded). SeaM checkpoints are scored on their task: the test images of the task's
classes (binary: the target class + as many seeded negatives, exactly as reengineer_seam.py draws them) with the
task's labels (binary: 0 = target, 1 = other; multiclass: position in 'classes'). --dataset folder: any ImageFolder
tree (data.build_dataset), one class per class folder; --dataset imagenet with wnid-named class folders labels them by
ImageNet index, so a folder holding only some classes scores a 1000-class model (and its SeaM modules) correctly.

Evaluation is exact under N processes: each sample goes to exactly one rank (data.ExactDistributedSampler) and
the counts are summed with all_reduce. ReaL (Beyer et al. 2020) labels are looked up by each sample's dataset
index (returned by the loader), never by prediction order; images with an empty ReaL list are skipped.
FLOPs/image and params: models/flops.py (structured layers by their real cost, masked layers by nonzero weights).
Latency (rank 0, after evaluation, float32 or --amp): warm-up, then the median of --latency-iters timed forwards
at batch 1 and --latency-batch (CUDA events on GPU, perf_counter on CPU). The progress bar shows on a terminal.
"""
import argparse
import json
import os
import sys
from contextlib import nullcontext

import torch
from tqdm import tqdm

import common
import data
from common import UserError
from models import build_model
from models.flops import count_flops, count_params, format_count

KINDS = ('vitae_train', 'cifar_base', 'seam_masks', 'seam_module')


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__.split('\n', 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('checkpoints', nargs='*', metavar='CKPT', help='checkpoints of this project; ratios are against the first')
    a('--model', default=None, help='with --weights: a ViTAE variant, resnet20 / vgg16_bn (CIFAR) or a timm model')
    a('--weights', default=None, metavar='PATH', help='weights file for --model (any format models/weights.py reads)')
    a('--weights-key', default=None, choices=('state_dict', 'state_dict_ema'), help='--weights: which weights')
    a('--allow-partial', action='store_true', help='--weights: load what fits, warn about the rest')
    a('--mlp', default='dense', choices=('dense', 'monarch', 'butterfly', 'pixelfly'), help='--model: MLP layers')
    a('--nblocks', type=int, default=4, help='--model: Monarch blocks')
    a('--monarch-attn', action='store_true', help='--model: Monarch attention qkv/proj too')
    a('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE', help='--model: more constructor keywords')
    a('--dataset', required=True, choices=(*data.NAMES, 'folder'),
      help='folder: any ImageFolder tree (--data-dir), classes = its class folders')
    a('--data-dir', default=None)
    a('--split', default='test', choices=('test', 'val'))
    a('--data-seed', type=int, default=None, help="split seed (default: the checkpoint's data_seed, else 0)")
    a('--img-size', type=int, default=None, help="default: the checkpoint's img_size")
    a('--batch-size', type=int, default=256)
    a('--workers', type=int, default=0)
    a('--per-class', action='store_true', help='also print per-class accuracy')
    a('--real-json', default=None, help='ImageNet ReaL labels (real.json), with --dataset imagenet --split val')
    a('--nproc', type=int, default=1, help='processes (mp.spawn); under torchrun the launcher decides')
    a('--amp', default='none', choices=('none', 'bf16', 'fp16'))
    a('--no-ema', action='store_true', help="vitae_train: evaluate the raw weights, not the EMA")
    a('--json', default=None, metavar='PATH', help='write all numbers to this JSON file')
    a('--latency-batch', type=int, default=64)
    a('--latency-iters', type=int, default=10, help='timed forwards per batch size (0 = skip latency)')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=('cpu', 'cuda'))
    a('--threads', type=int, default=0, help='torch CPU threads per process (0 = torch default)')
    return p.parse_args(argv)


def check_args(args):
    if args.batch_size < 1 or args.nproc < 1 or args.latency_batch < 1 or args.latency_iters < 0:
        raise UserError('--batch-size, --nproc and --latency-batch must be >= 1 and --latency-iters >= 0')
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda but no CUDA device is visible; use --device cpu')
    if (args.weights_key or args.allow_partial) and not args.weights:
        raise UserError('--weights-key and --allow-partial apply to --weights PATH; pass one or drop them')
    if bool(args.model) != bool(args.weights):
        raise UserError('--model and --weights go together (a model name and the weights file to load into it)')
    if not args.checkpoints and not args.weights:
        raise UserError('nothing to evaluate: pass checkpoints of this project and/or --model NAME --weights PATH')
    if args.real_json and (args.dataset != 'imagenet' or args.split != 'val'):
        raise UserError('--real-json needs --dataset imagenet --split val (ReaL relabels the ImageNet val set)')
    if args.json:  # checked now: the results would otherwise be computed and then lost
        common.check_output_file(args.json, '--json')


# ------------------------------------------------------------------------------------------------ checkpoints

def dataset_classes(args):
    """The class count of --dataset ('folder': its class folders; a missing folder is a one-line error)."""
    if args.dataset == 'folder':
        return len(data.folder_classes(args.data_dir))
    return data.dataset_info(args.dataset)['num_classes']


def prepare(path, args):
    """Load ``path`` (weights_only) and describe how to evaluate it: model, label mapping, image size."""
    ck = common.load_checkpoint(path, KINDS)
    kind, cfg, cargs = ck['kind'], ck['model'], ck.get('args') or {}
    try:
        model = build_model(cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f'{path!r}: cannot rebuild its model {cfg!r} ({e})') from None
    state, weights = ck['state_dict'], 'model'
    if kind == 'vitae_train' and ck.get('ema') is not None and not args.no_ema:
        state, weights = ck['ema'], 'ema'
    if kind == 'seam_masks':  # masks are parameters that exist only once enabled
        for m in model.modules():
            if hasattr(m, 'enable_masks'):
                m.enable_masks(ck.get('mask_granularity', 'weight'))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f'{path!r}: its state_dict does not fit its model config ({str(e).splitlines()[0]})') from None
    n_data = int(cargs.get('num_classes', 10)) if args.dataset == 'synthetic' else dataset_classes(args)
    task, classes = None, None
    if kind in ('seam_masks', 'seam_module'):
        task, classes = ck.get('task') or cargs.get('task'), list(ck.get('classes') or [])
        if not classes or not all(0 <= c < n_data for c in classes):
            raise UserError(f"{path!r}: its task classes {classes} do not exist in {args.dataset} ({n_data} classes)")
        n_expect = 2 if task == 'binary' else len(classes)
    else:
        n_expect = n_data
    img = args.img_size or cargs.get('img_size') or cfg.get('kwargs', {}).get('img_size') or 32
    model.eval()
    with torch.no_grad():
        n_out = model(torch.zeros(1, 3, img, img)).shape[-1]
    if n_out != n_expect:
        raise UserError(f"{path!r} outputs {n_out} classes but {args.dataset}"
                        f"{' (task ' + str(task) + ')' if task else ''} has {n_expect}; pass the --dataset it was "
                        'trained on')
    name = f"{cfg['name']}" + (f"/{cfg['kwargs']['mlp']}" if 'mlp' in cfg.get('kwargs', {}) else '')
    data_seed = args.data_seed if args.data_seed is not None else int(cargs.get('data_seed', 0))
    return dict(path=path, kind=kind, model=model, name=name, weights=weights, task=task, classes=classes,
                seed=int(cargs.get('seed', 0)), img_size=int(img), n_classes=n_out, data_seed=data_seed,
                n_data_classes=n_data)


def prepare_weights(args, quiet=False):
    """--model NAME --weights PATH: the model built and loaded (see the module docstring), described like
    ``prepare``'s checkpoints."""
    from models import family_of, parse_model_kwargs
    from models.structured import describe_key_problems, load_projected
    from models.weights import load_weights
    info = data.dataset_info(args.dataset)
    n, img = dataset_classes(args), args.img_size or info['img_size']
    # this project's CIFAR nets and torchvision ResNets (SeaM's bases) before timm, whose resnet18 has the same keys
    family = family_of(args.model, ('vitae', 'cifar', 'torchvision', 'timm'))
    if family in ('cifar', 'torchvision'):  # CNNs (chenyaofo / torchvision state-dict keys): no MLP to convert
        if args.mlp != 'dense' or args.monarch_attn:
            raise UserError(f'{args.model} is a CNN without MLP blocks: drop --mlp/--monarch-attn')
        kwargs = dict(num_classes=n)
    else:
        kwargs = dict(num_classes=n, img_size=img, mlp=args.mlp, nblocks=args.nblocks,
                      monarch_attn=args.monarch_attn and args.mlp != 'dense',
                      impl='ref' if args.device == 'cpu' else 'auto')
    kwargs.update(parse_model_kwargs(args.model_kwargs))
    cfg = {'family': family, 'name': args.model, 'kwargs': kwargs}
    try:
        model = build_model(cfg)
    except TypeError as e:
        raise UserError(f'{args.model} cannot be built with {kwargs}: {e}') from None
    state, winfo = load_weights(args.weights, args.weights_key)
    res = load_projected(model, state, allow_partial=args.allow_partial, name=f'{args.model} (mlp={args.mlp})')
    left = describe_key_problems(res['missing'], res['unexpected'], res['mismatched'])
    if left and not quiet:
        print(f'warning: {args.weights}: --allow-partial left these as initialised: {left}', file=sys.stderr)
    model.eval()
    name = args.model + (f'/{args.mlp}' if args.mlp != 'dense' else '')
    return dict(path=args.weights, kind=winfo['format'], model=model, name=name, weights=winfo['key'] or 'file',
                task=None, classes=None, seed=0, img_size=int(img), n_classes=n, n_data_classes=n,
                data_seed=args.data_seed if args.data_seed is not None else 0)


def prepare_all(args, quiet=False):
    """Every entry to evaluate: the checkpoints, then --model/--weights."""
    entries = [prepare(p, args) for p in args.checkpoints]
    return entries + ([prepare_weights(args, quiet)] if args.weights else [])


def eval_dataset(e, args):
    """The dataset (items (x, y, index)) a prepared checkpoint is scored on."""
    n = e['n_data_classes']
    ds = data.build_dataset(args.dataset, args.split, args.data_dir, e['img_size'], seed=e['data_seed'],
                            num_classes=n if args.dataset == 'synthetic' else None, return_index=True)
    # a folder holding some wnid-named classes: labels = their ImageNet indices (other names: folder positions)
    if args.dataset == 'imagenet' and set(ds.classes) <= set(data.imagenet_class_index()):
        lmap = data.imagenet_label_map(ds.classes)
        if lmap is not None:
            ds = data.TaskSubset(ds, range(len(ds)), lmap, return_index=True)
    if e['task'] is None:
        return ds
    # the same draw as reengineer_seam.py: data.task_indices
    idx, lmap = data.task_indices(ds.targets, 'binary' if e['task'] == 'binary' else 'multiclass', e['classes'], n,
                                  e['seed'])
    return data.TaskSubset(ds, idx, lmap, return_index=True)


# ------------------------------------------------------------------------------------------------ measuring

def autocast_ctx(args, device):
    if args.amp == 'none':
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == 'bf16' else torch.float16)


@torch.no_grad()
def evaluate(e, args, rank, world_size, device, real):
    """Summed-over-ranks counts: correct top-1 / top-5, samples, per-class correct / totals, ReaL correct / counted."""
    ds = eval_dataset(e, args)
    aligned = data.real_labels_for(ds, real) if real is not None else None
    loader = data.build_loader(ds, args.batch_size, distributed=world_size > 1, rank=rank, world_size=world_size,
                               num_workers=args.workers, exact=True)
    model, k = e['model'].to(device).eval(), e['n_classes']
    c1 = c5 = n = r_ok = r_n = 0
    cls_ok, cls_n = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    bar = tqdm(loader, desc=e['path'][-40:], disable=True if rank != 0 else None, file=sys.stderr, leave=False)
    for x, y, idx in bar:
        with autocast_ctx(args, device):
            logits = model(x.to(device, non_blocking=True)).float().cpu()
        top = logits.topk(min(5, k), dim=1).indices
        hit1 = top[:, 0] == y
        c1 += int(hit1.sum())
        c5 += int((top == y[:, None]).any(1).sum())
        n += len(y)
        cls_n += torch.bincount(y, minlength=k).double()
        cls_ok += torch.bincount(y[hit1], minlength=k).double()
        if aligned is not None:
            ok, cnt = data.real_correct(top[:, 0], idx, aligned)
            r_ok, r_n = r_ok + ok, r_n + cnt
    tot = common.all_reduce_sum([c1, c5, n, r_ok, r_n, *cls_ok.tolist(), *cls_n.tolist()])
    model.cpu()
    return dict(top1=tot[0], top5=tot[1], n=tot[2], real_ok=tot[3], real_n=tot[4], cls_ok=tot[5:5 + k],
                cls_n=tot[5 + k:])


def eval_task(e, args):
    """(label, key) of the images and labels a prepared checkpoint is scored on: accuracies of two rows are only
    comparable (a ratio) when their keys are equal (same dataset, split, split seed and task)."""
    where = f"{args.dataset} {args.split}" + (f" (split seed {e['data_seed']})" if e['data_seed'] else '')
    if e['task'] is None:
        label = f"{where}: all {e['n_classes']} classes"
        key = (args.dataset, args.split, e['data_seed'], None, None, None)
    elif e['task'] == 'binary':
        label = f"{where}: binary, class {e['classes'][0]} vs seeded negatives (seed {e['seed']})"
        key = (args.dataset, args.split, e['data_seed'], 'binary', tuple(e['classes']), e['seed'])
    else:
        label = f"{where}: {e['task']} over classes {e['classes']}"
        key = (args.dataset, args.split, e['data_seed'], e['task'], tuple(e['classes']), None)
    return label, key


def measure(e, counts, args, device):
    """Everything reported for one checkpoint (rank 0)."""
    model, n = e['model'], max(counts['n'], 1)
    x1 = torch.zeros(1, 3, e['img_size'], e['img_size'])
    label, key = eval_task(e, args)
    r = dict(checkpoint=e['path'], kind=e['kind'], model=e['name'], weights=e['weights'], task=e['task'],
             classes=e['classes'], eval_task=label, eval_task_key=list(key), samples=int(counts['n']),
             top1=100 * counts['top1'] / n,
             top5=100 * counts['top5'] / n if e['n_classes'] >= 5 else None,
             real=100 * counts['real_ok'] / counts['real_n'] if counts['real_n'] else None,
             real_samples=int(counts['real_n']), params=count_params(model),
             flops_per_image=count_flops(model, x1)['per_image'])
    if args.per_class:
        r['per_class'] = [100 * ok / c if c else None for ok, c in zip(counts['cls_ok'], counts['cls_n'])]
    if args.latency_iters:
        net = model.to(device).eval()
        for b in (1, args.latency_batch):
            r[f'latency_b{b}_ms'] = common.latencies({'m': net}, b, e['img_size'], args.latency_iters, device,
                                                     lambda: autocast_ctx(args, device))['m']
        model.cpu()
    return r


# ------------------------------------------------------------------------------------------------ report

# Rows that depend on the images and labels scored: a ratio between two checkpoints only on the same task.
TASK_ROWS = ('top1', 'top5', 'real')
NOT_COMPARABLE = 'n/a (different tasks)'


def vs_first(r, ref, key):
    """Ratio of ``r[key]`` to the first checkpoint's, ``NOT_COMPARABLE`` for accuracies on another task, None
    where either value is missing."""
    if r.get(key) is None or not ref.get(key):
        return None
    if key in TASK_ROWS and r['eval_task_key'] != ref['eval_task_key']:
        return NOT_COMPARABLE
    return r[key] / ref[key]


def table(results, args):
    """Side-by-side text table; ratios against the first checkpoint (accuracies only on the same task)."""
    rows = [('kind', 'kind', None), ('model', 'model', None), ('weights', 'weights', None),
            ('task', 'eval_task', None), ('samples', 'samples', None), ('top-1 %', 'top1', '.2f'),
            ('top-5 %', 'top5', '.2f'), ('ReaL %', 'real', '.2f'), ('params', 'params', 'n'),
            ('FLOPs/image', 'flops_per_image', 'n')]
    rows += [(f'latency b{b} ms', f'latency_b{b}_ms', '.3f') for b in (1, args.latency_batch)]
    ref = results[0]
    cols = [[label] for label, _, _ in rows]
    heads = ['checkpoint'] + [r['checkpoint'] if len(r['checkpoint']) <= 32 else '...' + r['checkpoint'][-29:]
                              for r in results]
    for j, r in enumerate(results):
        for i, (_, key, fmt) in enumerate(rows):
            v = r.get(key)
            if v is None:
                cols[i].append('-')
                continue
            s = str(v) if fmt is None else (format_count(v) if fmt == 'n' else format(v, fmt))
            q = vs_first(r, ref, key) if j and fmt is not None and key != 'samples' else None
            if q is not None:
                s += f', ratio {q}' if q == NOT_COMPARABLE else f' ({q:.2f}x)'
            cols[i].append(s)
    keep = [c for c in cols if any(v != '-' for v in c[1:])]
    widths = [max(len(x) for x in col) for col in zip(heads, *keep)]
    lines = ['  '.join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [heads] + keep]
    return '\n'.join(lines)


def worker(rank, world_size, args):
    common.prime_vml()  # a spawned worker is a new process
    if args.threads:
        torch.set_num_threads(args.threads)
    elif world_size > 1 and args.device == 'cpu':  # N CPU processes share the cores instead of oversubscribing
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    device = common.process_device(args.device, rank)
    try:
        main_rank = common.setup_distributed(rank, world_size, device)  # gloo for CPU runs, nccl for CUDA
        entries = prepare_all(args, quiet=True)
        real = data.load_real_labels(args.real_json) if args.real_json else None
        if real is not None and any(e['task'] for e in entries):
            raise UserError('--real-json scores the 1000 ImageNet classes; a SeaM task checkpoint has other labels')
        results = []
        for e in entries:
            counts = evaluate(e, args, rank, world_size, device, real)
            if main_rank:
                results.append(measure(e, counts, args, device))
            common.barrier()
        if main_rank:
            print(table(results, args))
            if args.per_class:
                for r in results:
                    names = [str(c) for c in r['classes']] if r['classes'] else None
                    if r['task'] == 'binary':
                        names = [f"target {r['classes'][0]}", 'other']
                    print(f"per-class top-1 % of {r['checkpoint']}:")
                    print('  ' + ', '.join(f"{names[i] if names else i}: {'-' if a is None else f'{a:.1f}'}"
                                           for i, a in enumerate(r['per_class'])))
            if args.json:
                keys = [k for k in ('top1', 'top5', 'real', 'params', 'flops_per_image') if k in results[0]]
                keys += [k for k in results[0] if k.startswith('latency_')]
                for r in results[1:]:
                    r['vs_first'] = {k: vs_first(r, results[0], k) for k in keys}
                with open(args.json, 'w') as f:
                    json.dump({'dataset': args.dataset, 'split': args.split, 'world_size': world_size,
                               'backend': torch.distributed.get_backend() if torch.distributed.is_initialized()
                               else None,
                               'amp': args.amp, 'device': str(device), 'results': results}, f, indent=2)
    finally:
        common.cleanup()


def main(argv=None):
    common.prime_vml()  # before any op: MKL's first vector-math call on several threads can be wrong (common.py)
    args = get_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Validate everything in this process first, so a user mistake is one line before any process starts.
    entries = prepare_all(args)
    for key in {(e['img_size'], e['data_seed']) for e in entries}:
        e = next(x for x in entries if (x['img_size'], x['data_seed']) == key)
        if args.real_json:
            data.real_labels_for(eval_dataset(e, args), data.load_real_labels(args.real_json))
        elif args.dataset != 'digits' and args.dataset != 'synthetic':
            eval_dataset(e, args)  # missing / malformed folder -> DataError now
    del entries
    common.launch(worker, args, args.nproc)


if __name__ == '__main__':
    common.run_main(main)
