"`load_learner` of a learner exported with the monitor and the guard, where `deepstable_fastai` is not installed."
import subprocess, sys, textwrap
import pytest, torch
from fastai.data.core import Datasets
from fastai.data.transforms import ItemGetter
from fastai.learner import Learner
from fastai.losses import MSELossFlat
from fastai.test_utils import RegModel
from deepstable_fastai.monitor import ActivationMonitor
from deepstable_fastai.guard import ExplosionGuard
from deepstable_fastai.trackers import pkg_reduce_ex

# Every finder of the new process is wrapped so that it cannot find `deepstable_fastai`: to `import` and to
# `importlib.util.find_spec` the package is simply not there, as on a machine where it was never installed.
HIDE = textwrap.dedent('''
    import sys, importlib, importlib.util
    class _Hidden:
        def __init__(self, f): self.f = f
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0]=='deepstable_fastai' or not hasattr(self.f, 'find_spec'): return None
            return self.f.find_spec(name, path, target)
        def __getattr__(self, k): return getattr(self.f, k)
    sys.meta_path[:] = [_Hidden(f) for f in sys.meta_path]
    importlib.invalidate_caches()
    assert importlib.util.find_spec('deepstable_fastai') is None
    try: import deepstable_fastai; raise AssertionError('deepstable_fastai is still importable')
    except ModuleNotFoundError: pass
''')

LOAD = textwrap.dedent('''
    import sys, warnings
    warnings.simplefilter('ignore')
    from fastai.learner import load_learner
    try: learn = load_learner(sys.argv[1])
    except Exception as e: print(f'{type(e).__name__}: {e}'); sys.exit(0)
    print('LOADED', *sorted(type(cb).__name__ for cb in learn.cbs))
''')

def _export(tmp_path):
    "Fit a tiny learner with the monitor and the guard attached and export it"
    items = [(torch.randn(1), torch.randn(1)) for _ in range(32)]  # `synth_learner`'s data cannot be exported
    dls = Datasets(items, [[ItemGetter(0)],[ItemGetter(1)]], splits=[range(24),range(24,32)]).dataloaders(bs=8)
    learn = Learner(dls, RegModel(), loss_func=MSELossFlat(), cbs=[ActivationMonitor(), ExplosionGuard()])
    learn.fit(1)
    fn = tmp_path/'learn.pkl'
    learn.export(fn)
    return fn

def _load(fn, hide):
    r = subprocess.run([sys.executable, '-c', (HIDE if hide else '')+LOAD, str(fn)], capture_output=True, text=True,
                       timeout=300, cwd=fn.parent)
    assert r.returncode==0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]

def _check_clear(out):
    assert out.startswith('RuntimeError: '), out
    assert 'needs the package `deepstable_fastai`, which is not installed here' in out
    assert 'pip install deepstable-fastai' in out and 'learn.remove_cb(' in out, out

@pytest.fixture
def opted_in(monkeypatch):
    "The monitor and the guard with `__reduce_ex__ = pkg_reduce_ex`, as the lead adds it to their class bodies"
    for c in (ActivationMonitor, ExplosionGuard): monkeypatch.setattr(c, '__reduce_ex__', pkg_reduce_ex, raising=False)

def test_loads_with_package(tmp_path, opted_in):
    out = _load(_export(tmp_path), hide=False)
    assert out.startswith('LOADED') and 'ActivationMonitor' in out.split() and 'ExplosionGuard' in out.split(), out

def test_clear_error_without_package(tmp_path, opted_in):
    _check_clear(_load(_export(tmp_path), hide=True))

def test_monitor_and_guard_opt_in(tmp_path):
    "As shipped: fastai's `UnboundLocalError: ... 'res'` until both classes have `__reduce_ex__ = pkg_reduce_ex`"
    _check_clear(_load(_export(tmp_path), hide=True))
