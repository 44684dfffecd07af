"""Train ViTAE with Monarch (or dense / butterfly / pixelfly) MLPs; one worker for 1 CPU, 1 GPU, mp.spawn and torchrun.

    python train_vitae_monarch.py                                  # ViTAE-Tiny, Monarch MLPs, digits, 1 CPU process
    python train_vitae_monarch.py --device cuda --amp bf16         # one GPU
    python train_vitae_monarch.py --device cuda --nproc 4          # 4 GPUs on this machine (mp.spawn, free port)
    python train_vitae_monarch.py --nproc 2                        # 2 CPU processes (gloo)
    torchrun --nproc_per_node 4 --max-restarts 3 train_vitae_monarch.py --device cuda      # torchrun, one machine
    torchrun --nnodes 2 --nproc_per_node 8 --max-restarts 3 --rdzv_backend c10d --rdzv_endpoint HOST:29400 \\
        --rdzv_id exp1 train_vitae_monarch.py --device cuda    # multi-node: same command on every node
    python train_vitae_monarch.py --mlp dense --output runs/dense  # dense baseline, then fine-tune it as Monarch:
    python train_vitae_monarch.py --init-from runs/dense/001/last.pt
    python train_vitae_monarch.py --resume auto                    # continue the latest run under --output
    python train_vitae_monarch.py --model vit_tiny_patch16_224 --model-kwargs patch_size=4 --mlp monarch  # any timm
    python train_vitae_monarch.py --init-from ViTAE-T.pth.tar --weights-key state_dict_ema --dataset imagenet \
        --data-dir DIR --img-size 224 --device cuda --amp bf16    # Monarch fine-tune from an official dense checkpoint
    # ImageNet (the paper's recipe): --dataset imagenet --data-dir DIR --img-size 224 --epochs 300 --batch-size 1024
    #     --blr 5e-4 --warmup-epochs 5 --mixup 0.8 --cutmix 1.0 --drop-path 0.1 --ema-halflife-kimg 17700 --amp bf16

Under torchrun, a worker group restarted after a failure (--max-restarts N) continues the run folder its first
attempt created, from its last.pt (nothing to pass: torchrun's store remembers the folder); a new torchrun command
starts a new run unless given --resume. The python launches (1 process, --nproc) continue with --resume auto|PATH.
On resume, flags that define the run (model, MLP, data, seed, optimizer; the process count when it would change the
batch order) must match the checkpoint's; the others (epochs, lr, batch size, warmup, regularisation, logging) may
change: they are applied (the lr schedule is rebuilt), listed in one line and recorded in args.json's "history".
A non-finite loss or gradient norm skips the step; more than --max-bad-steps in a row stops the run (exit 3)
before last.pt is written. Determinism: README, "Reproducibility and failures".

--batch-size is the GLOBAL batch (split evenly over processes); the learning rate is --blr * global batch / 512.
Each run writes runs/.../NNN/{args.json, log.jsonl, TensorBoard events, last.pt}; last.pt is rewritten atomically
after every epoch with everything needed to continue bit for bit (model, optimizer, scheduler, scaler, EMA, RNGs).
EMA: the official recipe's per-step decay 0.99996 assumes batch 1024 (and the official code disables EMA below a
global batch of 512); here the decay is derived per step from a half-life counted in images,
decay = 0.5 ** (global_batch / (1000 * ema_halflife_kimg)), so it means the same at any batch size, and it is
ramped in as min(decay, (1 + step) / (10 + step)) so the average does not remember the random initialisation.
"""
import argparse
import copy
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
from common import NonFiniteError, UserError
from models import build_model, family_of, parse_model_kwargs

MLPS = ('dense', 'monarch', 'butterfly', 'pixelfly')


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--model', default='vitae_basic_tiny', help='vitae_basic_tiny | vitae_basic_6m | vitae_basic_13m | '
      'vitae_basic_small, or any timm model name (built with pretrained=False)')
    a('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE', help='constructor keywords, e.g. patch_size=4')
    a('--mlp', default='monarch', choices=MLPS, help='linear layers of every MLP block (models/structured.py)')
    a('--nblocks', type=int, default=4, help='Monarch blocks (must divide the MLP widths)')
    a('--monarch-attn', action='store_true', help='also make attention qkv/proj Monarch')
    a('--impl', default=None, choices=('auto', 'ref', 'kernel'), help='structured-layer kernel (default: ref on CPU, auto on GPU)')
    a('--dataset', default='digits', choices=data.NAMES)
    a('--data-dir', default=None, help='dataset folder (cifar10/cifar100/imagenet)')
    a('--img-size', type=int, default=32)
    a('--augment', type=int, default=1, choices=(0, 1), help='training augmentation (1 = on)')
    a('--epochs', type=int, default=15)
    a('--batch-size', type=int, default=64, help='global batch, split over the processes')
    a('--eval-batch-size', type=int, default=256)
    a('--blr', type=float, default=1e-2, help='learning rate per 512 images: lr = blr * batch / 512')
    a('--min-lr-ratio', type=float, default=0.01, help='cosine ends at lr * this')
    a('--warmup-epochs', type=float, default=2.0)
    a('--weight-decay', type=float, default=0.05)
    a('--opt', default='adamw', choices=('adamw', 'sgd'), help='sgd = SGD with momentum 0.9 (same lr rule)')
    a('--label-smoothing', type=float, default=0.1)
    a('--mixup', type=float, default=0.0, help='mixup alpha (0 = off; the ImageNet recipe uses 0.8)')
    a('--cutmix', type=float, default=0.0, help='cutmix alpha (0 = off; the ImageNet recipe uses 1.0)')
    a('--drop-path', type=float, default=0.1)
    a('--performer-drop', type=float, default=0.1, help="dropout in the reduction cells' performers")
    a('--ema-halflife-kimg', type=float, default=2.0, help='EMA half-life in thousands of images (0 = no EMA)')
    a('--clip-grad', type=float, default=5.0, help='max global grad norm (0 = off)')
    a('--amp', default='none', choices=('none', 'bf16', 'fp16'))
    a('--grad-checkpointing', action='store_true', help='recompute normal cells in backward (saves memory)')
    a('--sync-bn', type=int, default=1, choices=(0, 1), help='batch-norm statistics over all processes (1 = on)')
    a('--device', default='cpu', choices=('cpu', 'cuda'))
    a('--nproc', type=int, default=1, help='processes to start with mp.spawn (ignored under torchrun)')
    a('--workers', type=int, default=0, help='DataLoader workers per process')
    a('--threads', type=int, default=0, help='CPU threads per process (0 = cores / local processes)')
    a('--seed', type=int, default=0)
    a('--data-seed', type=int, default=0, help='seed of the train/val/test split (keep fixed across runs)')
    a('--output', default='runs/vitae_monarch', help='runs are numbered folders under this directory')
    a('--resume', default='', help="'auto' (latest run under --output, else a new run) or a path to last.pt")
    a('--init-from', default='', help='weights to start from (this project\'s, official ViTAE/timm, raw state dict, '
      '.safetensors); dense MLP weights are projected into the structured layers')
    a('--weights-key', default=None, choices=('state_dict', 'state_dict_ema'), help='--init-from: which weights')
    a('--allow-partial', action='store_true', help='--init-from: load what fits, warn about the rest (e.g. the head)')
    a('--num-classes', type=int, default=10, help='classes of the synthetic dataset')
    a('--limit-train-batches', type=int, default=0, help='stop each epoch after this many steps (tests)')
    a('--limit-eval-batches', type=int, default=0, help='evaluate on this many batches only (tests; not exact)')
    a('--stop-epoch', type=int, default=0, help='exit after this epoch (the schedule still spans --epochs)')
    a('--no-test', action='store_true', help='skip the final test-set evaluation')
    a('--progress', type=int, default=1, choices=(0, 1), help='tqdm progress bar on rank 0')
    a('--max-bad-steps', type=int, default=2,
      help='skip at most this many consecutive steps with a non-finite loss or gradient norm; one more stops the '
           'run (exit 3) before last.pt is touched (with --amp fp16 the grad scaler handles non-finite gradients)')
    return p.parse_args(argv)


def model_config(args, mlp=None):
    info = data.dataset_info(args.dataset)
    num_classes = args.num_classes if args.dataset == 'synthetic' else info['num_classes']
    impl = args.impl or ('ref' if args.device == 'cpu' else 'auto')
    family = family_of(args.model)
    kwargs = dict(num_classes=num_classes, img_size=args.img_size, drop_path_rate=args.drop_path, mlp=mlp or args.mlp,
                  nblocks=args.nblocks, monarch_attn=args.monarch_attn and (mlp or args.mlp) != 'dense', impl=impl)
    if family == 'vitae':
        kwargs['performer_drop_rate'] = args.performer_drop
    extra = parse_model_kwargs(args.model_kwargs)
    taken = sorted(set(extra) & (set(kwargs) | {'performer_drop_rate'}))
    if taken:
        raise UserError(f"--model-kwargs {', '.join(taken)}: set these with their own flags (--img-size, --mlp, ...)")
    return {'family': family, 'name': args.model, 'kwargs': dict(kwargs, **extra)}


def load_init(args, config, model):
    """--init-from into ``model``: any weights file (models/weights.py); dense MLP weights projected into the
    structured layers (models/structured.py). Keys that do not fit: one-line error, or with --allow-partial a
    warning. Returns the line to print."""
    from models.structured import describe_key_problems, load_projected
    from models.weights import load_weights
    state, info = load_weights(args.init_from, args.weights_key)
    if info['format'] == 'project':
        check_checkpoint(args.init_from, config, 'init')  # same variant, dense weights
    res = load_projected(model, state, allow_partial=args.allow_partial, name=f'{args.model} (mlp={args.mlp})')
    left = describe_key_problems(res['missing'], res['unexpected'], res['mismatched'])
    src = f"{info['format']}{', ' + repr(info['key']) if info['key'] else ''}"
    return (f"initialised from {args.init_from} ({src}): {len(res['projected'])} dense layers projected into "
            f"{args.mlp} layers" + (f' | warning: --allow-partial left these as initialised: {left}' if left else ''))


RUN_DIR_KEY = 'monarch_seam/run_dir'


def resolve_run(args):
    """(checkpoint to resume or None, existing run folder to continue or None).

    A worker that torchrun restarted (restart count > 0) continues the run folder its first attempt created (read
    from torchrun's agent store): from its last.pt, or from scratch in the same folder when the first attempt died
    before its first checkpoint. Otherwise ``--resume auto|PATH`` decides."""
    if common.restart_count() > 0:
        store = common.agent_store()
        if store is not None and store.check([RUN_DIR_KEY]):
            run_dir = store.get(RUN_DIR_KEY).decode()
            ck = os.path.join(run_dir, 'last.pt')
            return (ck if os.path.isfile(ck) else None), run_dir
    if args.resume == 'auto':
        ck = common.latest_checkpoint(args.output)
        return ck, (os.path.dirname(os.path.abspath(ck)) if ck else None)
    if args.resume:
        return args.resume, os.path.dirname(os.path.abspath(args.resume))
    return None, None


# Flags that define what is trained: a resume with any of them changed is refused (the checkpoint's weights,
# optimizer state or data split would not mean what the new flags say). Every other flag may change on resume
# and is applied (lr and schedule rebuilt, batch size, epochs, regularisation, logging, devices).
FIXED = ('model', 'model_kwargs', 'mlp', 'nblocks', 'monarch_attn', 'dataset', 'img_size', 'data_seed', 'num_classes',
         'seed', 'opt', 'augment')
# how to start, not what is trained:
NOT_COMPARED = ('resume', 'output', 'init_from', 'weights_key', 'allow_partial', 'nproc')


def steps_per_epoch_of(n_train, world, batch, limit):
    """Optimizer steps per epoch and whether they use DistributedSampler's padding (repeated samples)."""
    spe = math.ceil(n_train / world) // (batch // world)
    if limit:
        spe = min(spe, limit)
    return spe, spe * batch > n_train


def resume_changes(ck, args, world, n_train, path):
    """{flag: (old, new)} of the flags that differ from the checkpoint's run (world size as 'processes');
    UserError for a change that cannot apply."""
    old = ck['args']
    if args.dataset != 'synthetic':
        old = {k: v for k, v in old.items() if k != 'num_classes'}
    changed = {k: (old[k], v) for k, v in vars(args).items() if k in old and k not in NOT_COMPARED and old[k] != v}
    if args.dataset != 'synthetic':
        changed.pop('num_classes', None)
    fixed = [k for k in changed if k in FIXED]
    if (old.get('ema_halflife_kimg', 0) > 0) != (args.ema_halflife_kimg > 0):
        fixed.append('ema_halflife_kimg')
    if fixed:
        raise UserError(f"{path} was trained with {', '.join(f'--{flag(k)} {old.get(k)}' for k in fixed)}; resuming "
                        f"with {', '.join(f'--{flag(k)} {getattr(args, k)}' for k in fixed)} cannot apply (start a "
                        'new run with a new --output, or resume with the original values)')
    old_world = int(ck.get('world_size', world))
    if old_world != world:
        old_pad = steps_per_epoch_of(n_train, old_world, old.get('batch_size', args.batch_size),
                                     old.get('limit_train_batches', 0))[1]
        new_pad = steps_per_epoch_of(n_train, world, args.batch_size, args.limit_train_batches)[1]
        if old_pad or new_pad:
            raise UserError(f'{path} was trained on {old_world} process(es); {world} would change the order of the '
                            'training batches (padded last batch of DistributedSampler); resume with '
                            f'{old_world} processes')
        changed['processes'] = (old_world, world)
    return changed


def flag(key):
    return key.replace('_', '-')


def check_checkpoint(path, config, what):
    """Load a checkpoint and make sure it fits ``config``'s architecture; one-line UserError otherwise."""
    ck = common.load_checkpoint(path, expected_kinds=('vitae_train',))
    got, want = ck['model'], config
    if what == 'resume':
        keys = ('num_classes', 'img_size', 'mlp', 'nblocks', 'monarch_attn')
        if got.get('name') != want['name'] or any(got['kwargs'].get(k) != want['kwargs'][k] for k in keys):
            raise UserError(f"{path} holds a {got.get('name')} with {dict((k, got['kwargs'].get(k)) for k in keys)}, "
                            f"not this run's {want['name']} with {dict((k, want['kwargs'][k]) for k in keys)}; "
                            "pass matching flags or a new --output")
    else:  # init-from: a dense model of the same variant and class count
        if got.get('name') != want['name'] or got['kwargs'].get('mlp') != 'dense':
            raise UserError(f"--init-from needs a dense {want['name']} checkpoint, {path} holds "
                            f"{got.get('name')} with mlp={got['kwargs'].get('mlp')!r}")
    return ck


def validate(args):
    """Every user mistake we can see before starting processes -> UserError/ValueError (one line, exit 2)."""
    family_of(args.model)  # unknown name -> ValueError with the closest names
    for name in ('epochs', 'batch_size', 'eval_batch_size', 'nproc'):
        if getattr(args, name) < 1:
            raise UserError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    for name in ('workers', 'threads', 'limit_train_batches', 'limit_eval_batches', 'stop_epoch', 'max_bad_steps'):
        if getattr(args, name) < 0:
            raise UserError(f'--{flag(name)} must be >= 0, got {getattr(args, name)}')
    for name in ('blr', 'min_lr_ratio', 'warmup_epochs', 'weight_decay', 'label_smoothing', 'mixup', 'cutmix',
                 'drop_path', 'performer_drop', 'ema_halflife_kimg', 'clip_grad'):
        v = getattr(args, name)
        if not math.isfinite(v) or v < 0:
            raise UserError(f'--{flag(name)} must be a finite number >= 0, got {v}')
    for name in ('label_smoothing', 'drop_path', 'performer_drop', 'min_lr_ratio'):
        if getattr(args, name) > 1 or (name != 'min_lr_ratio' and getattr(args, name) == 1):
            raise UserError(f'--{flag(name)} must be {"<= 1" if name == "min_lr_ratio" else "< 1"}, '
                            f'got {getattr(args, name)}')
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda but no CUDA device is available; use --device cpu')
    world = int(os.environ['WORLD_SIZE']) if common.under_torchrun() else args.nproc
    if args.batch_size % world:
        raise UserError(f'--batch-size {args.batch_size} must be divisible by the number of processes ({world})')
    if (args.mixup > 0 or args.cutmix > 0) and (args.batch_size // world) % 2:
        raise UserError('mixup/cutmix need an even batch per process; change --batch-size')
    n_train = len(data.build_dataset(args.dataset, 'train', args.data_dir, args.img_size, seed=args.data_seed,
                                     num_classes=args.num_classes if args.dataset == 'synthetic' else None))
    if n_train < args.batch_size:
        raise UserError(f'--batch-size {args.batch_size} exceeds the {n_train} training images')
    config = model_config(args)
    try:
        model = build_model(config)  # raises ValueError naming a bad nblocks / img_size / ...
    except TypeError as e:  # a timm constructor that does not take a --model-kwargs keyword
        raise UserError(f'{args.model} cannot be built with {config["kwargs"]}: {e}') from None
    if (args.weights_key or args.allow_partial) and not args.init_from:
        raise UserError('--weights-key and --allow-partial apply to --init-from PATH; pass one or drop them')
    if args.init_from:
        load_init(args, config, model)
    resume, run_dir = resolve_run(args)
    common.check_output_dir(run_dir or args.output, '--resume' if run_dir else '--output')
    if resume:
        ck = check_checkpoint(resume, config, 'resume')
        resume_changes(ck, args, world, n_train, resume)


def lr_lambda(total, warmup, min_ratio):
    def f(step):  # linear warmup, then cosine from 1 to min_ratio, evaluated every optimizer step
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


@torch.no_grad()
def ema_update(ema, model, decay):
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.lerp_(m, 1 - decay)
        else:
            e.copy_(m)


@torch.no_grad()
def evaluate(model, loader, device, autocast, limit=0):
    """Exact over all ranks: the loader's sampler gives every sample to one rank; sums are all-reduced."""
    model.eval()
    loss_sum = correct = count = 0.0
    for i, (x, y) in enumerate(loader):
        if limit and i >= limit:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction='sum').item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    loss_sum, correct, count = common.all_reduce_sum([loss_sum, correct, count])
    return loss_sum / max(count, 1), correct / max(count, 1)


def worker(rank, world_size, args):
    # Process-wide settings changed below are restored at the end (the worker also runs inside test processes).
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        train(rank, world_size, args)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        common.cleanup()


def train(rank, world_size, args):
    lrank = common.local_rank(rank)
    device = common.process_device(args.device, rank)
    is_main = common.setup_distributed(rank, world_size, device)  # gloo for CPU runs, nccl for CUDA; selects the GPU
    if device.type == 'cpu':
        local_world = int(os.environ.get('LOCAL_WORLD_SIZE', world_size))
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_world))
    common.prime_vml()  # before any op: MKL's first vector-math call on two threads can be wrong (common.py)
    torch.use_deterministic_algorithms(device.type == 'cpu', warn_only=True)
    say = print if is_main else (lambda *a, **k: None)

    # --- where this run lives: rank 0 decides (the resumed folder, or a new numbered one made below, once every
    # check has passed) and tells the others
    resume, run_dir = common.broadcast_object(resolve_run(args) if is_main else None)

    # --- data: global batch split evenly; DistributedSampler shards one shared permutation (1 process == N)
    common.seed_everything(args.seed)
    ds_kw = dict(data_dir=args.data_dir, img_size=args.img_size, seed=args.data_seed,
                 num_classes=args.num_classes if args.dataset == 'synthetic' else None)
    train_set = data.build_dataset(args.dataset, 'train', augment=bool(args.augment), **ds_kw)
    val_set = data.build_dataset(args.dataset, 'val', **ds_kw)
    per_rank = args.batch_size // world_size
    dist = world_size > 1
    loader_kw = dict(distributed=dist, rank=rank, world_size=world_size, seed=args.seed, num_workers=args.workers,
                     pin_memory=device.type == 'cuda')
    train_loader = data.build_loader(train_set, per_rank, shuffle=True, drop_last=True, **loader_kw)
    val_loader = data.build_loader(val_set, args.eval_batch_size, **loader_kw)
    steps_per_epoch = len(train_loader)
    if args.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, args.limit_train_batches)
    total_steps = args.epochs * steps_per_epoch
    start_epoch = step = 0
    ck, changes = None, {}
    if resume:
        ck = check_checkpoint(resume, model_config(args), 'resume')
        start_epoch, step = ck['epoch'], ck['step']
        changes = resume_changes(ck, args, world_size, len(train_set), resume)
        total_steps = step + max(0, args.epochs - start_epoch) * steps_per_epoch

    # --- model (same init on every rank: built right after the shared seed), EMA, optimizer, schedule
    config = model_config(args)
    model = build_model(config)
    if getattr(model, 'structured_report', None):  # timm and ViTAE models: what the converter replaced
        from models.structured import format_report
        say(format_report(model.structured_report))
    if args.init_from:
        say(load_init(args, config, model))
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if dist and args.sync_bn:
        model = common.convert_sync_batchnorm(model, device)
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if args.ema_halflife_kimg > 0 else None
    decay_params = [p for p in model.parameters() if p.ndim > 1]  # matrices/convs; norms and biases get no decay
    other_params = [p for p in model.parameters() if p.ndim <= 1]
    lr = args.blr * args.batch_size / 512
    groups = [{'params': decay_params, 'weight_decay': args.weight_decay},
              {'params': other_params, 'weight_decay': 0.0}]
    optimizer = (torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999)) if args.opt == 'adamw'
                 else torch.optim.SGD(groups, lr=lr, momentum=0.9))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    ema_decay = 0.5 ** (args.batch_size / (1000 * args.ema_halflife_kimg)) if ema is not None else 0.0

    if resume:
        model.load_state_dict(ck['state_dict'])
        optimizer.load_state_dict(ck['optimizer'])  # moments; lr and weight decay come from this run's flags:
        for g, wd in zip(optimizer.param_groups, (args.weight_decay, 0.0)):
            g['lr'] = g['initial_lr'] = lr
            g['weight_decay'] = wd
        scaler.load_state_dict(ck['scaler'])
        if ema is not None and ck.get('ema') is not None:
            ema.load_state_dict(ck['ema'])
        start_epoch, step = ck['epoch'], ck['step']
        if len(ck['rng']) == world_size:
            common.set_rng_state(ck['rng'][rank])
        else:  # another process count: the exact RNG streams cannot be continued
            common.seed_everything(args.seed + 1000 * start_epoch + rank)
        say(f'resumed {resume} at epoch {start_epoch} (step {step})'
            + (f' after torchrun restart {common.restart_count()}' if common.restart_count() else ''))
        if changes:
            say('resume with changed flags (applied; lr schedule rebuilt for the remaining epochs): ' + ', '.join(
                f'{"" if k == "processes" else "--"}{flag(k)} {a} -> {b}' for k, (a, b) in changes.items()))
    else:
        common.seed_everything(args.seed + rank)  # per-rank randomness (drop path, mixup) from here on
    # The schedule is a function of the position in the run measured in this run's steps: resumed at epoch E after
    # S steps, step s is at E * steps_per_epoch + (s - S) (the same s when batch size and limits are unchanged).
    warmup = int(args.warmup_epochs * steps_per_epoch)
    offset = start_epoch * steps_per_epoch - step
    sched_total = args.epochs * steps_per_epoch
    schedule = lr_lambda(sched_total, warmup, args.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s + offset), last_epoch=step - 1)
    raw = model
    if dist:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[lrank] if device.type == 'cuda' else None)

    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        from timm.data import Mixup
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.label_smoothing,
                      num_classes=config['kwargs']['num_classes'])
    n_params = common.count_params(raw)
    run_dir_existed = run_dir is not None
    # --- every check passed: the run folder is made now (rank 0), and torchrun's store remembers it for restarts
    if is_main:
        if run_dir is None:
            run_dir = common.make_run_dir(args.output, vars(args))
        elif changes:  # args.json: this run's flags, with the history of what changed at which resume
            old = os.path.join(run_dir, 'args.json')
            history = []
            if os.path.isfile(old):
                with open(old) as f:
                    history = json.load(f).get('history', [])
            history.append({'epoch': start_epoch, 'step': step, 'changed': {k: list(v) for k, v in changes.items()}})
            common.write_json(old, {**vars(args), 'history': history})
        store = common.agent_store()
        if store is not None:
            store.set(RUN_DIR_KEY, run_dir)
    run_dir = common.broadcast_object(run_dir)
    say(f'{args.model} mlp={args.mlp}: {n_params:,} params | {args.dataset} {len(train_set)} train / {len(val_set)} '
        f'val | {world_size} process(es) x batch {per_rank} | lr {lr:.2e} | {total_steps} steps | run {run_dir}')
    # a resumed run (or a restarted one that had not saved yet) drops what was logged after its checkpoint
    logger = common.Logger(run_dir, enabled=is_main, resume_step=step if run_dir_existed else None,
                           keep_lines=ck.get('log_lines') if ck else 0)
    bad_steps = 0  # consecutive steps with a non-finite loss or gradient norm

    val_acc = ema_acc = float('nan')
    for epoch in range(start_epoch, args.epochs):
        data.set_epoch(train_loader, epoch)
        model.train()
        t0, seen, loss_sum = time.time(), 0, 0.0
        bar = tqdm(total=steps_per_epoch, desc=f'epoch {epoch + 1}/{args.epochs}', disable=not (is_main and args.progress),
                   leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(train_loader):
            if i >= steps_per_epoch:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mixup is not None:
                x, target = mixup(x, y)
            with autocast:
                logits = model(x)
            if mixup is not None:
                loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad > 0:
                scaler.unscale_(optimizer)
                norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            elif not scaler.is_enabled():
                norm = nn.utils.get_total_norm([q.grad for q in model.parameters() if q.grad is not None])
            # Non-finite guard: such a step is skipped (no update); the same decision on every rank (the gradient
            # norm is identical after DDP's all-reduce, the loss is not). With fp16 the scaler skips non-finite
            # gradients itself (and lowers its scale), so only the loss counts there.
            bad = not math.isfinite(loss.item()) or (not scaler.is_enabled() and not math.isfinite(norm.item()))
            if dist:
                bad = common.all_reduce_sum([float(bad)])[0] > 0
            bad_steps = bad_steps + 1 if bad else 0
            if bad_steps > args.max_bad_steps:
                raise NonFiniteError(
                    f'non-finite loss or gradient norm at step {step + 1} (epoch {epoch + 1}), {bad_steps} step(s) in '
                    f'a row (--max-bad-steps {args.max_bad_steps}); stopped before saving, so {run_dir}/last.pt keeps the '
                    'last finite weights; lower --blr or check the data and the checkpoint')
            if bad:
                say(f'step {step + 1}: non-finite loss or gradient norm, update skipped ({bad_steps} in a row)')
                optimizer.zero_grad(set_to_none=True)
            else:
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()
            step += 1
            if ema is not None and not bad:
                ema_update(ema, raw, min(ema_decay, (1 + step) / (10 + step)))
            loss_sum += loss.item() if not bad else 0.0
            seen += len(x) * world_size
            bar.update(1)
            bar.set_postfix(loss=f'{loss.item():.3f}')
            if is_main and step % 10 == 0:
                logger.log(step, **{'train/loss': loss.item(), 'train/lr': scheduler.get_last_lr()[0]})
        bar.close()
        epoch_time = time.time() - t0
        train_loss = common.all_reduce_sum([loss_sum])[0] / (max(1, min(i + 1, steps_per_epoch)) * world_size)
        val_loss, val_acc = evaluate(raw, val_loader, device, autocast, args.limit_eval_batches)
        if ema is not None:
            _, ema_acc = evaluate(ema, val_loader, device, autocast, args.limit_eval_batches)
        logger.log(step, **{'epoch': epoch + 1, 'train/epoch_loss': train_loss, 'val/loss': val_loss,
                            'val/acc': val_acc, 'val/ema_acc': ema_acc if ema is not None else -1.0,
                            'speed/images_per_s': seen / epoch_time, 'speed/epoch_s': epoch_time})
        say(f'epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f} | val loss {val_loss:.4f} acc '
            f'{100 * val_acc:.2f}% | EMA acc {100 * ema_acc:.2f}% | {seen / epoch_time:.0f} img/s | {epoch_time:.1f}s')
        rng = common.gather_objects(common.get_rng_state())
        bad_weights = [k for k, v in raw.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]
        if bad_weights:  # e.g. resumed from non-finite weights with fewer steps per epoch than --max-bad-steps
            raise NonFiniteError(f'non-finite weights after epoch {epoch + 1} ({bad_weights[0]}, ...); stopped, '
                                 f'{run_dir}/last.pt is untouched')
        if is_main:
            common.save_checkpoint({
                'project': common.PROJECT, 'kind': 'vitae_train', 'model': config, 'state_dict': raw.state_dict(),
                'args': vars(args), 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                'scaler': scaler.state_dict(), 'ema': ema.state_dict() if ema is not None else None,
                'epoch': epoch + 1, 'step': step, 'rng': rng, 'world_size': world_size,
                'val_acc': val_acc, 'ema_val_acc': ema_acc, 'log_lines': logger.lines}, os.path.join(run_dir, 'last.pt'))
        common.barrier()  # nobody races ahead (or exits) before the checkpoint of this epoch is on disk
        if args.stop_epoch and epoch + 1 >= args.stop_epoch:
            break

    # --- final report: the better of model / EMA on validation, then its TEST accuracy
    if resume and start_epoch >= args.epochs:  # nothing left to train: report the checkpoint's figures
        val_acc, ema_acc = ck['val_acc'], ck['ema_val_acc']
    stopped_early = args.stop_epoch and args.stop_epoch < args.epochs
    if not args.no_test and not stopped_early:
        test_loader = data.build_loader(data.build_dataset(args.dataset, 'test', **ds_kw), args.eval_batch_size,
                                        **loader_kw)
        use_ema = ema is not None and ema_acc > val_acc
        _, test_acc = evaluate(ema if use_ema else raw, test_loader, device, autocast, args.limit_eval_batches)
        dense = common.count_params(build_model(model_config(args, mlp='dense')))
        say(f'final ({"EMA" if use_ema else "model"} weights): val acc {100 * (ema_acc if use_ema else val_acc):.2f}% '
            f'| TEST acc {100 * test_acc:.2f}% | params {n_params:,} vs dense {dense:,} '
            f'({100 * (1 - n_params / dense):.1f}% fewer) | run {run_dir}')
        logger.log(step, **{'test/acc': test_acc, 'test/used_ema': float(use_ema)})
    logger.close()


def main(argv=None):
    common.prime_vml()  # this process builds models to validate the flags; see common.prime_vml
    args = get_args(argv)
    validate(args)
    common.launch(worker, args, args.nproc)


if __name__ == '__main__':
    common.run_main(main)
