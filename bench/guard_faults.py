"Fault-injection matrix for `ExplosionGuard` on the digits resnet: each fault at a fixed batch (or a poisoned sample, a regression head in physical units, a diverging lr), against no guard and fastai's `TerminateOnNaNCallback`; `drop_bad_samples` rows: the blamed samples left out of later epochs."
import math, time, warnings
import torch, torch.nn as nn, torch.nn.functional as F
from fastcore.script import call_parse
from fastai.basics import *
from fastai.callback.all import *
from fastai.callback.tracker import TerminateOnNaNCallback
from fastai.layers import ConvLayer, ResBlock, Flatten
from deepstable_fastai.data import digits_dls, digits_tensors, TensorDL, TensorDS
from deepstable_fastai.guard import ExplosionGuard

def resnet_digits(n_out=10, c_in=1):
    "A small fastai-`ResBlock` resnet for the digits"
    return nn.Sequential(ConvLayer(c_in,32), ResBlock(1,32,32), ResBlock(1,32,64,stride=2), ResBlock(1,64,64),
                         nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(64,n_out))

def make_dls(bs=64, size=8, poison=None, scale=1.):
    "The digits; with `poison`, training sample `poison` made NaN (it comes back every epoch); targets x`scale`"
    if poison is None and scale==1: return digits_dls(size=size, bs=bs)
    (xt,yt),(xv,yv) = digits_tensors(size, 0.2, 42, 1, False)
    if poison is not None: xt = xt.clone(); xt[poison] = float('nan')
    if scale!=1: yt,yv = yt.float()*scale,yv.float()*scale
    vocab = [str(i) for i in range(10)]
    return DataLoaders(TensorDL(TensorDS(xt, yt, vocab), bs=bs, shuffle=True, drop_last=True),
                       TensorDL(TensorDS(xv, yv, vocab), bs=bs*2))

TARGET = '2.convpath.0.0'  # the module that emits a NaN / whose gradient goes Inf: a conv in the second ResBlock

def _reg_loss(p, y): return F.mse_loss(p.view(-1), y.float())
def _reg_acc(p, y): return (p.view(-1).round()==y.float()).float().mean()
UNITS = 1e3 # the physical-units head: targets are the digit x 1000 (std ~2,900)
def _units_acc(p, y): return ((p.view(-1)/UNITS).round()==(y.float()/UNITS).round()).float().mean()

class Spike(Callback):
    "A finite loss spike at training batch `at`: the loss and its gradient x1000 (before the guard's `after_loss`)"
    order = 1
    def __init__(self, at): self.at = at
    def after_loss(self):
        if self.training and self.train_iter==self.at: self.learn.loss_grad = self.loss_grad*1e3; self.learn.loss = self.loss*1e3

class Fault(Callback):
    "Inject `kind` at training batch `at` (global `train_iter`)"
    order = 12  # after the guard's decision, so an lr spike is applied by the step
    def __init__(self, kind, at): store_attr(); self.fired = False
    def before_fit(self):
        if self.kind in ('module_nan','grad_inf') and not hasattr(self, 'h'):
            self.h = self.learn.model.get_submodule(TARGET).register_forward_hook(self._hook)
    def _hook(self, m, i, o):
        if not self.training or self.train_iter!=self.at or self.fired: return
        self.fired = True
        if self.kind=='module_nan': o = o.clone(); o.view(-1)[0] = float('nan'); return o
        o.register_hook(lambda g: g*float('inf'))
    def before_batch(self):
        if self.train_iter!=self.at: return
        if self.kind=='nan_input': x = self.xb[0].clone(); x.view(-1)[0] = float('nan'); self.learn.xb = (x,)
        if self.kind=='inf_target': y = self.yb[0].float().clone(); y[0] = float('inf'); self.learn.yb = (y,)
    def before_step(self):
        if self.kind=='lr_spike' and self.train_iter==self.at:
            self.saved = [h['lr'] for h in self.opt.hypers]; self.opt.set_hypers(lr=[l*1e4 for l in self.saved])
    def after_step(self):
        if getattr(self, 'saved', None): self.opt.set_hypers(lr=self.saved); self.saved = None
    def after_fit(self):
        if hasattr(self, 'h'): self.h.remove(); del self.h

class Watch(Callback):
    "Record completed epochs and the batch at which a fit was cancelled"
    order = -20
    def before_fit(self): self.epochs,self.cancel_at = 0,None
    def before_batch(self): self.cur = self.train_iter
    def after_epoch(self): self.epochs += 1
    def after_cancel_fit(self): self.cancel_at = self.cur

FAULTS = ('clean','nan_input','inf_target','lr_spike','module_nan','grad_inf','loss_spike','poison_sample','units','lr100')
EXPECT = dict(nan_input='input', inf_target='loss', module_nan=TARGET, grad_inf=TARGET, loss_spike='loss', poison_sample='input')
AT = ('nan_input','inf_target','lr_spike','module_nan','grad_inf','loss_spike') # faults injected at batch `at`
CONFIGS = {'no guard': lambda: [], 'TerminateOnNaN': lambda: [TerminateOnNaNCallback()],
           'guard warn': lambda: [ExplosionGuard('warn', verbose=False)],
           'guard skip': lambda: [ExplosionGuard('skip', verbose=False)],
           'guard rollback': lambda: [ExplosionGuard('rollback', verbose=False)],
           'guard stop': lambda: [ExplosionGuard('stop', verbose=False)],
           'guard skip, drop_bad_samples': lambda: [ExplosionGuard('skip', drop_bad_samples=True, verbose=False)],
           'guard rollback, drop_bad_samples':
               lambda: [ExplosionGuard('rollback', drop_bad_samples=True, verbose=False)],
           'guard skip, act_every=10': lambda: [ExplosionGuard('skip', act_every=10, verbose=False)],
           'guard rollback, act_every=10': lambda: [ExplosionGuard('rollback', act_every=10, verbose=False)]}

def run(fault, config, epochs=3, at=30, lr=3e-3, size=8, seed=0):
    "Fit with `fault` injected at batch `at` under `config`; a dict of outcomes"
    set_seed(seed, reproducible=True)
    reg,units = fault=='inf_target',fault=='units'
    dls = make_dls(size=size, poison=7 if fault=='poison_sample' else None, scale=UNITS if units else 1.)
    cbs = CONFIGS[config]()+[Fault(fault, at), Watch()]+([Spike(at)] if fault=='loss_spike' else [])
    # lr 100 as in fastai's own tracker test: SGD with momentum (Adam's steps do not grow with the gradient)
    opt = dict(opt_func=partial(SGD, mom=0.9)) if fault=='lr100' else {}
    learn = Learner(dls, resnet_digits(1 if reg or units else 10), loss_func=_reg_loss if reg or units else CrossEntropyLossFlat(),
                    metrics=_units_acc if units else _reg_acc if reg else accuracy, cbs=cbs, **opt)
    if units: # the head starts in the targets' units, as a physical-units model would
        with torch.no_grad(): learn.model[-1].weight.mul_(UNITS); learn.model[-1].bias.fill_(UNITS*4.5)
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit_one_cycle(epochs, 100. if fault=='lr100' else lr)
        done,cancel_at = learn.watch.epochs==epochs,learn.watch.cancel_at
        learn.remove_cbs([c for c in learn.cbs if isinstance(c, TerminateOnNaNCallback)])  # it raises inside validate too
        finite = all(t.isfinite().all() for t in learn.model.state_dict().values() if t.is_floating_point())
        acc = learn.validate()[1]
    g,w = getattr(learn, 'explosion_guard', None),learn.watch
    evs = [e for e in g.events if e['kind'] not in ('vanishing_act',)] if g else []
    at = at if fault in AT else 0 # faults without a batch of their own count from the start of the fit
    det = evs[0]['train_iter']-at if evs else (cancel_at-at if cancel_at is not None else None)
    stop = 'guard' if g is not None and g.stop_reason else 'TerminateOnNaN' if cancel_at is not None else '-'
    return dict(finished=done, finite=finite, acc=float(acc)*100, detect=det, stop=stop,
                layer=evs[0]['layer'] if evs else None, n_events=len(evs), reg='units' if units else reg,
                bad_samples=list(g.bad_samples) if g else None)

@call_parse
def main(epochs:int=10, # Epochs per fit (10: near convergence, as in the false-alarm run)
         at:int=30, # Training batch at which each fault is injected
         threads:int=1, # torch threads (the machine is shared)
         configs:str=None, # Semicolon-separated subset of configurations
         faults:str=None): # Comma-separated subset of faults
    "Print the fault-injection matrix as markdown tables"
    torch.set_num_threads(threads)
    cfgs = configs.split(";") if configs else list(CONFIGS)
    t0 = time.perf_counter()
    clean = {reg: run(f, 'no guard', epochs, at=-1) for reg,f in ((False,'clean'),(True,'inf_target'),('units','units'))}
    print(f"digits resnet, 8x8, fit_one_cycle({epochs}, 3e-3), fault at training batch {at} (epoch {at//22}); "
          f"clean accuracy: classification {clean[False]['acc']:.1f}%, regression head {clean[True]['acc']:.1f}%, "
          f"physical-units head {clean['units']['acc']:.1f}%\n")
    print("| fault | config | finished | stopped by | weights+BN stats finite | acc vs clean (pts) | batches to detection | origin named | events | bad samples |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for f in (faults.split(',') if faults else FAULTS):
        for c in cfgs:
            r = run(f, c, epochs, at)
            d = r['acc']-clean[r['reg']]['acc']
            exp = EXPECT.get(f)
            ok = '-' if exp is None or r['layer'] is None else ('yes' if r['layer'].startswith(exp) else f"no ({r['layer']})")
            det = '-' if r['detect'] is None else r['detect']
            print(f"| {f} | {c} | {'yes' if r['finished'] else 'no'} | {r['stop']} | {'yes' if r['finite'] else 'NO'} | {d:+.1f} | {det} | {ok} | {r['n_events']} | {'-' if not r['bad_samples'] else r['bad_samples']} |", flush=True)
    print(f"\n{time.perf_counter()-t0:.0f} s")
