"""SeaM model re-engineering (Qi et al., ICSE 2023) in small named steps; reengineer_seam.py runs them in order.

The algorithm, as this module implements it:

1. **Masks** (``add_masks``): every maskable layer (``layers.mask.MaskConv`` / ``MaskLinear``) gets real-valued
   scores initialised to 1, binarised at 0 in the forward pass (straight-through gradient); the weights and the
   BatchNorm statistics stay frozen. With channel gates the residual-stream gates are tied per stage, so a stream
   channel can leave the whole stage.
2. **The search** (``reengineer``): loss = cross-entropy of the module's task output + ``alpha`` x kept ratio
   (kept weights, or kept multiply-adds with ``penalty='flops'``, weighted by ``output_pixels``). Two Adam
   optimisers alternate by epoch in SeaM's pattern [head, head+masks, head+masks, head+masks, head+masks].
3. **The selection rule** (``Selection``): among the epochs whose validation accuracy reaches the original
   model's, keep the one with the lowest ratio (compared per mille, ties broken by accuracy); if none reaches
   it, keep the epoch with the best accuracy-minus-ratio (and say so: ``reached_bar=False``).
4. **Extraction and report** (``module_report``): the masked model is physically pruned (``models.extract``),
   checked against the masked model, and measured (retention, accuracies, parameters, FLOPs, CPU latency).
5. **Defect inheritance** (``defect_inheritance``): standard fine-tuning vs SeaM's re-engineer-then-fine-tune on
   a target task, then the share of clean-correct target images that an L-inf PGD attack crafted on the
   *pretrained* feature extractor flips in each fine-tuned model (``pgd``, ``defect_rates``).

Every training loop takes a ``Run`` (device, non-finite-loss guard, logger), so no closures are passed around.
"""
import copy
import dataclasses
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import NonFiniteError, latencies
from data import set_epoch
from layers.mask import kept_counts, masked_layers, weight_ratio
from models import build_model
from models.extract import extract_module
from models.flops import count_flops

# (lr_mask, alpha): the SeaM README values for CIFAR; digits: measured here (BENCHMARKS.md). A key with a task
# overrides the (model, dataset) key; other models and datasets take the CIFAR-10 values of their kind.
SEAM_DEFAULTS = {('vgg16_bn', 'digits'): (0.05, 1.0), ('resnet20', 'digits'): (0.05, 1.0),
                 ('vgg16_bn', 'cifar10'): (0.01, 1.0), ('resnet20', 'cifar10'): (0.05, 1.0),
                 ('vgg16_bn', 'cifar100'): (0.05, 1.5), ('resnet20', 'cifar100', 'binary'): (0.12, 1.5),
                 ('resnet20', 'cifar100'): (0.10, 2.0)}


def seam_defaults(model, dataset, task):
    """(lr_mask, alpha) for a model / dataset / task (see ``SEAM_DEFAULTS``)."""
    return (SEAM_DEFAULTS.get((model, dataset, task)) or SEAM_DEFAULTS.get((model, dataset))
            or SEAM_DEFAULTS[(model if model == 'vgg16_bn' else 'resnet20', 'cifar10')])


@dataclasses.dataclass
class SeamParams:
    """The search's settings (SeaM: 300 epochs, head lr 0.1, lr_mask/alpha per model and dataset)."""
    epochs: int
    lr_head: float
    lr_mask: float
    alpha: float
    penalty: str = 'weights'   # 'weights': kept-weight ratio; 'flops': kept multiply-add ratio
    early_stop: int = -1       # stop after this many epochs below the bar once it was reached (-1: never)
    img_size: int = 32


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


@dataclasses.dataclass
class Run:
    """What every loop needs besides its data: the device, the non-finite-loss guard and the logger."""
    device: torch.device
    guard: BadStepGuard
    log: object  # common.Logger


@dataclasses.dataclass
class TaskData:
    """Loaders of one task (labels already mapped to the module's outputs)."""
    train: object
    val: object
    test: object


# ------------------------------------------------------------------------------------------------ plain training
@torch.no_grad()
def evaluate(model, loader, device, binary_target=None):
    """Top-1 accuracy. ``binary_target=c`` scores an original (un-reengineered) classifier on a binary task the
    SeaM way: its argmax counts as 'target' when it is class c, and the labels are the original ones."""
    model.eval()
    correct = n = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(1).cpu()
        if binary_target is not None:
            pred, y = pred == binary_target, y == binary_target
        correct += int((pred == y).sum())
        n += len(y)
    return correct / max(n, 1)


def train_plain(model, param_groups, train_dl, val_dl, epochs, tag, run, momentum=0.9, wd=5e-4):
    """SGD + cosine schedule; leaves ``model`` at the epoch with the best validation accuracy and returns it."""
    opt = torch.optim.SGD(param_groups, momentum=momentum, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
    best, best_acc = copy.deepcopy(model.state_dict()), -1.0
    for ep in range(epochs):
        model.train()
        set_epoch(train_dl, ep)
        for x, y in train_dl:
            loss = F.cross_entropy(model(x.to(run.device)), y.to(run.device))
            if run.guard.skip(loss, tag, ep):
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        acc = evaluate(model, val_dl, run.device)
        run.log.log(ep, **{f'{tag}/loss': loss.item(), f'{tag}/val_acc': acc})
        print(f'[{tag}] epoch {ep} loss {loss.item():.3f} val acc {acc:.2%}', flush=True)
        if acc > best_acc:
            best, best_acc = copy.deepcopy(model.state_dict()), acc
    model.load_state_dict(best)
    return best_acc


# ------------------------------------------------------------------------------------------- 1. masks
def add_masks(model, granularity, skip=None):
    """Enable masks on every mask layer of ``model`` except the one named ``skip``; with channel gates, tie the
    ResNet residual-stream gates per stage (so a stream channel can be removed from the whole stage)."""
    for n, m in model.named_modules():
        if hasattr(m, 'enable_masks') and n != skip:
            m.enable_masks(granularity)
    if granularity != 'weight' and hasattr(model, 'tie_stream_masks'):
        model.tie_stream_masks()


def output_pixels(model, img_size, device):
    """{masked layer name: output pixels per image} (1 for linear layers): the multiply-adds of one weight."""
    pix, hooks = {}, []
    for name, m in masked_layers(model):
        hooks.append(m.register_forward_hook(_PixelRecorder(pix, name)))
    was_training = model.training
    model.eval()  # a train-mode probe would move the BatchNorm running statistics towards those of a zero image
    with torch.no_grad():
        model(torch.zeros(1, 3, img_size, img_size, device=device))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return pix


class _PixelRecorder:
    """Forward hook: records the output's pixels per image under ``name``."""

    def __init__(self, pix, name):
        self.pix, self.name = pix, name

    def __call__(self, mod, inp, out):
        self.pix[self.name] = out.shape[-1] * out.shape[-2] if out.dim() == 4 else 1


# ------------------------------------------------------------------------------------------- 2. the search
def train_only_masks_and_head(model, head):
    """Freeze everything, then make the mask scores and the head trainable; returns the mask parameters (a tied
    gate is listed once)."""
    masks = [q for n, q in model.named_parameters() if n.endswith('_mask')]
    for q in model.parameters():
        q.requires_grad_(False)
    for q in masks + list(head.parameters()):
        q.requires_grad_(True)
    return masks


def freeze_batchnorm_stats(model):
    """Train mode, but BatchNorm layers in eval mode: SeaM keeps the running statistics fixed (its fix_bn)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def mask_epoch(model, loader, optim, cost, alpha, run, tag, epoch):
    """One epoch of SeaM's objective CE + alpha x kept ratio; returns the last batch's cross-entropy."""
    freeze_batchnorm_stats(model)
    set_epoch(loader, epoch)
    for x, y in loader:
        ce = F.cross_entropy(model(x.to(run.device)), y.to(run.device))
        pen = weight_ratio(model, cost)
        if run.guard.skip(ce + alpha * pen, tag, epoch):
            continue
        optim.zero_grad(set_to_none=True)
        (ce + alpha * pen).backward()
        optim.step()
    return ce


def trainable_state(model):
    """A copy of the trainable tensors (mask scores and head) by name."""
    return {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}


class Selection:
    """SeaM's selection rule over the epochs of a search (see the module docstring, step 3).

    ``offer(rec, model)`` after each epoch (rec: epoch, val_acc, weight_ratio, penalty_ratio) returns True when the
    search should stop early; ``result()`` gives (record, trainable state, reached_bar)."""

    def __init__(self, acc_bar, early_stop=-1):
        self.acc_bar, self.early_stop = acc_bar, early_stop
        self.best = self.fallback = None
        self.stall, self.armed = 0, False

    def offer(self, rec, model):
        acc, ratio = rec['val_acc'], rec['penalty_ratio']
        f = self.fallback
        if f is None or acc - ratio > f[0]['val_acc'] - f[0]['penalty_ratio']:
            self.fallback = (rec, trainable_state(model))
        if acc < self.acc_bar:
            if self.armed:  # below the bar after having reached it: count towards the early stop
                self.stall += 1
                return self.stall == self.early_stop
            return False
        self.armed = True
        b = self.best[0] if self.best else dict(penalty_ratio=1.0, val_acc=0.0)
        if int(ratio * 1000) < int(b['penalty_ratio'] * 1000):  # a lower ratio per mille: a new best
            self.stall = 0
        elif ratio > b['penalty_ratio'] or acc <= b['val_acc']:  # same per mille: only if not worse and more acc
            return False
        self.best = (rec, trainable_state(model))
        return False

    def result(self):
        rec, state = self.best or self.fallback
        return rec, state, self.best is not None


def reengineer(model, head, data, acc_bar, hp, run, tag='seam'):
    """SeaM's search on ``data`` (a TaskData); ``model`` ends holding the selected masks + head. Returns the selected
    epoch's record with ``reached_bar``. ``acc_bar``: the original model's validation accuracy on the task."""
    cost = output_pixels(model, hp.img_size, run.device) if hp.penalty == 'flops' else None
    masks = train_only_masks_and_head(model, head)
    optim_head = torch.optim.Adam(head.parameters(), hp.lr_head)
    optim_both = torch.optim.Adam([{'params': masks, 'lr': hp.lr_mask},
                                   {'params': head.parameters(), 'lr': hp.lr_head}])
    selection = Selection(acc_bar, hp.early_stop)
    for ep in range(hp.epochs):
        phase = 'head' if ep % 5 == 0 else 'head+mask'  # SeaM's [0, 1, 1, 1, 1] pattern
        ce = mask_epoch(model, data.train, optim_head if phase == 'head' else optim_both, cost, hp.alpha, run,
                        tag, ep)
        acc, wr = evaluate(model, data.val, run.device), weight_ratio(model).item()
        ratio = weight_ratio(model, cost).item() if cost else wr  # what the penalty and the selection use
        run.log.log(ep, **{f'{tag}/train_ce': ce.item(), f'{tag}/val_acc': acc, f'{tag}/weight_ratio': wr,
                           f'{tag}/penalty_ratio': ratio, f'{tag}/loss': ce.item() + hp.alpha * ratio})
        print(f'[{tag}] epoch {ep} {phase} ce {ce.item():.3f} val acc {acc:.2%} (bar {acc_bar:.2%}) weight ratio '
              f'{wr:.2%}' + (f' flop ratio {ratio:.2%}' if cost else ''), flush=True)
        if selection.offer(dict(epoch=ep, val_acc=acc, weight_ratio=wr, penalty_ratio=ratio), model):
            print(f'[{tag}] early stop', flush=True)
            break
    rec, state, reached = selection.result()
    with torch.no_grad():
        for n, q in model.named_parameters():
            if n in state:
                q.copy_(state[n])
    return dict(rec, reached_bar=reached)


def masked_module(base, cfg, granularity, device):
    """The network of ``cfg`` (the base architecture with a module head) holding ``base``'s weights, masks on."""
    model = build_model(cfg).to(device)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or not all(m.startswith('module_head') for m in missing):
        raise ValueError(f'masked_module: the module config does not extend the base model (missing {missing[:3]}, '
                         f'unexpected {unexpected[:3]})')
    add_masks(model, granularity)
    return model


# ------------------------------------------------------------------------------------------- 4. extraction + report
def retention(model):
    """How many of the maskable weights the masks keep."""
    kept, total = kept_counts(model)
    return dict(weight_retention=kept / total, kept_weights=kept, maskable_weights=total)


def module_report(base, model, cfg, test_dl, img_size, latency_iters):
    """Extract the masked ``model`` (on the CPU), check it against the masked model and measure base vs module.

    Returns (module, module_config, measurements dict)."""
    model, base = model.cpu().eval(), base.cpu().eval()
    module, mcfg = extract_module(model, cfg)
    x = torch.randn(8, 3, img_size, img_size)
    with torch.no_grad():
        max_diff = (module(x) - model(x)).abs().max().item()
    lat = {f'{name}_b{bs}_ms': ms for bs in (1, 64)
           for name, ms in latencies({'original': base, 'extracted': module}, bs, img_size, latency_iters).items()}
    x1 = x[:1]
    measured = dict(extracted_acc_test=evaluate(module, test_dl, torch.device('cpu')),
                    extracted_max_abs_diff=max_diff, extracted_widths=mcfg['kwargs']['widths'],
                    params_original=sum(q.numel() for q in base.parameters()),
                    params_extracted=sum(q.numel() for q in module.parameters()),
                    flops_original=count_flops(base, x1)['total'],
                    flops_masked_nonzero=count_flops(model, x1, nonzero_only=True)['total'],
                    flops_extracted=count_flops(module, x1)['total'], latency=lat,
                    torch_threads=torch.get_num_threads(), speedup_b64=lat['original_b64_ms'] / lat['extracted_b64_ms'])
    return module, mcfg, measured


# ------------------------------------------------------------------------------------------- 5. defect inheritance
def output_layer_name(model):
    """The state-dict prefix of the network's original output layer ('fc' for ResNets, 'classifier.6' for VGG)."""
    return 'fc' if hasattr(model, 'fc') else 'classifier.6'


def output_layer(model):
    return model.get_submodule(output_layer_name(model))


def with_new_output(state, cfg, k, device):
    """The network of ``cfg`` with ``k`` outputs, holding every weight of ``state`` except the output layer's."""
    m = build_model(dict(cfg, kwargs=dict(cfg.get('kwargs') or {}, num_classes=k))).to(device)
    last = output_layer_name(m) + '.'
    m.load_state_dict({n: v for n, v in state.items() if not n.startswith(last)}, strict=False)
    return m


def finetune(m, data, epochs, tag, run):
    """SeaM's fine-tuning (its step 3 settings): SGD, hidden layers lr 0.005, output layer lr 0.05, momentum 0,
    weight decay 1e-4, every weight trainable."""
    out_ids = {id(q) for q in output_layer(m).parameters()}
    for q in m.parameters():
        q.requires_grad_(True)
    groups = [{'params': [q for q in m.parameters() if id(q) not in out_ids], 'lr': 0.005},
              {'params': output_layer(m).parameters(), 'lr': 0.05}]
    train_plain(m, groups, data.train, data.val, epochs, tag, run, momentum=0.0, wd=1e-4)
    return m


def masked_weights(model):
    """{state-dict name: weight or bias with its masks applied} for every masked layer of ``model``."""
    out = {}
    for n, m in model.named_modules():
        if getattr(m, 'weight_mask', None) is not None:
            w, b = m.masked_weight_bias()
            out[n + '.weight'] = w.detach()
            if b is not None:
                out[n + '.bias'] = b.detach()
    return out


def seam_then_finetune(base, cfg, k, data, hp, granularity, ft_epochs, run):
    """SeaM's three steps on the target task: (1) train only a new output layer on the pretrained features;
    (2) re-engineer (masks + that output layer), the bar being step 1's validation accuracy; (3) fine-tune the
    pretrained weights with the masks applied, from a new output layer. Returns (fine-tuned model, selected
    record, (kept, total) weights)."""
    step1 = with_new_output(base.state_dict(), cfg, k, run.device)
    for q in step1.parameters():
        q.requires_grad_(False)
    for q in output_layer(step1).parameters():
        q.requires_grad_(True)
    train_plain(step1, [{'params': output_layer(step1).parameters(), 'lr': 0.1}], data.train, data.val, ft_epochs,
                'seam_step1', run, momentum=0.0, wd=1e-4)
    add_masks(step1, granularity, skip=output_layer_name(step1))
    sel = reengineer(step1, output_layer(step1), data, evaluate(step1, data.val, run.device), hp, run, 'seam_step2')
    kept = kept_counts(step1)
    masked = masked_weights(step1)
    state = {n: masked.get(n, v) for n, v in base.state_dict().items()}
    return finetune(with_new_output(state, cfg, k, run.device), data, ft_epochs, 'seam_ft', run), sel, kept


def feature_extractor(base):
    """A copy of the pretrained network whose output layer is the identity: the attack's target features."""
    feat = copy.deepcopy(base).eval()
    parent, _, leaf = output_layer_name(feat).rpartition('.')
    setattr(feat.get_submodule(parent) if parent else feat, leaf, nn.Identity())
    return feat


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


def defect_rates(model, feat, test_dl, eps, samples, lo, hi, device):
    """Attack the first ``samples`` test images (PGD on ``feat``, 40 steps of eps/10) and report, for ``model``:
    clean accuracy, how many clean-correct images were attacked, and the defect inheritance rate (DIR): the share
    of clean-correct images whose prediction the attack flips."""
    trials = success = correct = n = 0
    for x, y in test_dl:
        if n >= samples:
            break
        x, y = x.to(device), y.to(device)
        xa = pgd(feat, x, eps=eps, step=eps / 10, iters=40, lo=lo, hi=hi)
        with torch.no_grad():
            clean, adv = model(x).argmax(1), model(xa).argmax(1)
        ok = clean == y
        trials += int(ok.sum())
        success += int((adv[ok] != y[ok]).sum())
        correct += int(ok.sum())
        n += len(y)
    return dict(clean_acc=correct / n, attacked=trials, samples=n, defect_inheritance_rate=success / max(trials, 1))


def defect_inheritance(base, cfg, k, data, hp, granularity, ft_epochs, pgd_eps, pgd_samples, norm, seed, run):
    """SeaM's defect-inheritance experiment on a target task with ``k`` classes: standard fine-tuning vs
    re-engineer-then-fine-tune with the same budget, then the DIR of each per PGD budget in ``pgd_eps``.

    base: the pretrained source network (eval mode); cfg: its model config; norm: (mean, std) of the inputs, which
    sets the valid pixel range of the attack. Returns the report dict."""
    standard = finetune(with_new_output(base.state_dict(), cfg, k, run.device), data, ft_epochs, 'standard_ft', run)
    seam, sel, (kept, total) = seam_then_finetune(base, cfg, k, data, hp, granularity, ft_epochs, run)
    feat = feature_extractor(base)
    mean, std = norm
    lo = min((0 - m) / s for m, s in zip(mean, std))
    hi = max((1 - m) / s for m, s in zip(mean, std))
    res = {}
    for name, m in (('standard', standard), ('seam', seam)):
        m.eval()
        res[name] = dict(test_acc=evaluate(m, data.test, run.device), by_eps={})
        for eps in pgd_eps:
            torch.manual_seed(seed)  # the same random starts for both models
            res[name]['by_eps'][str(eps)] = defect_rates(m, feat, data.test, eps, pgd_samples, lo, hi, run.device)
    return dict(selected=sel, weight_retention=kept / total, **res,
                pgd=dict(eps=list(pgd_eps), step='eps/10', iters=40, clip=[lo, hi]))


def timed(fn, *args, **kwargs):
    """(fn's result, minutes it took)."""
    t0 = time.time()
    out = fn(*args, **kwargs)
    return out, (time.time() - t0) / 60
