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
