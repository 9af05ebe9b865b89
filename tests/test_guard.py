"`ExplosionGuard` checks too long for the notebook: the fault matrix, a 10-epoch false-alarm run, export."
import sys, warnings, pickle
from pathlib import Path
import pytest, torch
sys.path.insert(0, str(Path(__file__).parents[1]/'bench'))
from guard_faults import run, resnet_digits, make_dls, EXPECT, FAULTS
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.callback.core import Callback
import fastai.callback.schedule  # fit_one_cycle
from deepstable_fastai.guard import ExplosionGuard

FAULTY = [f for f in FAULTS if f!='clean']

@pytest.mark.parametrize('action', ['skip','rollback'])
@pytest.mark.parametrize('fault', FAULTY)
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
    assert learn.explosion_guard.events[0]['layer'] == 'input of 4'
    assert learn.rng.same
