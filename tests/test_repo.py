"""Repository-level checks: the README's commands, CI, copy-paste layer files, and the project's safety rules."""
import ast
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY_FILES = [p for p in ROOT.rglob('*.py') if '.git' not in p.parts and 'runs' not in p.parts]


def _readme_commands():
    text = (ROOT / 'README.md').read_text()
    return re.findall(r'^```(?:bash|sh)?\n(.*?)\n```', text, flags=re.S | re.M)


def test_ci_runs_the_readme_test_command():
    blocks = _readme_commands()
    assert len(blocks) >= 2, 'README.md must open with two command blocks (main job, tests)'
    test_cmd = blocks[1].strip()
    assert 'pytest' in test_cmd and 'pip install -r requirements.txt' in test_cmd
    ci = (ROOT / '.ci' / 'run').read_text()
    assert test_cmd in ci, f'.ci/run must run the README test command verbatim: {test_cmd!r}'


def test_requirements_pin_the_local_torch():
    req = (ROOT / 'requirements.txt').read_text()
    assert re.search(r'^torch==2\.14\.1$', req, re.M) and re.search(r'^torchvision==0\.29\.1$', req, re.M)


@pytest.mark.parametrize('path', PY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_safety_rules(path):
    """Every torch.load is weights_only=True; no sys.path edits, no eval of strings, no downloads."""
    if path.name == 'test_repo.py':
        return
    tree = ast.parse(path.read_text())
    # Calls inside `with pytest.raises(...)` check that the code refuses them: not a use.
    refused = {id(n) for w in ast.walk(tree) if isinstance(w, ast.With)
               and any('pytest.raises' in ast.unparse(i.context_expr) for i in w.items)
               for stmt in w.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in refused:
            continue
        name = ast.unparse(node.func)
        where = f'{path.relative_to(ROOT)}:{node.lineno}'
        if name == 'torch.load':
            kws = {k.arg: ast.unparse(k.value) for k in node.keywords}
            assert kws.get('weights_only') == 'True', f'{where}: torch.load without weights_only=True'
        assert name not in ('eval', 'exec'), f'{where}: {name}() of a string'
        assert name not in ('sys.path.append', 'sys.path.insert'), f'{where}: sys.path edit'
        for kw in node.keywords:
            if kw.arg in ('pretrained', 'download'):
                assert ast.unparse(kw.value) != 'True', f'{where}: {kw.arg}=True would download'


# What each copied layer file must be able to do on its own, checked against an independent reference.
LAYER_SMOKE = {
    'monarch.py': """
        import torch, monarch
        torch.manual_seed(0)
        layer = monarch.MonarchLinear(20, 30, nblocks=4)
        x = torch.randn(5, 20)
        dense = layer(torch.eye(20)) - layer.bias          # column j = W e_j: a second code path
        torch.testing.assert_close(layer(x), x @ dense + layer.bias, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.to_dense().T, dense, rtol=1e-5, atol=1e-5)
    """,
    'butterfly.py': """
        import torch, butterfly
        f = butterfly.fft(16)
        x = torch.randn(3, 16, dtype=torch.complex64)
        torch.testing.assert_close(f(x), torch.fft.fft(x), rtol=1e-4, atol=1e-4)
        layer = butterfly.Butterfly(12, 20)
        y = layer(torch.randn(4, 12))
        assert y.shape == (4, 20)
    """,
    'mask.py': """
        import torch, mask
        conv = mask.MaskConv(3, 4, 3, padding=1)
        conv.enable_masks()
        with torch.no_grad():
            conv.weight_mask[0].fill_(-1.0)
        x = torch.randn(2, 3, 5, 5)
        ref = torch.nn.functional.conv2d(x, conv.weight * (conv.weight_mask > 0), conv.bias * (conv.bias_mask > 0), padding=1)
        torch.testing.assert_close(conv(x), ref)
        conv(x).sum().backward()
        assert conv.weight.grad is None and conv.weight_mask.grad is not None
    """,
}


@pytest.mark.parametrize('name', sorted(LAYER_SMOKE))
def test_layer_file_works_when_copied_alone(tmp_path, name):
    src = ROOT / 'layers' / name
    stdlib = set(sys.stdlib_module_names)
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset == 0:
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or '']
            for m in mods:
                top = m.split('.')[0]
                assert top == 'torch' or top in stdlib, f'layers/{name} imports {m} at module level'
    shutil.copy(src, tmp_path / name)
    # cwd is the empty folder, -E ignores PYTHONPATH: the repository is not importable from there.
    proc = subprocess.run([sys.executable, '-E', '-c', textwrap.dedent(LAYER_SMOKE[name])], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_readme_layer_snippet_runs_as_written(tmp_path):
    """The README's "Using the layers in another repository" code, run in an empty folder holding only the copied
    layer file (the repository is not importable from there)."""
    text = (ROOT / 'README.md').read_text()
    section = text.split('## Using the layers in another repository', 1)[1].split('\n## ', 1)[0]
    code = re.search(r'^```python\n(.*?)\n```', section, flags=re.S | re.M).group(1)
    copied = re.search(r'after copying layers/(\w+\.py)', code).group(1)
    shutil.copy(ROOT / 'layers' / copied, tmp_path / copied)
    proc = subprocess.run([sys.executable, '-E', '-c', code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
