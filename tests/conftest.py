import os, sys, subprocess
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture(scope='session')
def root(): return ROOT

@pytest.fixture(params=['auto', 'compiled'], ids=['cpu-op', 'device-path'])
def kernel(request, monkeypatch):
    "Run a test on each statistics path: the CPU's C++ op, and the compiled path of every other device, forced"
    monkeypatch.setenv('DEEPSTABLE_KERNEL', request.param)
    return request.param

@pytest.fixture(scope='session')
def docs_site():
    "Build the docs site once per session; returns the list of pages"
    sys.path.insert(0, str(ROOT/'tools'))
    import build_docs
    return build_docs.build()

def nan_batch(n):
    "A callback that makes training batch `n`'s input all NaN, before any other callback sees it"
    from fastai.callback.core import Callback
    def before_batch(self):
        if self.training and self.train_iter==n: self.learn.xb = (self.xb[0].clone().fill_(float('nan')),)
    return type('NaNBatch', (Callback,), dict(order=-20, before_batch=before_batch))()

def stop_after(n):
    "A callback that ends the fit after training batch `n`"
    from fastai.callback.core import Callback, CancelFitException
    def after_batch(self):
        if self.training and self.train_iter>=n: raise CancelFitException
    return type('StopAfter', (Callback,), dict(after_batch=after_batch))()

def run_py(code, cwd=ROOT, timeout=600, env=None):
    "Run `code` in a fresh Python process; return the CompletedProcess"
    return subprocess.run([sys.executable, '-c', code], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})

def cli(*args, cwd=ROOT, timeout=900):
    "Run the `deepstable` console script; return the CompletedProcess"
    exe = Path(sys.executable).parent/'deepstable'
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'MPLBACKEND': 'Agg'})

@pytest.fixture(scope='session')
def demo_report(tmp_path_factory):
    "Run `deepstable demo --quick` once per session (README command (a)'s job); returns (process, report folder)"
    out = tmp_path_factory.mktemp('demo')/'report'
    r = cli('demo', '--quick', '--out', out)
    return r, out
