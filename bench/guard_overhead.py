"Overhead of `ExplosionGuard` per training epoch: process CPU time and wall time vs no callback, medians of interleaved repeats of multi-epoch fits."
import os, sys, time, warnings, statistics
import torch
from fastcore.script import call_parse
from fastai.basics import *
from fastai.callback.all import *
from fastai.vision.models.xresnet import xresnet18
from deepstable_fastai.guard import ExplosionGuard
from deepstable_fastai.engine import StatsEngine
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from guard_faults import resnet_digits, make_dls

class _EngineOnly(Callback):
    "The shared stats engine's hooks on training batches, as the guard sets them up, and nothing else"
    order,run_valid = 10.5,False
    def before_train(self):
        if getattr(self, '_e', None) is None: self._e = StatsEngine.acquire(self.learn, self)
    def before_batch(self): self._e.begin((self.epoch, self.iter, True, id(self.xb)))
    def after_loss(self): self._e.stats(); self._e.end()
    def after_fit(self):
        if getattr(self, '_e', None) is not None: self._e.release(self.learn, self); self._e = None

class ShortEpoch(Callback):
    "Stop the training phase after `n` batches (validation still runs)"
    def __init__(self, n): self.n = n
    def after_batch(self):
        if self.training and self.iter+1>=self.n: raise CancelTrainException()

CONFIGS = {
    'none': lambda: [],
    'engine hooks only': lambda: [_EngineOnly()],
    'none (again: the noise floor)': lambda: [],
    "guard 'warn'": lambda: [ExplosionGuard('warn', verbose=False)],
    "guard 'skip'": lambda: [ExplosionGuard('skip', verbose=False)],
    "guard 'rollback' (default: snapshot every 10 steps)": lambda: [ExplosionGuard('rollback', verbose=False)],
    "guard 'rollback' (snapshot_every=1)": lambda: [ExplosionGuard('rollback', snapshot_every=1, verbose=False)],
    "guard 'skip', act_every=10": lambda: [ExplosionGuard('skip', act_every=10, verbose=False)],
}

_EVENTS = ('before_fit','before_train','before_batch','after_loss','before_step','after_step','after_cancel_step','after_train','after_fit')

_PER_FIT = ('before_fit','before_train','after_train','after_fit')

def timed(guard):
    "`guard` with the CPU time of its events added up: per batch in `guard.cpu`, per fit in `guard.fit_cpu` (seconds)"
    guard.cpu = guard.fit_cpu = 0.
    for n in _EVENTS:
        f,k = getattr(guard, n),('fit_cpu' if n in _PER_FIT else 'cpu')
        def g(f=f, k=k):
            t = time.process_time()
            try: return f()
            finally: setattr(guard, k, getattr(guard, k)+time.process_time()-t)
        setattr(guard, n, g)
    return guard

def inside(model='xresnet18', size=32, bs=64, repeats=3, epochs=1):
    "CPU time inside the guard's events: per training batch (against a fit's CPU time per batch without it) and per fit"
    dls = make_dls(bs=bs, size=size)
    print(f"{model}, {size}x{size}, bs {bs}, fit({epochs}) of {len(dls.train)} train batches an epoch, median of "
          f"{repeats} interleaved repeats\n")
    print("| config | guard CPU ms/batch (per-batch events) | fit CPU ms/batch without guard | share | "
          "guard CPU ms/fit (per-fit events) | all events, share of this fit |\n|---|---|---|---|---|---|")
    for a in ('skip','rollback'):
        torch.manual_seed(0)
        m = resnet_digits() if model=='resnet_digits' else xresnet18(c_in=1, n_out=10)
        g = timed(ExplosionGuard(a, verbose=False))
        learn = Learner(dls, m, loss_func=CrossEntropyLossFlat(), cbs=g)
        with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=1e-3)  # warm-up
        gs,fs,ts = [],[],[]
        for r in range(repeats):
            learn.remove_cb(g)
            t = time.process_time()
            with learn.no_bar(), learn.no_logging(): learn.fit(epochs, lr=1e-3)
            ts.append(time.process_time()-t); learn.add_cb(g); g.cpu = g.fit_cpu = 0.
            with learn.no_bar(), learn.no_logging(): learn.fit(epochs, lr=1e-3)
            gs.append(g.cpu); fs.append(g.fit_cpu)
        n = len(dls.train)*epochs
        gm,fm,tm = statistics.median(gs)/n*1e3,statistics.median(fs)*1e3,statistics.median(ts)/n*1e3
        print(f"| guard '{a}' | {gm:.2f} | {tm:.1f} | {gm/tm*100:.2f}% | {fm:.0f} | {(gm+fm/n)/tm*100:.2f}% |")

@call_parse
def main(repeats:int=5, # Interleaved repeats per configuration
         epochs:int=2, # Epochs per timed fit (the per-fit costs, a first snapshot and a final check, are spread over them)
         bs:int=64, # Batch size
         size:int=32, # Image size; 8 is the fault matrix's
         threads:int=1, # torch threads (the machine is shared)
         model:str='xresnet18', # 'xresnet18' (the monitor bench's) or 'resnet_digits' (the fault matrix's small resnet)
         batches:int=0, # Train batches per epoch (0: all)
         configs:str=None, # Semicolon-separated subset of configurations ('none' is always run)
         inside_only:bool=False, # Only time the guard's own events per batch (robust on a shared machine)
         inside_epochs:int=1, # Epochs per fit for `inside_only` (its per-fit costs are spread over them)
         kernel:str=None): # Set `DEEPSTABLE_KERNEL` ('compiled': the device path, forced on the CPU); None: as it is
    "Print a markdown table of per-epoch cost relative to no callback"
    torch.set_num_threads(threads); warnings.simplefilter('ignore')
    if kernel: os.environ['DEEPSTABLE_KERNEL'] = kernel
    print(f"statistics path: {os.environ.get('DEEPSTABLE_KERNEL', 'auto')}")
    if inside_only: return inside(model, size, bs, repeats, inside_epochs)
    dls = make_dls(bs=bs, size=size)
    learns,cfgs = {},['none']+[c for c in (configs.split(';') if configs else CONFIGS) if c!='none']
    for k in cfgs:
        f = CONFIGS[k]
        torch.manual_seed(0)
        m = resnet_digits() if model=='resnet_digits' else xresnet18(c_in=1, n_out=10)
        learns[k] = Learner(dls, m, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=f())
        with learns[k].no_bar(), learns[k].no_logging(): learns[k].fit(1, lr=1e-3)  # warm-up
    res = {k:([],[]) for k in cfgs}
    for r in range(repeats):
        for k,learn in learns.items():
            t,w = time.process_time(),time.perf_counter()
            with learn.no_bar(), learn.no_logging(): learn.fit(epochs, lr=1e-3, cbs=[ShortEpoch(batches)] if batches else None)
            res[k][0].append((time.process_time()-t)/epochs); res[k][1].append((time.perf_counter()-w)/epochs)
    n = batches or len(dls.train)
    cp,wp = statistics.median(res['none'][0]),statistics.median(res['none'][1])
    print(f"{model}, {size}x{size}, bs {bs}, {n} train batches + validation per epoch, fit({epochs}) per repeat, "
          f"torch threads {threads}, median of {repeats} interleaved repeats\n")
    print("| config | CPU s/epoch | CPU ratio | wall s/epoch | wall ratio |\n|---|---|---|---|---|")
    for k,(c,w) in res.items():
        c,w = statistics.median(c),statistics.median(w)
        print(f"| {k} | {c:.3f} | {c/cp:.3f}x | {w:.3f} | {w/wp:.3f}x |")
