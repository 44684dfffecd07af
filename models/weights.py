"""Weights from a file, whoever wrote it, loaded without running code from it.

``load_weights(path, key=None)`` -> ``(state_dict, info)`` for

- this project's checkpoints: delegated to ``common.load_checkpoint`` (its own checks); ``key='state_dict_ema'``
  picks the EMA copy a training checkpoint keeps under ``'ema'``. ``info['config']`` is the model config it holds.
- a raw state dict (``torch.save(model.state_dict())``: ``.pt``/``.pth``, e.g. chenyaofo's CIFAR files);
- the dict the official ViTAE / timm training scripts write (``'state_dict'``, optionally ``'state_dict_ema'``,
  ``'args'``: an ``argparse.Namespace``, ``'epoch'``, ``'optimizer'`` ...) and DeiT's (``'model'``, ``'model_ema'``);
  ``key`` None or 'state_dict' takes ``state_dict`` (else ``model``), 'state_dict_ema' takes ``state_dict_ema``
  (else ``model_ema``);
- ``.safetensors`` files (no pickle at all; read by the ``safetensors`` package timm depends on).

Every pickle is read by ``torch.load(weights_only=True)``, in the zip format and in the legacy (torch < 1.6) one,
with exactly one extra class allowed, ``argparse.Namespace`` (what the official scripts pickle under 'args'), and
only for that call (``torch.serialization.safe_globals``). Anything else a pickle asks for is refused before it
runs, naming the refused global. Key prefixes that wrappers add to every key are removed: ``module.``
(DistributedDataParallel, timm's EMA wrapper) and ``_orig_mod.`` (torch.compile). Problems raise ``ValueError``
(or ``common.UserError`` from ``load_checkpoint``) with one line naming the file and the fix.
"""
import argparse
import collections.abc
import os
import pickle
import re

import torch

__all__ = ['KEYS', 'load_weights']

KEYS = ('state_dict', 'state_dict_ema')
_CANDIDATES = {'state_dict': ('state_dict', 'model'), 'state_dict_ema': ('state_dict_ema', 'model_ema')}
_PREFIXES = ('module.', '_orig_mod.')


def _is_safetensors(path):
    if path.endswith('.safetensors'):
        return True
    with open(path, 'rb') as f:  # 8-byte little-endian header length, then a JSON object
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{' and 0 < int.from_bytes(head[:8], 'little') < 100_000_000


def _torch_load(path):
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r'unsupported (?:global: )?GLOBAL (\S+)|Unsupported operand (\d+)', str(e), re.I)
        if m and m.group(2):
            raise ValueError(f'{path!r}: refused to load: not a torch.save file (its pickle uses opcode {m.group(2)}, '
                             'which the safe loader does not run); save it with torch.save') from None
        what = f' ({m.group(1)})' if m else ''
        raise ValueError(f'{path!r}: refused to load: its pickle asks for an object that is not plain data{what}; '
                         'only tensors, numbers, strings, containers and argparse.Namespace are allowed '
                         '(weights_only=True)') from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError, IndexError, KeyError) as e:
        raise ValueError(f'{path!r} is not a PyTorch weights file (unreadable or truncated: '
                         f'{type(e).__name__})') from None


def _strip_prefixes(state):
    stripped = []
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            stripped.append(prefix)
    return state, stripped


def _check_state(path, state, where):
    if not isinstance(state, collections.abc.Mapping) or not state:
        raise ValueError(f'{path!r}: {where} is not a state dict (a non-empty dict of tensors)')
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ValueError(f'{path!r}: {where} is not a state dict: {len(bad)} entries are not tensors '
                         f'({", ".join(map(str, bad[:3]))})')
    return dict(state)


def load_weights(path, key=None):
    """(state dict, info) from ``path`` (module docstring). ``info``: ``{'format': 'project' | 'state_dict' |
    'training dict' | 'safetensors', 'key': the entry used or None, 'stripped': [prefixes], 'config': the model
    config (project checkpoints) or None, 'args': the pickled args as a dict or None}``."""
    if key is not None and key not in KEYS:
        raise ValueError(f"weights key must be one of {', '.join(KEYS)}, got {key!r}")
    if not os.path.isfile(path):
        raise ValueError(f'weights file {path!r} not found (not a file)')
    info = {'format': None, 'key': None, 'stripped': [], 'config': None, 'args': None}
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        if key == 'state_dict_ema':
            raise ValueError(f'{path!r} is a safetensors file: it holds one state dict, no EMA copy; '
                             'drop --weights-key state_dict_ema')
        try:
            state = load_file(path, device='cpu')
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f'{path!r} is not a valid safetensors file ({" ".join(str(e).split())[:120]})') from None
        info['format'] = 'safetensors'
    else:
        obj = _torch_load(path)
        import common
        if isinstance(obj, dict) and obj.get('project') == common.PROJECT:
            ck = common.load_checkpoint(path)
            info.update(format='project', config=ck['model'], args=ck.get('args'))
            if key == 'state_dict_ema':
                if ck.get('ema') is None:
                    raise ValueError(f"{path!r} has no EMA weights (its 'ema' entry is empty); use "
                                     '--weights-key state_dict')
                state, info['key'] = ck['ema'], 'ema'
            else:
                state, info['key'] = ck['state_dict'], 'state_dict'
        elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
            if key == 'state_dict_ema':
                raise ValueError(f'{path!r} is a plain state dict without an EMA copy; drop --weights-key '
                                 'state_dict_ema')
            state, info['format'] = obj, 'state_dict'
        elif isinstance(obj, dict):
            found = [k for k in _CANDIDATES[key or 'state_dict'] if k in obj]
            if not found:
                have = ', '.join(repr(k) for k in list(obj)[:8])
                raise ValueError(f"{path!r} has no {' or '.join(map(repr, _CANDIDATES[key or 'state_dict']))} entry "
                                 f'(it has {have}); pass --weights-key with one it has, or a state dict file')
            info.update(format='training dict', key=found[0])
            state = obj[found[0]]
            if isinstance(obj.get('args'), argparse.Namespace):
                info['args'] = vars(obj['args'])
            elif isinstance(obj.get('args'), dict):
                info['args'] = obj['args']
        else:
            raise ValueError(f'{path!r} holds a {type(obj).__name__}, not a state dict or a dict with one')
    state = _check_state(path, state, f"its {info['key']!r} entry" if info['key'] else 'the file')
    state, info['stripped'] = _strip_prefixes(state)
    return state, info
