"""The device path's budgets, measured on the CPU with it forced (`DEEPSTABLE_KERNEL=compiled`): dispatched ops and
compiled-kernel calls per hooked output, host syncs per batch (arrays uploaded from the host too), compiles per fit.
Host time is a benchmark (`bench/engine.py`), not a test: counts are exact, timings on a shared machine are not."""
import os, statistics
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import torch._dynamo.utils as du
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from torch.utils.data import DataLoader, TensorDataset
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

GPU_SUSPECTS = ('aten.nanmedian', 'aten.nonzero', 'aten.index', 'aten.index_put_', 'aten.masked_select',
                'aten._unique2', 'aten.lift_fresh') # named in a failure message

class Count(Callback):
    "Ops, compiled calls and syncs from `before_batch` to `CountEnd` (our `after_batch` included), per batch and phase"
    order = -100
    def __init__(self, inline=False): self.res,self.inline,self.gpu = {True:[], False:[]},inline,{}
    def before_batch(self): self.c,self.open = OpCounter(self.inline).__enter__(),True
    def end(self):
        c = self.c; c.__exit__(None, None, None); self.open = False
        self.res[self.training].append((c.ops, c.calls, c.syncs))
        if c.gpu_syncs or c.uploads: # the total (arrays uploaded too), and the suspects by name for the failure message
            self.gpu['total'] = self.gpu.get('total', 0)+c.gpu_syncs+c.uploads
            self.gpu.update({k:v for k,v in c.by_op.items() if k in GPU_SUSPECTS})
    def close(self):
        "Close a window a fit left open (it raised): the counter's mode must not stay on for the next test"
        if getattr(self, 'open', False): self.c.__exit__(None, None, None); self.open = False

def fit_counted(learn, c, cbs):
    "Fit one epoch with `Count` `c` (and its `CountEnd`) on, closing its window whatever happens"
    learn.add_cbs([c, CountEnd(c)])
    try:
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cbs)
    finally: c.close()

class CountEnd(Callback):
    "Close `Count`'s window after every callback before fastai's Recorder (order 50): the monitor writes in after_batch"
    order = 49
    def __init__(self, c): self.c = c
    def after_batch(self): self.c.end()

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
    learn,c = make(),Count()
    fit_counted(learn, c, [StopAfter(nb)]+cbs)
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
            self.c.__exit__(None, None, None); self.open = False
            if self.training: self.res[True].append(self.c.by_op.get('aten._foreach_norm', 0))
    for cbs in ([ExplosionGuard('skip')], [ActivationMonitor()], [ActivationMonitor(), ExplosionGuard('skip')]):
        learn = tiny(); c = Norms(); learn.add_cb(c)
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[StopAfter(4)]+cbs)
        assert c.res[True][1:]==[1]*3, (cbs, c.res[True]) # batch 0 also measures the weights (`update_every`)

@pytest.mark.parametrize('model', ['tiny', 'xresnet18'])
def test_no_gpu_syncs(model):
    "Nothing in the per-batch path that a CUDA device would answer with a host sync, the compiled maths included"
    for name,cbs in CFGS.items():
        c = Count(inline=True)
        fit_counted((tiny if model=='tiny' else xres)(), c, [StopAfter(12)]+cbs())
        assert not c.gpu, f'{model} {name}: ops that sync on a GPU: {c.gpu}'

def var_bs(x, y, sizes):
    "A loader of `x`, `y` whose batch size changes every batch (new shapes each batch, as padded text batches have)"
    c = [sum(sizes[:i]) for i in range(len(sizes)+1)]
    return DataLoader(TensorDataset(x, y), batch_sampler=[range(a, b) for a,b in zip(c, c[1:])])

class Uploads(Count):
    "Arrays made from host data per training batch (a host sync each on a GPU), from the third batch on"
    def before_fit(self): self.ups = []
    def end(self):
        c = self.c; super().end()
        if self.training and self.iter>=2: self.ups.append(c.uploads)

@pytest.mark.parametrize('frozen', [False, True])
def test_no_uploads(frozen):
    "New shapes every batch, and parameters without gradients: no array copied from the host per batch"
    for name,cbs in CFGS.items():
        set_seed(0)
        m = nn.Sequential(nn.Linear(8,16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16,16), nn.ReLU(), nn.Linear(16,1))
        if frozen: m[0].requires_grad_(False)
        x = torch.randn(400, 8); y = x.sum(1, keepdim=True)
        learn = Learner(DataLoaders(var_bs(x, y, [16+i for i in range(12)]), var_bs(x, y, [64])), m, loss_func=F.mse_loss)
        c = Uploads(inline=True)
        fit_counted(learn, c, cbs())
        assert len(c.ups)==10 and not any(c.ups), (name, c.ups)
        assert not c.gpu, (name, c.gpu)
        assert [r[2] for r in c.res[True]]==[0 if name.startswith('monitor') else 1]*12, (name, c.res[True])

class Fault(Callback):
    "Make training batch `at` non-finite: one sample of its input (`'input'`), or a gradient (`'grad'`)"
    order = -90
    def __init__(self, at, where): self.at,self.where = at,where
    def before_batch(self):
        if self.where=='input' and self.training and self.iter==self.at:
            x = self.xb[0].clone(); x[3] = float('nan'); self.learn.xb = (x,)
    def after_backward(self):
        if self.where=='grad' and self.iter==self.at: next(self.learn.model.parameters()).grad[0] = float('nan')

@pytest.mark.parametrize('where', ['input', 'grad'])
def test_anomaly_syncs(where):
    "The guard's anomaly paths (blame, skip, rollback): host reads on the faulty batch that do not grow with the model"
    for action in ('skip', 'rollback'):
        at_fault = {}
        for n in (8, 32):
            g,c = ExplosionGuard(action, drop_bad_samples=True, verbose=False),Count(inline=True)
            fit_counted(tiny(n), c, [StopAfter(8), Fault(4, where), g])
            syncs = [r[2] for r in c.res[True]]
            assert [e['iter'] for e in g.events]==[4], g.events
            if where=='input': assert g.bad_samples and len(g.bad_samples)==1, g.bad_samples # blamed: one sample
            assert syncs[:4]==[1]*4 and syncs[5:]==[1]*3, (action, n, syncs) # one read per batch, after it too
            assert not c.gpu, (action, n, c.gpu)
            at_fault[n] = syncs[4]
        # a gradient: the decision read and the weights' check (a callback may have written them); an input: the
        # same two, then at most two replays (one read each) per halving of the batch in the search for the bad
        # sample, log2(64) = 6 halvings
        assert at_fault[8]==at_fault[32], (action, at_fault)
        assert at_fault[8]==2 if where=='grad' else 2<at_fault[8]<=2+2*6, (action, at_fault)

def test_update_batches():
    "Update batches (weight norms, the sampled copy and its steps) with a frozen parameter: no sync, few ops"
    def make():
        learn = tiny(); learn.model[0].bias.requires_grad_(False); return learn
    (b_ops,_,_),_,nout = measure(make, [])
    (ops,calls,syncs),_,_ = measure(make, [ActivationMonitor(update_every=1)], nb=4)
    assert syncs==0, syncs
    assert (ops-b_ops+calls)/nout<=3, (ops-b_ops+calls)/nout

def test_compiled_model():
    "A `torch.compile`d model runs the hooks in its trace: no recompiles batch after batch, and the right statistics"
    from deepstable_fastai.engine import StatsEngine
    from deepstable_fastai.stats import STATS
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8,32), nn.BatchNorm1d(32), nn.ReLU(inplace=True), nn.Linear(32,4))
    net = torch.compile(base); e = StatsEngine(net); e.path = 'staged'
    try:
        for k in range(4):
            x = torch.randn(16,8); e.begin(k); net(x); s = e.stats()
            if k==0: g = du.counters['stats']['unique_graphs']
        assert du.counters['stats']['unique_graphs']==g # batches 2 to 4 compiled nothing new
        with torch.no_grad(): y = base[1](base[0](x))
        m,sd = STATS.index('mean'),STATS.index('std')
        torch.testing.assert_close(s[:2, m], torch.stack([base[0](x).mean(), y.mean()]).detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(s[1, sd], y.std(correction=0).detach(), atol=1e-4, rtol=0) # before the in-place ReLU
    finally: e.remove()
