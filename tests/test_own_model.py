"""Bring your own model and weights, through the scripts: a timm ViT with Monarch MLPs learns digits and eval.py
reproduces its test accuracy exactly (from the checkpoint, and as --model/--weights); --init-from a foreign dense
state dict starts a Monarch (or butterfly) model at the projection of those weights.

References: the training script's own reported test accuracy (eval.py must give the same count of correct images),
and a dense model whose MLP weights are Monarch matrices (the projected model must give its logits).
"""
import argparse
import copy
import json
import math
import os

import pytest
import torch

import common
import eval as ev
import train_vitae_monarch as tvm
from layers.monarch import MonarchLinear
from models import build_model, structured, vitae

VIT = ['--model', 'test_vit', '--model-kwargs', 'patch_size=8', 'depth=2']
QUIET = ['--progress', '0', '--threads', '1']


def _eval_json(tmp_path, *argv):
    out = tmp_path / 'eval.json'
    ev.main([*argv, '--dataset', 'digits', '--latency-iters', '0', '--threads', '1', '--json', str(out)])
    return json.loads(out.read_text())['results'][0]


def test_timm_vit_with_monarch_mlps_learns_digits_and_eval_reproduces_it(tmp_path):
    out = tmp_path / 'runs'
    tvm.main([*VIT, '--mlp', 'monarch', '--epochs', '10', '--blr', '2e-2', '--warmup-epochs', '1', '--augment', '0',
              '--drop-path', '0', '--output', str(out), *QUIET])
    log = [json.loads(line) for line in open(out / '001' / 'log.jsonl')]
    final = [r for r in log if 'test/acc' in r][-1]
    assert final['test/acc'] > 0.5  # chance is 0.1
    ckpt = common.latest_checkpoint(str(out))
    ck = torch.load(ckpt, weights_only=True)
    assert ck['model']['family'] == 'timm' and ck['model']['name'] == 'test_vit'
    assert ck['model']['kwargs']['mlp'] == 'monarch' and ck['model']['kwargs']['patch_size'] == 8
    used_ema = bool(final['test/used_ema'])
    correct = round(final['test/acc'] * 359)
    r = _eval_json(tmp_path, ckpt, *([] if used_ema else ['--no-ema']))
    assert r['samples'] == 359 and round(r['top1'] * 359 / 100, 6) == correct
    assert r['model'] == 'test_vit/monarch'
    # the same weights as "your own file": the checkpoint itself and a raw state dict exported from it
    key = 'state_dict_ema' if used_ema else 'state_dict'
    r = _eval_json(tmp_path, *VIT, '--mlp', 'monarch', '--weights', ckpt, '--weights-key', key)
    assert round(r['top1'] * 359 / 100, 6) == correct
    torch.save(ck['ema'] if used_ema else ck['state_dict'], tmp_path / 'raw.pth')
    r = _eval_json(tmp_path, *VIT, '--mlp', 'monarch', '--weights', str(tmp_path / 'raw.pth'))
    assert round(r['top1'] * 359 / 100, 6) == correct and r['kind'] == 'state_dict'


def test_init_from_a_foreign_dense_state_dict_projects_it(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = {'family': 'timm', 'name': 'test_vit',
           'kwargs': dict(num_classes=10, img_size=32, patch_size=8, depth=2, mlp='dense')}
    dense = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # MLP weights that Monarch (nblocks 4) represents exactly
        for i in range(2):
            for f in ('fc1', 'fc2'):
                lin = dense.get_submodule(f'blocks.{i}.mlp.{f}')
                m = MonarchLinear(lin.in_features, lin.out_features, nblocks=4, impl='ref')
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
                lin.weight.copy_(m.to_dense())
    torch.save({'module.' + k: v for k, v in dense.state_dict().items()}, tmp_path / 'dense_ddp.pth')
    out = tmp_path / 'runs'
    # lr 0: the saved weights are the initial ones, i.e. what --init-from made of the file
    tvm.main([*VIT, '--mlp', 'monarch', '--init-from', str(tmp_path / 'dense_ddp.pth'), '--epochs', '1',
              '--limit-train-batches', '1', '--blr', '0', '--ema-halflife-kimg', '0', '--no-test', '--drop-path', '0',
              '--output', str(out), *QUIET])
    assert '4 dense layers projected into monarch layers' in capsys.readouterr().out
    ck = torch.load(common.latest_checkpoint(str(out)), weights_only=True)
    model = build_model(ck['model']).eval()
    model.load_state_dict(ck['state_dict'])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - dense(x)).abs().max() < 1e-5
    assert not os.path.exists(out / '002')
    # butterfly MLPs start at the hierarchical projection of the same weights: what the converter makes of them
    tvm.main([*VIT, '--mlp', 'butterfly', '--init-from', str(tmp_path / 'dense_ddp.pth'), '--epochs', '1',
              '--limit-train-batches', '1', '--blr', '0', '--ema-halflife-kimg', '0', '--no-test', '--drop-path', '0',
              '--output', str(out), *QUIET])
    assert '4 dense layers projected into butterfly layers' in capsys.readouterr().out
    ck = torch.load(common.latest_checkpoint(str(out)), weights_only=True)
    model = build_model(ck['model']).eval()
    model.load_state_dict(ck['state_dict'])
    reference = copy.deepcopy(dense)
    structured.convert(reference, 'butterfly', init='dense', impl='ref')
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() < 1e-5
        assert (model(x) - dense(x)).abs().max() > 1e-3  # a Monarch matrix is no butterfly: a real projection


def test_official_vitae_training_dict_starts_a_monarch_fine_tune(tmp_path, capsys):
    """The README's fine-tune command on a file shaped like the official ViTAE release (timm's CheckpointSaver dict
    with an argparse.Namespace and an EMA copy); the result equals vitae.project_to_monarch of the EMA weights."""
    torch.manual_seed(2)
    dense, ema = (vitae.vitae_basic_tiny(num_classes=10, img_size=32, impl='ref').eval() for _ in range(2))
    torch.save({'epoch': 299, 'arch': 'ViTAE_basic_Tiny', 'state_dict': dense.state_dict(),
                'state_dict_ema': ema.state_dict(), 'optimizer': {}, 'version': 2, 'metric': 75.3,
                'args': argparse.Namespace(model='ViTAE_basic_Tiny', lr=5e-4, model_ema=True)},
               tmp_path / 'ViTAE-T.pth.tar')
    out = tmp_path / 'runs'
    tvm.main(['--model', 'vitae_basic_tiny', '--mlp', 'monarch', '--init-from', str(tmp_path / 'ViTAE-T.pth.tar'),
              '--weights-key', 'state_dict_ema', '--epochs', '1', '--limit-train-batches', '1', '--blr', '0',
              '--ema-halflife-kimg', '0', '--no-test', '--drop-path', '0', '--performer-drop', '0', '--output',
              str(out), *QUIET])
    assert "(training dict, 'state_dict_ema'): 14 dense layers projected" in capsys.readouterr().out
    ck = torch.load(common.latest_checkpoint(str(out)), weights_only=True)
    reference = vitae.project_to_monarch(ema.state_dict(), nblocks=4, name='vitae_basic_tiny', img_size=32,
                                         impl='ref')
    for k, v in reference.state_dict().items():
        if 'running' not in k and 'num_batches' not in k:  # BatchNorm statistics move in a train-mode step
            torch.testing.assert_close(ck['state_dict'][k], v, rtol=0, atol=1e-6, msg=k)
