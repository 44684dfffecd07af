"""SeaM model re-engineering (Qi et al., ICSE 2023) on CIFAR-style VGG16-BN / ResNet20, with physical extraction.

Masks (one real score per weight, binarised at 0) and a small module head are trained on a sub-task of the base
model's classes; the weights stay frozen, BatchNorm statistics stay frozen, loss = CE + alpha * weight ratio, with
SeaM's two Adam optimisers (head only / head + masks) in the epoch pattern [0,1,1,1,1]. The epoch kept is the one
with the lowest weight ratio whose validation accuracy reaches the original model's (held-out val split, not test).
The module is then physically extracted (dead channels removed, models/extract.py) and reported. The algorithm
lives in models/seam.py in small named steps; main() below only runs them in order.

    # train a base model on the embedded digits, then re-engineer it for "class 0 vs rest" (SeaM's masks)
    python reengineer_seam.py --model resnet20 --train-base --base-epochs 30 --task binary --target-class 0
    python reengineer_seam.py --model resnet20 --pretrained runs/seam/001/base.pt --task binary --target-class 0
    # a module that is also fast: removable channel gates on top of the weight masks, penalty on kept FLOPs
    python reengineer_seam.py --model resnet20 --pretrained BASE.pt --task binary --target-class 0 \
        --mask-granularity weight+channel --penalty flops
    # multi-class modules: a random class subset, a given subset, a CIFAR-100 superclass
    python reengineer_seam.py --model resnet20 --pretrained BASE.pt --task multiclass --n-classes 3 --seed 1
    python reengineer_seam.py --model resnet20 --pretrained BASE.pt --task multiclass --classes 3,5,8
    python reengineer_seam.py --model resnet20 --dataset cifar100 --data-dir PATH \
        --pretrained cifar100_resnet20-23dac2f1.pt --task multiclass --superclass 0
    # torchvision ResNet-18/34/50/101 (plain torchvision state dicts load as they are; bottleneck blocks extract too)
    python reengineer_seam.py --model resnet18 --train-base --base-epochs 10 --task binary --target-class 0
    python reengineer_seam.py --model resnet50 --pretrained resnet50-11ad3fa6.pth --dataset imagenet --data-dir DIR \
        --img-size 224 --task binary --target-class 301 --mask-granularity weight+channel --penalty flops
    # defect inheritance: standard fine-tuning vs re-engineer-then-fine-tune, PGD on the pretrained features
    python reengineer_seam.py --model resnet20 --pretrained BASE.pt --task defect --classes 0,1,2,3,4

Defaults follow the SeaM README per model and dataset (lr_mask, alpha; 300 epochs, batch 64, head lr 0.1). On the
small digits data they are batch 16 (more mask updates per epoch), head lr 0.01 (with 0.1 the head drives the loss
to exactly 0 and the masks then collapse) and lr_mask 0.05 for both models (measured in BENCHMARKS.md).

--pretrained takes a checkpoint of this project (kind 'cifar_base') or a plain chenyaofo/pytorch-cifar-models state
dict. Outputs in --output/NNN/: base.pt (with --train-base), masks.pt (kind 'seam_masks': full masked model state,
weights + weight_mask/bias_mask/channel_mask + module_head), module.pt (kind 'seam_module': the extracted plain
network, rebuilt by models.build_model(ckpt['model'])), report.json, TensorBoard events + log.jsonl.
"""
import argparse
import json
import os

import numpy as np
import torch

from common import (PROJECT, Logger, UserError, check_output_dir, load_checkpoint, make_run_dir, run_main,
                    save_checkpoint, seed_everything)
from data import CIFAR100_COARSE, TaskSubset, build_dataset, build_loader, dataset_info, task_indices
from models import build_model, seam

p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
TORCHVISION = ('resnet18', 'resnet34', 'resnet50', 'resnet101')
p.add_argument('--model', default='resnet20', choices=['resnet20', 'vgg16_bn', *TORCHVISION],
               help='resnet20 / vgg16_bn: CIFAR nets (models/cifar.py); resnet18..101: torchvision ResNets with mask '
                    'layers (models/tv_resnet.py), --pretrained takes a local torchvision state dict')
p.add_argument('--dataset', default='digits', choices=['digits', 'cifar10', 'cifar100', 'imagenet'],
               help='imagenet: an ImageFolder DIR/train, DIR/val (--data-dir), 1000 classes; use --img-size 224')
p.add_argument('--data-dir', default=None)
p.add_argument('--img-size', type=int, default=32, help='resnet20 only (vgg16_bn needs 32)')
p.add_argument('--pretrained', default=None,
               help='base model checkpoint: a cifar_base checkpoint of this project, or a plain state dict '
                    '(chenyaofo CIFAR nets, torchvision ResNets)')
p.add_argument('--train-base', action='store_true', help='train the base model first (when no --pretrained)')
p.add_argument('--base-epochs', type=int, default=30)
p.add_argument('--base-lr', type=float, default=0.05)
p.add_argument('--task', default=None, choices=['binary', 'multiclass', 'defect'])
p.add_argument('--target-class', type=int, default=None)
p.add_argument('--superclass', type=int, default=None)
p.add_argument('--classes', default=None, help='comma-separated class ids, e.g. 3,17,42')
p.add_argument('--n-classes', type=int, default=None, help='random class subset of this size (with --seed)')
p.add_argument('--seed', type=int, default=0)
p.add_argument('--epochs', type=int, default=300, help='re-engineering epochs (SeaM: 300)')
p.add_argument('--lr-head', type=float, default=None,
               help='default: 0.1 (SeaM); 0.01 on digits, where 0.1 lets the head push the training loss to an '
                    'exact 0 and the masks then collapse (measured in BENCHMARKS.md)')
p.add_argument('--lr-mask', type=float, default=None, help='default: SeaM README value for the model/dataset')
p.add_argument('--alpha', type=float, default=None, help='default: SeaM README value for the model/dataset')
p.add_argument('--early-stop', type=int, default=-1, help='stop after N epochs below the accuracy bar (-1: never)')
p.add_argument('--mask-granularity', default='weight', choices=['weight', 'channel', 'weight+channel'],
               help="weight: SeaM's masks (default); channel: one gate per filter/neuron (removable); "
                    'weight+channel: both (per-weight sparsity inside removable channels)')
p.add_argument('--penalty', default='weights', choices=['weights', 'flops'],
               help="weights: alpha x kept-weight ratio (SeaM); flops: alpha x kept multiply-add ratio (each weight "
                    "counted once per output pixel), which aims the pruning at the layers that cost the most time")
p.add_argument('--batch-size', type=int, default=None, help='default: 16 on digits, 64 (SeaM) otherwise')
p.add_argument('--ft-epochs', type=int, default=20, help='defect task: fine-tuning epochs')
p.add_argument('--pgd-samples', type=int, default=256, help='defect task: test images attacked')
p.add_argument('--pgd-eps', type=float, nargs='+', default=[0.1],
               help="defect task: L-inf budgets in normalised units (SeaM's 0.1), one attack each")
p.add_argument('--latency-iters', type=int, default=20)
p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: default)')
p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
p.add_argument('--output', default='runs/seam')
p.add_argument('--max-bad-steps', type=int, default=2,
               help='skip at most this many consecutive steps with a non-finite loss; one more stops the run (exit 3)')


def check_args(args):
    """Every mistake visible in the flags -> one-line UserError, before anything is loaded or created."""
    for name in ('epochs', 'base_epochs', 'ft_epochs', 'batch_size', 'latency_iters', 'pgd_samples'):
        if getattr(args, name) < 1:
            raise UserError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    for name in ('threads', 'max_bad_steps'):
        if getattr(args, name) < 0:
            raise UserError(f'--{name.replace("_", "-")} must be >= 0, got {getattr(args, name)}')
    if args.early_stop == 0 or args.early_stop < -1:
        raise UserError(f'--early-stop must be -1 (never) or >= 1, got {args.early_stop}')
    for name in ('base_lr', 'lr_head', 'lr_mask', 'alpha'):
        v = getattr(args, name)
        if v is not None and (not np.isfinite(v) or v < 0 or (v == 0 and name != 'alpha')):
            raise UserError(f'--{name.replace("_", "-")} must be a finite number {">= 0" if name == "alpha" else "> 0"}'
                            f', got {v}')
    if not all(np.isfinite(e) for e in args.pgd_eps) or min(args.pgd_eps) <= 0:
        raise UserError(f'--pgd-eps values must be finite and > 0, got {args.pgd_eps}')
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        raise UserError(f'--device {args.device!r} is not a device; use cpu or cuda') from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {args.device} but no CUDA device is available; use --device cpu')
    if dev.type not in ('cpu', 'cuda'):
        raise UserError(f'--device {args.device}: only cpu and cuda are supported')
    check_output_dir(args.output)



def parse_args(argv=None):
    """Flags, with the defaults that depend on the dataset filled in, checked (one-line UserError otherwise)."""
    args = p.parse_args(argv)
    if args.lr_head is None:
        args.lr_head = 0.01 if args.dataset == 'digits' else 0.1
    if args.batch_size is None:
        args.batch_size = 16 if args.dataset == 'digits' else 64
    check_args(args)
    if args.model == 'vgg16_bn' and args.img_size != 32:
        raise UserError('vgg16_bn needs --img-size 32 (five 2x2 poolings down to the 512-wide classifier)')
    if args.task is None and not args.train_base:
        raise UserError('nothing to do: pass --task binary|multiclass|defect and/or --train-base')
    if args.pretrained is None and not args.train_base:
        raise UserError('pass --pretrained PATH (a base model checkpoint) or --train-base to train one first')
    return args


def task_classes(args, nc):
    """The task's original class ids (binary: [target]); the module's label of class classes[i] is i (binary:
    0 = target, 1 = other)."""
    if args.task == 'binary':
        if args.target_class is None or not 0 <= args.target_class < nc:
            raise UserError(f'--target-class must be in 0..{nc - 1} for {args.dataset}, got {args.target_class}')
        return [args.target_class]
    if args.superclass is not None:
        if args.dataset != 'cifar100':
            raise UserError('--superclass needs --dataset cifar100 (its 20 predefined superclasses)')
        if not 0 <= args.superclass < 20:
            raise UserError(f'--superclass must be in 0..19 (CIFAR-100 has 20 superclasses), got {args.superclass}')
        return [c for c in range(100) if CIFAR100_COARSE[c] == args.superclass]
    if args.classes is not None:
        try:
            classes = [int(c) for c in args.classes.split(',')]
        except ValueError:
            raise UserError(f'--classes must be comma-separated integers, got {args.classes!r}') from None
        if len(set(classes)) != len(classes) or not all(0 <= c < nc for c in classes) or len(classes) < 2:
            raise UserError(f'--classes needs >= 2 distinct ids in 0..{nc - 1}, got {args.classes!r}')
        return classes
    if args.n_classes is not None:
        if not 2 <= args.n_classes <= nc:
            raise UserError(f'--n-classes must be in 2..{nc}, got {args.n_classes}')
        return sorted(np.random.default_rng(args.seed).permutation(nc)[:args.n_classes].tolist())
    if args.task == 'defect':
        return list(range(nc))
    raise UserError('--task multiclass needs --superclass I, --classes A,B,C or --n-classes K')


def loader(args, split, classes=None, augment=False, shuffle=False, remap=True):
    """A loader of ``split``: the whole dataset (classes=None) or the task's subset, labels mapped to the module's
    outputs (remap=False keeps the original labels, for scoring the original model)."""
    ds = build_dataset(args.dataset, split, args.data_dir, args.img_size, augment=augment, seed=0)
    if classes is not None:
        kind = 'binary' if args.task == 'binary' else 'multiclass'  # defect tasks use a class subset
        idx, lmap = task_indices(ds.targets, kind, classes, dataset_info(args.dataset)['num_classes'], args.seed)
        ds = TaskSubset(ds, idx, lmap if remap else None)
    return build_loader(ds, args.batch_size, shuffle=shuffle, seed=args.seed)


def task_data(args, classes):
    return seam.TaskData(loader(args, 'train', classes, augment=True, shuffle=True), loader(args, 'val', classes),
                         loader(args, 'test', classes))


def load_base(base, args, nc):
    """Load --pretrained into base: a cifar_base checkpoint of this project or a plain state dict of the same net."""
    path = args.pretrained
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:
        obj = None
    if isinstance(obj, dict) and 'project' in obj:
        ck = load_checkpoint(path, expected_kinds=('cifar_base',))
        if ck['model'].get('name') != args.model:
            raise UserError(f"{path} holds a {ck['model'].get('name')} model, not {args.model}: pass "
                            f"--model {ck['model'].get('name')} or a {args.model} checkpoint")
        sd = ck['state_dict']
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        load_checkpoint(path)  # raises the precise one-line error (missing file, not a checkpoint, ...)
        raise UserError(f'{path} is not a state dict of a {args.model} model')
    try:
        base.load_state_dict(sd)
    except RuntimeError:
        raise UserError(f'{path} does not fit --model {args.model} with {nc} classes ({args.dataset}); pass the '
                        'matching --model/--dataset or another checkpoint') from None


def train_base(base, base_cfg, args, run, run_dir):
    """Train the base model on the whole dataset and save it as base.pt (kind 'cifar_base')."""
    print(f'training base {args.model} on {args.dataset} for {args.base_epochs} epochs', flush=True)
    seam.train_plain(base, [{'params': base.parameters(), 'lr': args.base_lr}],
                     loader(args, 'train', augment=True, shuffle=True), loader(args, 'val'), args.base_epochs,
                     'base', run)
    test_acc = seam.evaluate(base, loader(args, 'test'), run.device)
    save_checkpoint({'project': PROJECT, 'kind': 'cifar_base', 'model': base_cfg,
                     'state_dict': {k: v.cpu() for k, v in base.state_dict().items()}, 'args': vars(args),
                     'dataset': args.dataset, 'img_size': args.img_size, 'test_acc': test_acc},
                    os.path.join(run_dir, 'base.pt'))
    print(f'base test accuracy {test_acc:.2%} -> {run_dir}/base.pt', flush=True)


def save_masks(model, cfg, classes, args, run_dir):
    save_checkpoint({'project': PROJECT, 'kind': 'seam_masks', 'model': cfg, 'args': vars(args),
                     'state_dict': {n: v.cpu() for n, v in model.state_dict().items()}, 'classes': classes,
                     'mask_granularity': args.mask_granularity}, os.path.join(run_dir, 'masks.pt'))


def save_module(module, mcfg, classes, args, run_dir):
    save_checkpoint({'project': PROJECT, 'kind': 'seam_module', 'model': mcfg, 'args': vars(args),
                     'state_dict': module.state_dict(), 'classes': classes, 'task': args.task,
                     'labels': ['target', 'other'] if args.task == 'binary' else [str(c) for c in classes]},
                    os.path.join(run_dir, 'module.pt'))


def write_report(report, run_dir, log):
    with open(os.path.join(run_dir, 'report.json'), 'w') as f:
        json.dump(report, f, indent=2)
    log.close()
    print(json.dumps(report, indent=2))
    print(f'run folder: {run_dir}')


def main():
    # --- arguments, the task's classes, the base model ------------------------------------------------------------
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    info = dataset_info(args.dataset)
    nc = info['num_classes']
    classes = task_classes(args, nc) if args.task else None
    dev = torch.device(args.device)
    family = 'torchvision' if args.model in TORCHVISION else 'cifar'
    base_cfg = {'family': family, 'name': args.model, 'kwargs': {'num_classes': nc}}
    base = build_model(base_cfg).to(dev)
    if args.pretrained:
        load_base(base, args, nc)
    for split in ('train', 'val', 'test'):  # a missing or malformed data folder -> one line now, not after a folder
        build_dataset(args.dataset, split, args.data_dir, args.img_size, seed=0)
    run_dir = make_run_dir(args.output, vars(args))  # every check passed: the run folder is made now
    log = Logger(run_dir)
    run = seam.Run(dev, seam.BadStepGuard(args.max_bad_steps, run_dir), log)
    if not args.pretrained:
        train_base(base, base_cfg, args, run, run_dir)
    if args.task is None:
        return
    # --- the task's data and SeaM's settings ----------------------------------------------------------------------
    k = 2 if args.task == 'binary' else len(classes)
    lr_mask, alpha = seam.seam_defaults(args.model, args.dataset, args.task)
    hp = seam.SeamParams(args.epochs, args.lr_head, args.lr_mask if args.lr_mask is not None else lr_mask,
                         args.alpha if args.alpha is not None else alpha, args.penalty, args.early_stop, args.img_size)
    data = task_data(args, classes)
    if args.task == 'defect':
        report = seam.defect_inheritance(base, base_cfg, k, data, hp, args.mask_granularity, args.ft_epochs,
                                         args.pgd_eps, args.pgd_samples, (info['mean'], info['std']), args.seed, run)
        return write_report(dict(model=args.model, dataset=args.dataset, task='defect', classes=classes, **report),
                            run_dir, log)
    # --- masks on a copy of the base model with a module head, and SeaM's search ----------------------------------
    target = classes[0] if args.task == 'binary' else None  # the original model is scored the SeaM way
    orig_val = seam.evaluate(base, loader(args, 'val', classes, remap=False), dev, target)
    orig_test = seam.evaluate(base, loader(args, 'test', classes, remap=False), dev, target)
    cfg = {'family': family, 'name': args.model, 'kwargs': {'num_classes': nc, 'head_classes': k}}
    model = seam.masked_module(base, cfg, args.mask_granularity, dev)
    print(f'task {args.task} classes {classes}: original model val acc {orig_val:.2%}, test acc {orig_test:.2%}; '
          f'lr_mask {hp.lr_mask} alpha {hp.alpha}', flush=True)
    sel, minutes = seam.timed(seam.reengineer, model, model.module_head, data, orig_val, hp, run)
    module_test = seam.evaluate(model, data.test, dev)
    save_masks(model, cfg, classes, args, run_dir)
    # --- extraction, measurements (CPU) and the report ------------------------------------------------------------
    module, mcfg, measured = seam.module_report(base, model, cfg, data.test, args.img_size, args.latency_iters)
    save_module(module, mcfg, classes, args, run_dir)
    report = dict(model=args.model, dataset=args.dataset, task=args.task, classes=classes, lr_mask=hp.lr_mask,
                  lr_head=args.lr_head, alpha=hp.alpha, mask_granularity=args.mask_granularity, selected=sel,
                  minutes=minutes, **seam.retention(model), original_acc_val=orig_val, original_acc_test=orig_test,
                  module_acc_test=module_test, **measured)
    write_report(report, run_dir, log)


if __name__ == '__main__':
    run_main(main)
