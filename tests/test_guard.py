"""`ExplosionGuard` checks too long for the notebook: the fault matrix, a 10-epoch false-alarm run, export, every fastai entry point, exceptions in every event, the host-sync budget. The fault, entry-point, exception and
sync tests run on both statistics paths (`kernel` in conftest.py): the C++ op of CPU tensors and, forced, the compiled
path every other device takes, so what a GPU user runs is tested here too."""
import sys, warnings, pickle
from pathlib import Path
import pytest, torch
sys.path.insert(0, str(Path(__file__).parents[1]/'bench'))
from guard_faults import run, resnet_digits, make_dls, EXPECT, FAULTS
from fastai.learner import Learner
from conftest import nan_batch, stop_after
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.callback.core import Callback
import fastai.callback.schedule  # fit_one_cycle
from deepstable_fastai.guard import ExplosionGuard
import fastai.callback.progress # `Learner.no_bar`, `no_logging`

FAULTY = ['nan_input','inf_target','lr_spike','module_nan','grad_inf'] # faults at one batch, with an origin to name

@pytest.mark.parametrize('action', ['skip','rollback'])
@pytest.mark.parametrize('fault', FAULTY)
@pytest.mark.usefixtures('kernel')
def test_fault_caught(fault, action):
    r = run(fault, f'guard {action}', epochs=2, at=30)
    assert r['finished'] and r['finite']
    assert r['detect'] == (1 if fault=='lr_spike' else 0)  # an lr spike shows in the batch after its step
    if fault in EXPECT: assert r['layer'].startswith(EXPECT[fault]), r['layer']

@pytest.mark.parametrize('fault', FAULTY)
def test_warn_ends_finite(fault):
    r = run(fault, 'guard warn', epochs=2, at=30)
    assert r['finite'] and r['detect'] is not None

@pytest.mark.parametrize('fault', FAULTY)
def test_no_guard_baseline_is_damaged(fault):
    "The faults are real: without a guard, each one leaves non-finite weights or a broken model"
    r = run(fault, 'no guard', epochs=2, at=30)
    clean = run('inf_target' if r['reg'] else 'clean', 'no guard', epochs=2, at=-1)
    assert not r['finite'] or r['acc'] < clean['acc']-20

def test_export_after_fit(tmp_path):
    learn = Learner(make_dls(), resnet_digits(), loss_func=CrossEntropyLossFlat(), cbs=ExplosionGuard('rollback'))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=1e-3)
    learn.export(tmp_path/'l.pkl')
    assert (tmp_path/'l.pkl').stat().st_size > 0
    assert sum(len(m._forward_hooks) for m in learn.model.modules()) == 0

@pytest.mark.slow
def test_healthy_resnet_no_false_alarm():
    set_seed(0, reproducible=True)
    learn = Learner(make_dls(), resnet_digits(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=ExplosionGuard())
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(10, 3e-3)
    assert learn.explosion_guard.events == []
    assert learn.validate()[1] > 0.95

@pytest.mark.parametrize('fault', ['nan_input', 'module_nan', 'lr_spike'])
def test_rollback_keeps_accuracy(fault):
    "A one-off fault, rolled back with the defaults, costs at most 1 point of the clean run's accuracy (10 epochs)"
    clean = run('clean', 'no guard', epochs=10, at=-1)
    r = run(fault, 'guard rollback', epochs=10, at=30)
    assert r['finite'] and r['n_events'] == (2 if fault=='lr_spike' else 1) # the spike: the batch dropped, then a snapshot
    assert r['acc'] >= clean['acc'] - 1.0, (r['acc'], clean['acc'])

def test_replay_does_not_shift_rng():
    "Localising a NaN by replaying its batch (through a Dropout) leaves the random stream as it was"
    import torch.nn as nn
    class Boom(nn.Module):
        on = False
        def forward(self, x): return x*float('nan') if self.on else x
    class Arm(Callback):
        def before_batch(self): self.learn.model[3].on = self.training and self.train_iter==3
    class RNG(Callback):
        order = 10.4  # just before the guard's decision
        def before_step(self): self.s = torch.get_rng_state()
        def after_cancel_step(self): self.same = torch.equal(self.s, torch.get_rng_state())
    m = nn.Sequential(nn.Flatten(), nn.Linear(64,50), nn.Dropout(0.5), Boom(), nn.Linear(50,10))
    learn = Learner(make_dls(), m, loss_func=CrossEntropyLossFlat(), cbs=[ExplosionGuard('skip', verbose=False), Arm(), RNG()])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=1e-3)
    assert learn.explosion_guard.events[0]['layer'] == '3'  # the parameter-free module where it was born
    assert learn.rng.same

# ---- every fastai entry point -------------------------------------------------------------------------------
import torch.nn as nn
from fastai.test_utils import synth_learner
from fastai.learner import load_learner
from fastai.callback.mixup import MixUp, CutMix
from fastai.callback.training import GradientAccumulation
from fastai.callback.core import CancelFitException
from deepstable_fastai.data import digits_dls

EVENTS = ['before_fit','before_epoch','before_train','before_batch','after_pred','after_loss','before_backward',
          'after_backward','before_step','after_step','after_batch','after_train','before_validate','after_validate',
          'after_epoch','after_fit']

def hooks(learn): return sum(len(m._forward_hooks)+len(m._forward_pre_hooks) for m in learn.model.modules())
def small(digits=False, **kw):
    "A tiny learner: synthetic regression (`predict` works on its items) or the digits (`export` works)"
    torch.manual_seed(0)
    if not digits: return synth_learner(model=nn.Sequential(nn.Linear(1,8), nn.ReLU(), nn.Linear(8,1)), **kw)
    m = nn.Sequential(nn.Linear(64,16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16,10))
    return Learner(digits_dls(flat=True, bs=64), m, loss_func=CrossEntropyLossFlat(), **kw)

class Raise(Callback):
    "Raise `exc` in event `ev` of a training fit"
    def __init__(self, ev, exc): self.ev,self.exc = ev,exc
    def __getattr__(self, k):
        if k==self.__dict__.get('ev'): return self._raise
        return super().__getattr__(k)
    def _raise(self): raise self.exc('injected')

def _stale(learn, ev, exc):
    "A fit of `learn` that raised `exc` in event `ev`"
    with pytest.raises(exc): learn.fit(1, 1e-2, cbs=Raise(ev, exc))

@pytest.mark.parametrize('exc', [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize('ev', EVENTS)
@pytest.mark.usefixtures('kernel')
def test_exception_in_every_event(ev, exc, tmp_path):
    "After a fit that raised in `ev`, each entry point leaves no hook, and the next fit works"
    stale = 0
    for op in ('predict', 'get_preds', 'fit', 'one_batch'):
        if op=='one_batch' and ev=='before_fit': continue # fastai's `Recorder` never started: it cannot run a batch
        learn = small(digits=op=='export', cbs=ExplosionGuard('rollback', verbose=False))
        with learn.no_bar(), learn.no_logging():
            _stale(learn, ev, exc)
            stale += hooks(learn)>0
            if op=='predict': learn.predict((torch.tensor([0.5]),))
            if op=='one_batch': # run by hand, as fastai's tests do: no hook, no snapshot of the fit that raised meets it
                w = [p.detach().clone() for p in learn.model.parameters()]
                learn.epoch,learn.training,learn.dl,learn.n_iter = 0,True,learn.dls.train,len(learn.dls.train); learn.model.train()
                learn.one_batch(0, learn.dls.train.one_batch())
                assert hooks(learn)==0 and learn.explosion_guard._engine is None
                assert not all(torch.equal(a, b) for a,b in zip(w, learn.model.parameters())) # its step was taken
            if op=='get_preds': learn.get_preds()
            if op=='fit': learn.fit(1, 1e-2); assert len(learn.recorder.losses)==len(learn.dls.train)
            assert hooks(learn)==0, op
            learn.fit(1, 1e-2)
            assert hooks(learn)==0 and learn.explosion_guard._engine is None and learn.explosion_guard.events==[], op
    # a raise after the guard hooked the model (its `before_train` runs after the raiser's) and before its `after_fit`
    # leaves hooks until the next entry point: the test can fail
    if EVENTS.index('before_batch') <= EVENTS.index(ev) < EVENTS.index('after_fit'): assert stale==4, stale

@pytest.mark.parametrize('exc', [RuntimeError, KeyboardInterrupt])
def test_export_after_exception(exc, tmp_path):
    learn = small(digits=True, cbs=ExplosionGuard('rollback', verbose=False))
    with learn.no_bar(), learn.no_logging():
        _stale(learn, 'after_step', exc)
        learn.export(tmp_path/'l.pkl')
        l2 = load_learner(tmp_path/'l.pkl')
        assert l2.explosion_guard._engine is None and l2.explosion_guard.events==[]
        import functools # hooks pickled with the model load inert (no-ops), and go when the next fit hooks the model
        assert all(isinstance(h, functools.partial) for m in l2.model.modules() for h in m._forward_hooks.values())
        l2.fit(1, 1e-2)
    assert hooks(l2)==0 and hooks(learn)>0

@pytest.mark.usefixtures('kernel')
def test_per_call_guard_after_exception():
    "A per-call guard whose fit raised is removed by fastai; it drops its hooks then"
    learn = small()
    with learn.no_bar(), learn.no_logging():
        with pytest.raises(RuntimeError): learn.fit(1, 1e-2, cbs=[ExplosionGuard(verbose=False), Raise('after_step', RuntimeError)])
        assert hooks(learn)==0
        learn.fit(1, 1e-2, cbs=ExplosionGuard(verbose=False))
    assert hooks(learn)==0

def _mlp(): torch.manual_seed(0); return nn.Sequential(nn.Flatten(), nn.Linear(64,50), nn.BatchNorm1d(50), nn.ReLU(), nn.Linear(50,10))

class NaNAt(Callback):
    "A NaN in the input of training batch `at`"
    order = 0
    def __init__(self, at): self.at = at
    def before_batch(self):
        if self.training and self.train_iter==self.at: x = self.xb[0].clone(); x.view(-1)[0] = float('nan'); self.learn.xb = (x,)

def _finite(learn): return all(t.isfinite().all() for t in learn.model.state_dict().values() if t.is_floating_point())

@pytest.mark.parametrize('how', ['per_call', 'fine_tune', 'mixup', 'cutmix', 'accumulate', 'second_guard'])
@pytest.mark.usefixtures('kernel')
def test_entry_points(how):
    "A NaN batch is caught and skipped, no hook is left, the weights end finite, in each way of running a fit"
    dls = digits_dls(flat=how not in ('cutmix',), bs=64)
    m = _mlp() if how!='cutmix' else nn.Sequential(nn.Conv2d(1,8,3,padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8,10))
    g = ExplosionGuard('skip', verbose=False)
    cbs = dict(mixup=[MixUp()], cutmix=[CutMix()], accumulate=[GradientAccumulation(128)]).get(how, [])
    learn = Learner(dls, m, loss_func=CrossEntropyLossFlat(), cbs=[] if how in ('per_call','second_guard') else [g])
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if how=='fine_tune': learn.fine_tune(1, 1e-3, freeze_epochs=1, cbs=NaNAt(5))
        elif how=='second_guard':
            learn.add_cb(ExplosionGuard('warn', verbose=False))
            first = learn.explosion_guard
            learn.fit(1, 1e-3, cbs=[g, NaNAt(5)])
            assert [e['kind'] for e in first.events][:1]==['nonfinite_act']
        else: learn.fit(1, 1e-3, cbs=[*cbs, NaNAt(5)] + ([g] if how=='per_call' else []))
    evs = g.events
    assert evs and evs[0]['kind']=='nonfinite_act' and evs[0]['layer']=='input', evs
    assert evs[0]['train_iter']==(5 if how!='accumulate' else 5), evs  # accumulation: decided at the batch that steps
    assert hooks(learn)==0 and _finite(learn)
    if how in ('per_call','fine_tune','mixup','second_guard'): # blamed: position 0 (under MixUp also its mix partner)
        pos = evs[0]['positions']
        assert 0 in pos and len(pos)<=(2 if how=='mixup' else 1) and len(evs[0]['samples'])==len(pos), evs[0]
    if how=='fine_tune': assert [e['train_iter'] for e in evs]==[5, len(dls.train)+5]  # one run: the unfrozen fit goes on

class LayerDrop(nn.Module):
    "Skips each of its layers at random in training, so the modules' forward order changes nearly every batch"
    def __init__(self, n=8):
        super().__init__(); self.inp,self.ls,self.out = nn.Linear(64,16),nn.ModuleList(nn.Linear(16,16) for _ in range(n)),nn.Linear(16,10)
    def forward(self, x):
        x = self.inp(x.flatten(1))
        for l in self.ls:
            if not self.training or torch.rand(()).item()>0.5: x = x + l(x).relu()
        return self.out(x)

def test_changing_order_bounded():
    "Layer drop: a new forward order almost every batch; the guard's per-order tables stay bounded, its verdicts right"
    class Size(Callback):
        order = 11
        def before_fit(self): self.most = 0
        def after_batch(self): self.most = max(self.most, len(self.learn.explosion_guard._fit.cache))
    set_seed(0)
    learn = Learner(digits_dls(flat=True, bs=8), LayerDrop(), loss_func=CrossEntropyLossFlat(),
                    cbs=[ExplosionGuard('skip', verbose=False), Size()])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=NaNAt(100))
    assert len(learn.dls.train)>=150 and 0<learn.size.most<=64, (len(learn.dls.train), learn.size.most)
    ev = learn.explosion_guard.events
    assert [e['train_iter'] for e in ev]==[100] and ev[0]['layer']=='input', ev

# ---- the host-sync budget -----------------------------------------------------------------------------------
def _syncs(cbs, n_epoch=1, validate=False):
    from deepstable_fastai.engine import OpCounter
    learn = Learner(digits_dls(flat=True, bs=64), _mlp(), loss_func=CrossEntropyLossFlat(), cbs=cbs)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)  # warm up (first-call compiles, allocations)
        with OpCounter() as c:
            if validate: learn.validate()
            else: learn.fit(n_epoch, 1e-3)
    return c.syncs, len(learn.dls.train)

@pytest.mark.usefixtures('kernel')
def test_one_sync_per_training_batch():
    "The guard adds exactly one host sync per training batch (its verdict), plus one per fit (are the weights finite?)"
    base,n = _syncs([])
    with_guard,_ = _syncs([ExplosionGuard('skip', verbose=False)])
    assert with_guard-base == n+1, (with_guard, base, n)
    assert _syncs([ExplosionGuard('skip', verbose=False)], validate=True)[0] == _syncs([], validate=True)[0]

# ---- the faults of the second generation (bench/guard_faults.py) ---------------------------------------------
@pytest.mark.parametrize('action', ['skip','rollback'])
def test_loss_spike_caught(action):
    r = run('loss_spike', f'guard {action}', epochs=2, at=30)
    assert r['finite'] and r['detect']==0 and r['layer']=='loss' and r['n_events']==1, r

def test_units_head_no_false_alarm():
    "A regression head whose outputs are in the thousands trains without an event (the first generation skipped every step)"
    r = run('units', 'guard skip', epochs=2, at=-1)
    assert r['n_events']==0 and r['finite'], r

@pytest.mark.parametrize('action', ['skip','rollback','stop'])
def test_lr100_stopped(action):
    "A run at lr 100 is stopped by the guard with finite weights, whatever the action"
    r = run('lr100', f'guard {action}', epochs=10, at=-1)  # 'skip': 10 skips, an escalated rollback, ..., a stop
    assert r['stop']=='guard' and not r['finished'] and r['finite'], r

# ---- blaming the samples (bench/guard_faults.py `drop_bad_samples` rows) --------------------------------------
@pytest.mark.parametrize('action', ['skip','rollback'])
def test_poisoned_sample_dropped(action):
    "A NaN training sample that comes back every epoch: one event, blamed, left out after; within 1 point of clean"
    clean = run('clean', 'no guard', epochs=10, at=-1)
    r = run('poison_sample', f'guard {action}, drop_bad_samples', epochs=10)
    assert r['finished'] and r['finite'] and r['n_events']==1 and r['bad_samples']==[7], r
    assert r['acc'] >= clean['acc']-1.0, (r['acc'], clean['acc'])

def test_poisoned_sample_without_drop_recurs():
    "Without `drop_bad_samples` the same sample is blamed again in every epoch"
    r = run('poison_sample', 'guard skip', epochs=3)
    assert r['n_events']==3 and r['bad_samples']==[7], r

def test_drop_leaves_user_loader():
    "The wrapped `get_idxs` lives on the training loader during the fit only, and `dl.new()` does not copy it"
    class Look(Callback):
        def before_fit(self): self.seen = []
        def after_epoch(self):
            dl = self.learn.dls.train
            self.seen.append(('get_idxs' in dl.__dict__, 'get_idxs' in dl.new().__dict__, len(list(dl.get_idxs()))))
    dls = make_dls(poison=7)
    n = len(dls.train.get_idxs())
    g = ExplosionGuard('skip', drop_bad_samples=True, verbose=False)
    learn = Learner(dls, _mlp(), loss_func=CrossEntropyLossFlat(), cbs=[g, Look()])
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3)
    assert learn.look.seen==[(True, False, n-1)]*2, learn.look.seen
    assert 'get_idxs' not in dls.train.__dict__ and len(dls.train.get_idxs())==n
    assert learn.explosion_guard.bad_samples==[7] and len(learn.explosion_guard.events)==1

@pytest.mark.usefixtures('kernel')
def test_mixed_precision_norms_with_monitor():
    "Under `MixedPrecision` the monitor reads scaled gradients before the unscale: the guard must not get its norms"
    from fastai.callback.fp16 import MixedPrecision
    from torch.amp import GradScaler
    from deepstable_fastai.monitor import ActivationMonitor
    class CPUMixedPrecision(MixedPrecision):
        def before_fit(self):
            self.autocast,self.learn.scaler,self.scales = torch.autocast('cpu', dtype=torch.float16),GradScaler('cpu'),[]
    class Norms(Callback):
        order = 11 # after the guard
        def before_fit(self): self.res = []
        def before_step(self): self.res.append(self.learn.explosion_guard._fit.gnorm.clone())
    def norms(mon):
        set_seed(0); learn = synth_learner(n_trn=8)
        nc,g = Norms(),ExplosionGuard('warn')
        cbs = [CPUMixedPrecision(), g, nc] + ([ActivationMonitor(every=2)] if mon else [])
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=cbs)
        return torch.stack(nc.res), g.events
    (a,ea),(b,eb) = norms(False),norms(True)
    assert len(a)>=4 and torch.allclose(a, b), (a, b)
    assert [e['kind'] for e in ea]==[e['kind'] for e in eb]

@pytest.mark.usefixtures('kernel')
def test_stop_keeps_monitor_record():
    "'stop' cancels the fit inside the bad batch, before its `after_batch`: the monitor still records that batch"
    from deepstable_fastai.monitor import ActivationMonitor
    set_seed(0)
    learn = Learner(digits_dls(flat=True, bs=64), _mlp(), loss_func=CrossEntropyLossFlat(),
                    cbs=[ActivationMonitor(), ExplosionGuard('stop', verbose=False), nan_batch(3)])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    m = learn.activation_monitor
    assert m.steps.tolist()==[0, 1, 2, 3], m.steps
    assert (m.values('nan')[-1]>0).all() and (m.values('nan')[:-1]==0).all()
    assert learn.explosion_guard.events[-1]['action']=='stop'

def test_compiled_thresholds_follow_settings():
    "The compiled forward checks report the threshold set now, not the one of their first compile"
    from deepstable_fastai.guard import _GK, _fwd_math
    from deepstable_fastai.stats import STATS
    s = torch.zeros(3, len(STATS)+1)
    s[:,STATS.index('std')] = torch.tensor([0.5, float('inf'), 1.])
    s[:,STATS.index('absmax')] = torch.tensor([1., 1e20, 2.])
    s[:,STATS.index('zero')] = torch.tensor([0., 0., 0.99])
    o,act,vcnt,athr = torch.arange(3),torch.tensor([False, False, True]),torch.zeros(3),torch.full((3,), float('inf'))
    for std_max,dead_max in ((1e6, 0.95), (1e30, 0.5), (7., 0.9)):
        a = (s, o, act, vcnt, athr, torch.rand(8), torch.tensor(float('inf')), std_max, 1e8, 0.05, dead_max, 1, False)
        want,got = _fwd_math(*a)[0],_GK['fwd'](*a)[0]
        assert torch.allclose(got[2:4], want[2:4], equal_nan=True), (std_max, dead_max, got, want)
        assert got[2,4]==torch.tensor(std_max).float() and got[3,4]==torch.tensor(dead_max).float(), got

def test_replays_compile_nothing():
    "The guard's replays of bad batches run a compiled model eagerly: no recompile for no-grad or sub-batch passes"
    from torch._dynamo.utils import counters
    import torch.nn.functional as F
    def run(nans):
        torch._dynamo.reset(); counters.clear(); set_seed(0)
        m = nn.Sequential(nn.Linear(64,32), nn.ReLU(), nn.Linear(32,10))
        learn = Learner(digits_dls(flat=True, bs=32), torch.compile(m), loss_func=F.cross_entropy,
                        cbs=[ExplosionGuard('skip', verbose=False)]+[nan_batch(i) for i in nans])
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=stop_after(6))
        return dict(counters['stats']),dict(counters['frames']),learn.explosion_guard.events
    a,b = run([]),run([2, 4])
    assert len(b[2])==2 and all(e['layer']=='input' and 'samples' in e for e in b[2]), b[2] # replayed, then blamed
    assert b[0]['unique_graphs']==a[0]['unique_graphs'] and b[1]==a[1], (a[:2], b[:2])
