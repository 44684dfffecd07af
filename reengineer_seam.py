"""SeaM model re-engineering (Qi et al., ICSE 2023) on CIFAR-style VGG16-BN / ResNet20, with physical extraction.

Masks (one real score per weight, binarised at 0) and a small module head are trained on a sub-task of the base
model's classes; the weights stay frozen, BatchNorm statistics stay frozen, loss = CE + alpha * weight ratio, with
SeaM's two Adam optimisers (head only / head + masks) in the epoch pattern [0,1,1,1,1]. The epoch kept is the one
with the lowest weight ratio whose validation accuracy reaches the original model's (held-out val split, not test).
The module is then physically extracted (dead channels removed, models/extract.py) and reported.

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
import copy
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (PROJECT, Logger, NonFiniteError, UserError, check_output_dir, latencies, load_checkpoint,
                    make_run_dir, run_main, save_checkpoint, seed_everything)
from data import CIFAR100_COARSE, TaskSubset, build_dataset, build_loader, dataset_info, set_epoch, task_indices
from layers.mask import kept_counts, masked_layers, weight_ratio
from models import build_model
from models.extract import extract_module
from models.flops import count_flops

# (lr_mask, alpha): the SeaM README values for CIFAR; digits: measured here (BENCHMARKS.md)
SEAM_DEFAULTS = {('vgg16_bn', 'digits'): (0.05, 1.0), ('resnet20', 'digits'): (0.05, 1.0),
                 ('vgg16_bn', 'cifar10'): (0.01, 1.0), ('resnet20', 'cifar10'): (0.05, 1.0),
                 ('vgg16_bn', 'cifar100'): (0.05, 1.5), ('resnet20', 'cifar100', 'binary'): (0.12, 1.5),
                 ('resnet20', 'cifar100'): (0.10, 2.0)}
p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
p.add_argument('--model', default='resnet20', choices=['resnet20', 'vgg16_bn'])
p.add_argument('--dataset', default='digits', choices=['digits', 'cifar10', 'cifar100'])
p.add_argument('--data-dir', default=None)
p.add_argument('--img-size', type=int, default=32, help='resnet20 only (vgg16_bn needs 32)')
p.add_argument('--pretrained', default=None, help='base model checkpoint (project cifar_base or chenyaofo state dict)')
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


class BadStepGuard:
    """Counts consecutive steps with a non-finite loss: True = skip this update; more than ``limit`` -> stop."""

    def __init__(self, limit, run_dir):
        self.limit, self.run_dir, self.count = limit, run_dir, 0

    def skip(self, loss, tag, epoch):
        if torch.isfinite(loss).item():
            self.count = 0
            return False
        self.count += 1
        if self.count > self.limit:
            raise NonFiniteError(f'[{tag}] non-finite loss in epoch {epoch}, {self.count} step(s) in a row '
                                 f'(--max-bad-steps {self.limit}); stopped before saving anything more in '
                                 f'{self.run_dir}; lower the learning rates')
        print(f'[{tag}] epoch {epoch}: non-finite loss, update skipped ({self.count} in a row)', flush=True)
        return True


def main():
    args = p.parse_args()
    if args.lr_head is None:
        args.lr_head = 0.01 if args.dataset == 'digits' else 0.1
    if args.batch_size is None:
        args.batch_size = 16 if args.dataset == 'digits' else 64
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    info = dataset_info(args.dataset)
    nc = info['num_classes']
    if args.model == 'vgg16_bn' and args.img_size != 32:
        raise UserError('vgg16_bn needs --img-size 32 (five 2x2 poolings down to the 512-wide classifier)')
    if args.task is None and not args.train_base:
        raise UserError('nothing to do: pass --task binary|multiclass|defect and/or --train-base')
    if args.pretrained is None and not args.train_base:
        raise UserError('pass --pretrained PATH (a base model checkpoint) or --train-base to train one first')
    # --- the task: which original classes, and the module's label for each --------------------------------------
    if args.task == 'binary':
        if args.target_class is None or not 0 <= args.target_class < nc:
            raise UserError(f'--target-class must be in 0..{nc - 1} for {args.dataset}, got {args.target_class}')
        classes = [args.target_class]
    elif args.task in ('multiclass', 'defect'):
        if args.superclass is not None:
            if args.dataset != 'cifar100':
                raise UserError('--superclass needs --dataset cifar100 (its 20 predefined superclasses)')
            if not 0 <= args.superclass < 20:
                raise UserError(f'--superclass must be in 0..19 (CIFAR-100 has 20 superclasses), got {args.superclass}')
            classes = [c for c in range(100) if CIFAR100_COARSE[c] == args.superclass]
        elif args.classes is not None:
            try:
                classes = [int(c) for c in args.classes.split(',')]
            except ValueError:
                raise UserError(f'--classes must be comma-separated integers, got {args.classes!r}') from None
            if len(set(classes)) != len(classes) or not all(0 <= c < nc for c in classes) or len(classes) < 2:
                raise UserError(f'--classes needs >= 2 distinct ids in 0..{nc - 1}, got {args.classes!r}')
        elif args.n_classes is not None:
            if not 2 <= args.n_classes <= nc:
                raise UserError(f'--n-classes must be in 2..{nc}, got {args.n_classes}')
            classes = sorted(np.random.default_rng(args.seed).permutation(nc)[:args.n_classes].tolist())
        elif args.task == 'defect':
            classes = list(range(nc))
        else:
            raise UserError('--task multiclass needs --superclass I, --classes A,B,C or --n-classes K')
    dev = torch.device(args.device)
    base_cfg = {'family': 'cifar', 'name': args.model, 'kwargs': {'num_classes': nc}}
    base = build_model(base_cfg).to(dev)
    if args.pretrained:
        load_base(base, args, nc)
    for split in ('train', 'val', 'test'):  # a missing or malformed data folder -> one line now, not after a folder
        build_dataset(args.dataset, split, args.data_dir, args.img_size, seed=0)
    # every check passed: the run folder is made now
    run_dir = make_run_dir(args.output, vars(args))
    log = Logger(run_dir)
    guard = BadStepGuard(args.max_bad_steps, run_dir)

    def loader(split, augment=False, task=True, shuffle=False, remap=True):
        ds = build_dataset(args.dataset, split, args.data_dir, args.img_size, augment=augment, seed=0)
        if task and args.task is not None:
            ds = task_subset(ds, remap)
        return build_loader(ds, args.batch_size, shuffle=shuffle, seed=args.seed)

    def task_subset(ds, remap):
        kind = 'binary' if args.task == 'binary' else 'multiclass'  # defect tasks use a class subset
        idx, lmap = task_indices(ds.targets, kind, classes, nc, args.seed)
        return TaskSubset(ds, idx, lmap if remap else None)

    @torch.no_grad()
    def evaluate(model, dl, original=False):
        """Accuracy; original=True scores the base classifier SeaM's way (argmax mapped to the task's labels)."""
        model.eval()
        correct = n = 0
        for x, y in dl:
            pred = model(x.to(dev)).argmax(1).cpu()
            if original and args.task == 'binary':
                pred, y = pred == classes[0], y == classes[0]
            correct += int((pred == y).sum())
            n += len(y)
        return correct / max(n, 1)

    def train_plain(model, params_groups, dl, val_dl, epochs, tag, momentum=0.9, wd=5e-4):
        """SGD + cosine schedule; returns the state with the best validation accuracy."""
        opt = torch.optim.SGD(params_groups, momentum=momentum, weight_decay=wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
        best, best_acc = copy.deepcopy(model.state_dict()), -1.0
        for ep in range(epochs):
            model.train()
            set_epoch(dl, ep)
            for x, y in dl:
                loss = F.cross_entropy(model(x.to(dev)), y.to(dev))
                if guard.skip(loss, tag, ep):
                    continue
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            acc = evaluate(model, val_dl)
            log.log(ep, **{f'{tag}/loss': loss.item(), f'{tag}/val_acc': acc})
            print(f'[{tag}] epoch {ep} loss {loss.item():.3f} val acc {acc:.2%}', flush=True)
            if acc > best_acc:
                best, best_acc = copy.deepcopy(model.state_dict()), acc
        model.load_state_dict(best)
        return best_acc

    # --- base model -----------------------------------------------------------------------------------------------
    if not args.pretrained:
        print(f'training base {args.model} on {args.dataset} for {args.base_epochs} epochs', flush=True)
        tr, va = loader('train', augment=True, task=False, shuffle=True), loader('val', task=False)
        train_plain(base, [{'params': base.parameters(), 'lr': args.base_lr}], tr, va, args.base_epochs, 'base')
        test_acc = evaluate(base, loader('test', task=False))
        save_checkpoint({'project': PROJECT, 'kind': 'cifar_base', 'model': base_cfg,
                         'state_dict': {k: v.cpu() for k, v in base.state_dict().items()}, 'args': vars(args),
                         'dataset': args.dataset, 'img_size': args.img_size, 'test_acc': test_acc},
                         os.path.join(run_dir, 'base.pt'))
        print(f'base test accuracy {test_acc:.2%} -> {run_dir}/base.pt', flush=True)
    if args.task is None:
        return
    k = 2 if args.task == 'binary' else len(classes)
    lr_mask, alpha = (SEAM_DEFAULTS.get((args.model, args.dataset, args.task))
                      or SEAM_DEFAULTS.get((args.model, args.dataset)) or SEAM_DEFAULTS[(args.model, 'cifar10')])
    lr_mask = args.lr_mask if args.lr_mask is not None else lr_mask
    alpha = args.alpha if args.alpha is not None else alpha
    train_dl = loader('train', augment=True, shuffle=True)
    val_dl, test_dl = loader('val'), loader('test')

    def reengineer(model, head, acc_bar, tag):
        """SeaM's search: returns the selected epoch's record; model holds the selected masks + head. The selection
        (and the penalty) use the kept-weight ratio, or the kept multiply-add ratio with --penalty flops."""
        cost = output_pixels(model, args.img_size, dev) if args.penalty == 'flops' else None
        masks = [q for n, q in model.named_parameters() if n.endswith('_mask')]  # a tied gate is listed once
        for q in model.parameters():
            q.requires_grad_(False)
        for q in masks + list(head.parameters()):
            q.requires_grad_(True)
        optim_h = torch.optim.Adam(head.parameters(), args.lr_head)
        optim_hm = torch.optim.Adam([{'params': masks, 'lr': lr_mask},
                                     {'params': head.parameters(), 'lr': args.lr_head}])
        trainable = lambda: {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}
        best, fallback, stall, armed = None, None, 0, False
        for ep in range(args.epochs):
            optim = optim_h if ep % 5 == 0 else optim_hm  # SeaM's [0, 1, 1, 1, 1] pattern
            model.train()
            for m in model.modules():  # frozen BatchNorm statistics (SeaM's fix_bn)
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
            set_epoch(train_dl, ep)
            for x, y in train_dl:
                ce = F.cross_entropy(model(x.to(dev)), y.to(dev))
                pen = weight_ratio(model, cost)
                if guard.skip(ce + alpha * pen, tag, ep):
                    continue
                optim.zero_grad(set_to_none=True)
                (ce + alpha * pen).backward()
                optim.step()
            acc, wr = evaluate(model, val_dl), weight_ratio(model).item()
            ratio = weight_ratio(model, cost).item() if cost else wr  # what the penalty and the selection use
            log.log(ep, **{f'{tag}/train_ce': ce.item(), f'{tag}/val_acc': acc, f'{tag}/weight_ratio': wr,
                           f'{tag}/penalty_ratio': ratio, f'{tag}/loss': ce.item() + alpha * ratio})
            print(f'[{tag}] epoch {ep} {"head+mask" if ep % 5 else "head"} ce {ce.item():.3f} '
                  f'val acc {acc:.2%} (bar {acc_bar:.2%}) weight ratio {wr:.2%}'
                  + (f' flop ratio {ratio:.2%}' if cost else ''), flush=True)
            rec = dict(epoch=ep, val_acc=acc, weight_ratio=wr, penalty_ratio=ratio)
            if fallback is None or acc - ratio > fallback[0]['val_acc'] - fallback[0]['penalty_ratio']:
                fallback = (rec, trainable())
            if acc >= acc_bar:  # SeaM's rule: lowest ratio (per mille) among epochs reaching the bar, then acc
                armed = True
                b = best[0] if best else dict(penalty_ratio=1.0, val_acc=0.0)
                if int(ratio * 1000) < int(b['penalty_ratio'] * 1000):
                    stall = 0
                elif ratio > b['penalty_ratio'] or acc <= b['val_acc']:
                    continue
                best = (rec, trainable())
            elif armed:
                stall += 1
                if stall == args.early_stop:
                    print(f'[{tag}] early stop', flush=True)
                    break
        rec, state = best or fallback
        with torch.no_grad():
            for n, q in model.named_parameters():
                if n in state:
                    q.copy_(state[n])
        return dict(rec, reached_bar=best is not None)

    if args.task == 'defect':
        return defect(args, base, base_cfg, classes, k, train_dl, val_dl, test_dl, evaluate, train_plain,
                      reengineer, dev, run_dir, info)
    # --- re-engineering -------------------------------------------------------------------------------------------
    orig_val = evaluate(base, loader('val', remap=False), original=True)
    orig_test = evaluate(base, loader('test', remap=False), original=True)
    cfg = {'family': 'cifar', 'name': args.model, 'kwargs': {'num_classes': nc, 'head_classes': k}}
    model = build_model(cfg).to(dev)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(m.startswith('module_head') for m in missing), (missing, unexpected)
    add_masks(model, args.mask_granularity)
    print(f'task {args.task} classes {classes}: original model val acc {orig_val:.2%}, test acc {orig_test:.2%}; '
          f'lr_mask {lr_mask} alpha {alpha}', flush=True)
    t0 = time.time()
    sel = reengineer(model, model.module_head, orig_val, 'seam')
    minutes = (time.time() - t0) / 60
    kept, total = kept_counts(model)
    module_test = evaluate(model, test_dl)
    save_checkpoint({'project': PROJECT, 'kind': 'seam_masks', 'model': cfg, 'args': vars(args),
                     'state_dict': {n: v.cpu() for n, v in model.state_dict().items()}, 'classes': classes,
                     'mask_granularity': args.mask_granularity}, os.path.join(run_dir, 'masks.pt'))
    # --- extraction and measurements (CPU) ------------------------------------------------------------------------
    model, base = model.cpu().eval(), base.cpu().eval()
    module, mcfg = extract_module(model, cfg)
    x = torch.randn(8, 3, args.img_size, args.img_size)
    with torch.no_grad():
        max_diff = (module(x) - model(x)).abs().max().item()
    save_checkpoint({'project': PROJECT, 'kind': 'seam_module', 'model': mcfg, 'args': vars(args),
                     'state_dict': module.state_dict(), 'classes': classes, 'task': args.task,
                     'labels': ['target', 'other'] if args.task == 'binary' else [str(c) for c in classes]},
                    os.path.join(run_dir, 'module.pt'))
    dev = torch.device('cpu')  # evaluate() below scores the extracted module, which lives on the CPU
    x1 = x[:1]
    nets = {'original': base, 'extracted': module}
    lat = {f'{name}_b{bs}_ms': ms for bs in (1, 64)
           for name, ms in latencies(nets, bs, args.img_size, args.latency_iters).items()}
    report = dict(model=args.model, dataset=args.dataset, task=args.task, classes=classes, lr_mask=lr_mask,
                  lr_head=args.lr_head,
                  alpha=alpha, mask_granularity=args.mask_granularity, selected=sel, minutes=minutes,
                  weight_retention=kept / total, kept_weights=kept, maskable_weights=total,
                  original_acc_val=orig_val, original_acc_test=orig_test, module_acc_test=module_test,
                  extracted_acc_test=evaluate(module, test_dl), extracted_max_abs_diff=max_diff,
                  extracted_widths=mcfg['kwargs']['widths'],
                  params_original=sum(q.numel() for q in base.parameters()),
                  params_extracted=sum(q.numel() for q in module.parameters()),
                  flops_original=count_flops(base, x1)['total'],
                  flops_masked_nonzero=count_flops(model, x1, nonzero_only=True)['total'],
                  flops_extracted=count_flops(module, x1)['total'], latency=lat, torch_threads=torch.get_num_threads(),
                  speedup_b64=lat['original_b64_ms'] / lat['extracted_b64_ms'])
    with open(os.path.join(run_dir, 'report.json'), 'w') as f:
        json.dump(report, f, indent=2)
    log.close()
    print(json.dumps(report, indent=2))
    print(f'run folder: {run_dir}')


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


def add_masks(model, granularity, skip=None):
    """Enable masks on every mask layer of ``model`` except the one named ``skip``; with channel gates, tie the
    ResNet residual-stream gates per stage (so a stream channel can be removed from the whole stage)."""
    for n, m in model.named_modules():
        if hasattr(m, 'enable_masks') and n != skip:
            m.enable_masks(granularity)
    if granularity != 'weight' and hasattr(model, 'tie_stream_masks'):
        model.tie_stream_masks()


def output_pixels(model, img_size, dev):
    """{masked layer name: output pixels per image} (1 for linear layers): the multiply-adds of one weight."""
    pix, hooks = {}, []

    def record(name):
        def hook(mod, inp, out):
            pix[name] = out.shape[-1] * out.shape[-2] if out.dim() == 4 else 1
        return hook

    for name, m in masked_layers(model):
        hooks.append(m.register_forward_hook(record(name)))
    with torch.no_grad():
        model(torch.zeros(1, 3, img_size, img_size, device=dev))
    for h in hooks:
        h.remove()
    return pix


def defect(args, base, base_cfg, classes, k, train_dl, val_dl, test_dl, evaluate, train_plain, reengineer, dev,
           run_dir, info):
    """SeaM's defect-inheritance experiment: DIR of standard fine-tuning vs re-engineer-then-fine-tune."""
    last = 'fc' if args.model == 'resnet20' else 'classifier.6'

    def with_new_output(state):
        cfg = {'family': 'cifar', 'name': args.model, 'kwargs': {'num_classes': k}}
        m = build_model(cfg).to(dev)
        m.load_state_dict({n: v for n, v in state.items() if not n.startswith(last + '.')}, strict=False)
        return m

    def out_layer(m):
        return m.fc if args.model == 'resnet20' else m.classifier[6]

    def finetune(m, tag):  # SeaM step 3 settings: hidden lr 0.005, output lr 0.05, momentum 0, wd 1e-4
        ids = {id(q) for q in out_layer(m).parameters()}
        for q in m.parameters():
            q.requires_grad_(True)
        groups = [{'params': [q for q in m.parameters() if id(q) not in ids], 'lr': 0.005},
                  {'params': out_layer(m).parameters(), 'lr': 0.05}]
        train_plain(m, groups, train_dl, val_dl, args.ft_epochs, tag, momentum=0.0, wd=1e-4)
        return m

    standard = finetune(with_new_output(base.state_dict()), 'standard_ft')
    # step 1: train only the new output layer; step 2: re-engineer (masks + output layer); step 3: fine-tune the
    # pretrained weights with the masks applied (SeaM restarts from the masked pretrained weights, new output layer)
    step1 = with_new_output(base.state_dict())
    for q in step1.parameters():
        q.requires_grad_(False)
    for q in out_layer(step1).parameters():
        q.requires_grad_(True)
    train_plain(step1, [{'params': out_layer(step1).parameters(), 'lr': 0.1}], train_dl, val_dl, args.ft_epochs,
                'seam_step1', momentum=0.0, wd=1e-4)
    add_masks(step1, args.mask_granularity, skip=last)
    sel = reengineer(step1, out_layer(step1), evaluate(step1, val_dl), 'seam_step2')
    kept, total = kept_counts(step1)
    masked = {}
    for n, m in step1.named_modules():
        if hasattr(m, 'weight_mask') and m.weight_mask is not None:
            w, b = m.masked_weight_bias()
            masked[n + '.weight'] = w.detach()
            if b is not None:
                masked[n + '.bias'] = b.detach()
    seam = finetune(with_new_output({n: masked.get(n, v) for n, v in base.state_dict().items()}), 'seam_ft')
    # PGD (SeaM's eval_robustness settings) on the *pretrained* feature extractor, transferred to the fine-tuned
    feat = copy.deepcopy(base).eval()
    if args.model == 'resnet20':
        feat.fc = nn.Identity()
    else:
        feat.classifier[6] = nn.Identity()
    lo = min((0 - m) / s for m, s in zip(info['mean'], info['std']))
    hi = max((1 - m) / s for m, s in zip(info['mean'], info['std']))
    res = {}
    for name, m in (('standard', standard), ('seam', seam)):
        m.eval()
        res[name] = dict(test_acc=evaluate(m, test_dl), by_eps={})
        for eps in args.pgd_eps:
            torch.manual_seed(args.seed)  # the same random starts for both models
            trials = success = correct = n = 0
            for x, y in test_dl:
                if n >= args.pgd_samples:
                    break
                x, y = x.to(dev), y.to(dev)
                xa = pgd(feat, x, eps=eps, step=eps / 10, iters=40, lo=lo, hi=hi)
                with torch.no_grad():
                    clean, adv = m(x).argmax(1), m(xa).argmax(1)
                ok = clean == y
                trials += int(ok.sum())
                success += int((adv[ok] != y[ok]).sum())
                correct += int(ok.sum())
                n += len(y)
            # DIR: the share of clean-correct test images that the attack on the pretrained features flips
            res[name]['by_eps'][str(eps)] = dict(clean_acc=correct / n, attacked=trials, samples=n,
                                                 defect_inheritance_rate=success / max(trials, 1))
    report = dict(model=args.model, dataset=args.dataset, task='defect', classes=classes, selected=sel,
                  weight_retention=kept / total, **res,
                  pgd=dict(eps=args.pgd_eps, step='eps/10', iters=40, clip=[lo, hi]))
    with open(os.path.join(run_dir, 'report.json'), 'w') as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    print(f'run folder: {run_dir}')


def pgd(feat, x, eps, step, iters, lo, hi):
    """L-inf PGD with random start that drives feature 0 of ``feat`` towards 1000 and the rest towards 0 (the ReMos /
    SeaM attack on the pretrained feature extractor); returns the adversarial batch."""
    target = torch.zeros_like(feat(x[:1]))
    target[:, 0] = 1000
    xa = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(lo, hi)
    for _ in range(iters):
        xa.requires_grad_(True)
        f = feat(xa)
        loss = -((f[:, 0] - target[:, 0]) ** 2 + 0.1 * ((f[:, 1:] - target[:, 1:]) ** 2).mean(1)).mean()
        g, = torch.autograd.grad(loss, xa)
        xa = torch.min(torch.max(xa.detach() + step * g.sign(), x - eps), x + eps).clamp(lo, hi)
    return xa.detach()


if __name__ == '__main__':
    run_main(main)
