"""models/weights.py and the scripts' --init-from / --weights: every external format loads and gives the logits of
the model it came from; a pickle that would run code is refused in every container without running; a state dict of
another architecture is a one-line key error (exit 2).

References: the source model's own forward (the weights were saved from it), and a marker file that the hostile
pickle would create when run (it must never appear).
"""
import argparse
import builtins
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from timm.models.mlp_mixer import MlpMixer

import common
import eval as ev
import train_vitae_monarch as tvm
from models import build_model
from models.weights import load_weights

torch.set_num_threads(1)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
CFG = {'family': 'timm', 'name': 'test_vit',
       'kwargs': dict(num_classes=10, img_size=32, patch_size=8, depth=1, mlp='dense')}


def source_model(seed):
    torch.manual_seed(seed)
    return build_model(CFG).eval()


def logits_after_loading(state):
    model = source_model(99)  # other random weights until loaded
    model.load_state_dict(state)
    with torch.no_grad():
        return model(X)


def logits(model):
    with torch.no_grad():
        return model(X)


def test_each_format_loads_and_gives_the_source_logits(tmp_path):
    model, ema = source_model(1), source_model(2)
    sd, ema_sd = model.state_dict(), ema.state_dict()
    files = {
        'raw.pth': (sd, 'state_dict', None),
        'raw_legacy.pth': (sd, 'state_dict', None),
        'official.pth.tar': ({'epoch': 300, 'arch': 'test_vit', 'state_dict': sd, 'state_dict_ema': ema_sd,
                              'optimizer': {'state': {}, 'param_groups': []}, 'version': 2, 'metric': 81.2,
                              'args': argparse.Namespace(model='test_vit', lr=5e-4, mixup=0.8, aa='rand-m9')},
                             'training dict', 'state_dict'),
        'deit.pth': ({'model': {'module.' + k: v for k, v in sd.items()},
                      'model_ema': {'module.' + k: v for k, v in ema_sd.items()}, 'epoch': 3}, 'training dict',
                     'model'),
        'ddp.pt': ({'module.' + k: v for k, v in sd.items()}, 'state_dict', None),
    }
    for name, (obj, fmt, key) in files.items():
        torch.save(obj, tmp_path / name, _use_new_zipfile_serialization='legacy' not in name)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / 'w.safetensors'))
    files['w.safetensors'] = (None, 'safetensors', None)
    common.save_checkpoint({'project': common.PROJECT, 'kind': 'vitae_train', 'model': CFG, 'state_dict': sd,
                            'ema': ema_sd, 'args': {}}, str(tmp_path / 'own.pt'))
    files['own.pt'] = (None, 'project', 'state_dict')
    ref, ref_ema = logits(model), logits(ema)
    for name, (_, fmt, key) in files.items():
        state, info = load_weights(str(tmp_path / name))
        assert info['format'] == fmt and info['key'] == key, name
        assert torch.equal(logits_after_loading(state), ref), name
    for name in ('official.pth.tar', 'deit.pth', 'own.pt'):
        state, info = load_weights(str(tmp_path / name), key='state_dict_ema')
        assert torch.equal(logits_after_loading(state), ref_ema), name
    state, info = load_weights(str(tmp_path / 'official.pth.tar'))
    assert info['args']['lr'] == 5e-4 and info['stripped'] == []
    assert load_weights(str(tmp_path / 'ddp.pt'))[1]['stripped'] == ['module.']
    assert load_weights(str(tmp_path / 'own.pt'))[1]['config'] == CFG
    with pytest.raises(ValueError, match='without an EMA copy'):
        load_weights(str(tmp_path / 'raw.pth'), key='state_dict_ema')


class _RunsCode:
    """Unpickling this would call open(marker, 'w'): creating the marker file is the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, 'w'))


def test_a_pickle_that_would_run_code_is_refused_in_every_container(tmp_path):
    marker = str(tmp_path / 'code_ran')
    evil = _RunsCode(marker)
    sd = {'w': torch.ones(2)}
    files = {
        'raw_zip.pth': ({'w': torch.ones(2), 'x': evil}, dict()),
        'raw_legacy.pth': ({'w': torch.ones(2), 'x': evil}, dict(_use_new_zipfile_serialization=False)),
        'official.pth.tar': ({'state_dict': sd, 'args': argparse.Namespace(lr=evil)}, dict()),
        'official_legacy.pth.tar': ({'state_dict': sd, 'args': argparse.Namespace(lr=evil)},
                                    dict(_use_new_zipfile_serialization=False)),
        'own.pt': ({'project': common.PROJECT, 'kind': 'vitae_train', 'model': CFG, 'state_dict': sd,
                    'args': {'x': evil}}, dict()),
    }
    for name, (obj, kw) in files.items():
        torch.save(obj, tmp_path / name, **kw)
    with open(tmp_path / 'plain.pkl', 'wb') as f:
        pickle.dump({'epoch': 1, 'x': evil}, f, protocol=2)  # plain pickle (a tensor in it would be refused first)
    files['plain.pkl'] = None
    assert not os.path.exists(marker)
    for name in files:
        with pytest.raises(ValueError, match=r'refused to load: .*\((io|builtins)\.open\)'):
            load_weights(str(tmp_path / name))
        assert not os.path.exists(marker), name
    # the scripts say it in one line, exit 2, and nothing ran either
    for argv in (['--model', 'test_vit', '--weights', str(tmp_path / 'raw_zip.pth'), '--dataset', 'digits'],):
        with pytest.raises(SystemExit) as e:
            common.run_main(lambda: ev.main(argv))
        assert e.value.code == 2
    assert not os.path.exists(marker)


def _user_error(capsys, main, *argv):
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: main(list(argv)))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith('error: ') and '\n' not in err, err
    return err


def test_another_architecture_is_a_one_line_key_error(tmp_path, capsys):
    torch.manual_seed(3)
    mixer = MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=1, embed_dim=64)
    torch.save(mixer.state_dict(), tmp_path / 'mixer.pth')
    vit_args = ['--model', 'test_vit', '--model-kwargs', 'patch_size=8', 'depth=1']
    err = _user_error(capsys, ev.main, *vit_args, '--weights', str(tmp_path / 'mixer.pth'), '--dataset', 'digits',
                      '--latency-iters', '0')
    assert 'does not fit test_vit' in err and 'missing (' in err and 'unexpected (' in err
    err = _user_error(capsys, tvm.main, *vit_args, '--init-from', str(tmp_path / 'mixer.pth'), '--output',
                      str(tmp_path / 'runs'))
    assert 'does not fit test_vit' in err and 'missing (' in err
    assert not os.path.exists(tmp_path / 'runs')  # refused before a run folder was made
    # the same file for the right architecture, its head for another class count: --allow-partial loads the rest
    torch.manual_seed(4)
    vit = build_model(dict(CFG, kwargs=dict(CFG['kwargs'], num_classes=1000)))
    torch.save(vit.state_dict(), tmp_path / 'vit1000.pth')
    err = _user_error(capsys, ev.main, *vit_args, '--weights', str(tmp_path / 'vit1000.pth'), '--dataset',
                      'digits', '--latency-iters', '0')
    assert '2 with another shape (head.weight (1000, 64) vs (10, 64), head.bias' in err
    out = tmp_path / 'r.json'
    ev.main([*vit_args, '--weights', str(tmp_path / 'vit1000.pth'), '--dataset', 'digits', '--latency-iters', '0',
             '--allow-partial', '--json', str(out)])
    assert 'warning:' in capsys.readouterr().err
    assert json.loads(out.read_text())['results'][0]['samples'] == 359


def test_unknown_model_name_lists_close_matches(tmp_path, capsys):
    for main, extra in ((tvm.main, ['--output', str(tmp_path / 'runs')]),
                        (ev.main, ['--weights', str(tmp_path / 'w.pth'), '--dataset', 'digits'])):
        err = _user_error(capsys, main, '--model', 'vit_tiny_patch16', *extra)
        assert "unknown model 'vit_tiny_patch16'" in err and 'closest: ' in err and 'vit_tiny_patch16_224' in err
    assert not os.path.exists(tmp_path / 'runs')


def test_eval_builds_a_cifar_net_for_a_chenyaofo_style_file(tmp_path):
    """A raw state dict of this project's resnet20 (chenyaofo/pytorch-cifar-models keys) through eval.py --model."""
    torch.manual_seed(5)
    src = build_model({'family': 'cifar', 'name': 'resnet20', 'kwargs': {'num_classes': 10}}).eval()
    with torch.no_grad():
        for m in src.modules():  # non-trivial BatchNorm statistics, so that they must load too
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    torch.save(src.state_dict(), tmp_path / 'cifar10_resnet20.pt')
    argv = ['--model', 'resnet20', '--weights', str(tmp_path / 'cifar10_resnet20.pt'), '--dataset', 'cifar10']
    entry = ev.prepare_weights(ev.get_args(argv))
    assert entry['name'] == 'resnet20' and entry['kind'] == 'state_dict' and entry['img_size'] == 32
    assert torch.equal(logits(entry['model']), logits(src))
    with pytest.raises(common.UserError, match='without MLP blocks'):
        ev.prepare_weights(ev.get_args([*argv, '--mlp', 'monarch']))
