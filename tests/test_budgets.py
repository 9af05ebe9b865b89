"""The device path's budgets, measured on the CPU with it forced (`DEEPSTABLE_KERNEL=compiled`): dispatched ops and
compiled-kernel calls per hooked output, host syncs per batch, compiles per fit. Host time is a benchmark
(`bench/engine.py`), not a test: counts are exact, timings on a shared machine are not."""
import os, statistics
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import torch._dynamo.utils as du
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.callback.core import Callback, CancelTrainException
from fastai.torch_core import set_seed
from fastai.callback.hook import ActivationStats
from fastai.vision.models.xresnet import xresnet18
from deepstable_fastai.data import digits_dls
from deepstable_fastai.engine import OpCounter, find_modules
from deepstable_fastai.monitor import ActivationMonitor
from deepstable_fastai.guard import ExplosionGuard
import fastai.callback.progress # `Learner.no_bar`, `no_logging`

@pytest.fixture(autouse=True)
def device_path(monkeypatch): monkeypatch.setenv('DEEPSTABLE_KERNEL', 'compiled')

class Count(Callback):
    "Ops, compiled calls and syncs from `before_batch` to `after_batch`, per batch, split by phase"
    order = -100
    def __init__(self): self.res = {True:[], False:[]}
    def before_batch(self): self.c = OpCounter().__enter__()
    def after_batch(self): self.c.__exit__(None, None, None); self.res[self.training].append((self.c.ops, self.c.calls, self.c.syncs))

class StopAfter(Callback):
    order = 99
    def __init__(self, n): self.n = n
    def after_batch(self):
        if self.training and self.iter+1>=self.n: raise CancelTrainException

def tiny(n=32):
    set_seed(0)
    m = nn.Sequential(*[o for _ in range(n) for o in (nn.Linear(8,8), nn.ReLU())], nn.Linear(8,1))
    x = torch.randn(64*8, 8); y = x.sum(1, keepdim=True)
    return Learner(DataLoaders.from_dsets(list(zip(x,y)), list(zip(x[:128],y[:128])), bs=64, num_workers=0), m, loss_func=F.mse_loss)

def xres():
    set_seed(0)
    return Learner(digits_dls(size=32, bs=32), xresnet18(c_in=1, n_out=10), loss_func=F.cross_entropy)

def measure(make, cbs, nb=3):
    "Median ops, compiled calls and syncs per training batch (the first one, which allocates, left out) and per valid batch"
    learn = make(); c = Count(); learn.add_cb(c)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[StopAfter(nb)]+cbs)
    med = lambda rs: [statistics.median(r[j] for r in rs) for j in range(3)]
    return med(c.res[True][1:]), med(c.res[False]), len(find_modules(learn.model))

CFGS = {'monitor': lambda: [ActivationMonitor()], 'monitor+hist': lambda: [ActivationMonitor(with_hist=True)],
        'guard': lambda: [ExplosionGuard('skip')], 'both': lambda: [ActivationMonitor(), ExplosionGuard('skip')]}

@pytest.mark.parametrize('model', ['tiny', 'xresnet18'])
def test_ops_and_syncs(model):
    make = tiny if model=='tiny' else xres
    (b_ops,_,_),_,nout = measure(make, [])
    for name,cbs in CFGS.items():
        (ops,calls,syncs),(vops,vcalls,vsyncs),_ = measure(make, cbs())
        per = (ops-b_ops+calls)/nout
        assert per<=3, f'{model} {name}: {per:.2f} ops+calls per hooked output' # the guard's maths: compiled calls
        assert syncs==(0 if name.startswith('monitor') else 1), f'{model} {name}: {syncs} host syncs per training batch'
        assert vsyncs==0, f'{model} {name}: {vsyncs} host syncs per validation batch'

def test_compiles_bounded():
    "A second fit, a bigger model and a new batch size compile nothing new"
    def fit(learn, cbs):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[StopAfter(2)]+cbs)
    fit(tiny(8), [ActivationMonitor(with_hist=True), ExplosionGuard('skip')])
    g0 = du.counters['stats']['unique_graphs']
    fit(tiny(8), [ActivationMonitor(with_hist=True), ExplosionGuard('skip')])
    fit(tiny(40), [ActivationMonitor(with_hist=True), ExplosionGuard('skip')])
    learn = tiny(40); learn.dls.train.bs = 48
    fit(learn, [ActivationMonitor(with_hist=True), ExplosionGuard('skip')])
    assert du.counters['stats']['unique_graphs']-g0 <= 1, du.counters['stats']

def test_one_gradient_pass():
    "The guard and the monitor together read the gradients once per batch: one `_foreach_norm`"
    class Norms(Count):
        def after_batch(self):
            self.c.__exit__(None, None, None)
            if self.training: self.res[True].append(self.c.by_op.get('aten._foreach_norm', 0))
    for cbs in ([ExplosionGuard('skip')], [ActivationMonitor()], [ActivationMonitor(), ExplosionGuard('skip')]):
        learn = tiny(); c = Norms(); learn.add_cb(c)
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[StopAfter(4)]+cbs)
        assert c.res[True][1:]==[1]*3, (cbs, c.res[True]) # batch 0 also measures the weights (`update_every`)
