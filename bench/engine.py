"""What the statistics engine costs the host, on the path a GPU runs, measured on the CPU.

Tables (markdown):
1. kernels: ns per element and host us per call of the CPU C++ op, the compiled device path and eager PyTorch;
2. budgets: per training batch, dispatched aten ops per hooked output, compiled-kernel calls, host syncs, and compiles
   per fit, for monitor / monitor+hist / guard / both / fastai ActivationStats, on xresnet18 and resnet18
   (vision_learner), with the device path forced (DEEPSTABLE_KERNEL=compiled);
3. host time per hooked module and recorded batch on a tiny 65-module Linear/ReLU model: CPU time of a fit with the
   monitor minus without, per batch and module, on both paths (interleaved repeats, medians);
4. (`--defer`) the same on the device path, the staged outputs copied in their hooks (the engine's `defer=False`)
   against at the end of the forward pass (the default), in one process, interleaved, with the paired difference;
5. (`--uploads`) arrays made from host data per training batch on the device path (on a GPU each is a copy the host
   waits for), with a batch size that changes every batch and with a frozen body, where the engine's tables change;
6. (`--compiled`) a model given to `torch.compile`: dynamo frames, graphs, graph breaks and inductor kernels, the
   first batch's seconds (compiling) and the later batches' milliseconds, without callbacks, with the monitor (and
   histograms), the guard, and the guard replaying two bad batches;
7. (`--loops`) the same model with the monitor and the guard in its callbacks through `lr_find`, then fit, `get_preds`
   and `validate` three times: each loop's seconds, the graphs it compiled, and whether it reset torch's compile caches.
Run: OMP_NUM_THREADS=1 python bench/engine.py [--quick] [--defer] [--uploads] [--compiled] [--loops]
"""
import argparse, os, statistics, time, warnings
import torch, torch.nn as nn, torch.nn.functional as F
warnings.filterwarnings('ignore')
torch.set_num_threads(1)
from fastai.basics import *
from fastai.callback.hook import ActivationStats
from fastai.vision.models.xresnet import xresnet18
from fastai.test_utils import synth_learner
import torch._dynamo.utils as du
from torch.utils.data import DataLoader, TensorDataset
from deepstable_fastai.data import digits_dls, digits_image_dls
from deepstable_fastai.monitor import ActivationMonitor
from deepstable_fastai.guard import ExplosionGuard
from deepstable_fastai.stats import kernel_path, tensor_stats, _kernels
from deepstable_fastai.engine import OpCounter
import fastai.callback.progress # `Learner.no_bar`, `no_logging`

def med(f, n=21):
    ts = []
    for _ in range(n): t = time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return statistics.median(ts)

def kernels_table():
    kernel_path(wait=True)
    rows = []
    for n in (640, 1<<16, 1<<20, 12_600_000):
        x = torch.randn(n)*3+1
        raw = torch.zeros(2, 8, dtype=torch.float64); i = torch.tensor(1)
        r = [f'{n:,}']
        for f in (lambda: torch.ops.deepstable.acc_(x, raw, 1, 1e-2), lambda: _kernels['direct'](x, i, raw, 1e-2),
                  lambda: tensor_stats(x)):
            f(); t = med(f, 5 if n>1e6 else 21)
            r.append(f'{t*1e9/n:.3f} ns/el ({t*1e6:.0f} us)')
        rows.append(r)
    print('| elements | C++ op (CPU path) | torch.compile (device path) | eager tensor_stats |\n|---|---|---|---|')
    for r in rows: print('| '+' | '.join(r)+' |')

class Count(Callback):
    "Count ops, compiled calls, syncs and GPU-only syncs of training batches, from before_batch to `CountEnd`"
    order = -100
    def __init__(self): self.res = []
    def before_batch(self):
        if self.training: self.c = OpCounter().__enter__()
    def end(self):
        c = self.c; c.__exit__(None, None, None); self.res.append((c.ops, c.calls, c.syncs, c.gpu_syncs, c.uploads))

class CountEnd(Callback):
    "Close `Count`'s window after every callback before fastai's Recorder (order 50): our after_batch is counted"
    order = 49
    def __init__(self, c): self.c = c
    def after_batch(self):
        if self.training: self.c.end()

def make(model, bs=64):
    set_seed(0)
    if model=='xresnet18': return Learner(digits_dls(size=32, bs=bs), xresnet18(c_in=1, n_out=10), loss_func=F.cross_entropy)
    from fastai.vision.learner import vision_learner
    from torchvision.models import resnet18
    return vision_learner(digits_image_dls(size=32, bs=bs, num_workers=0), resnet18, pretrained=False, loss_func=F.cross_entropy)

CONFIGS = {'none': lambda: [], 'monitor': lambda: [ActivationMonitor()],
           'monitor+hist': lambda: [ActivationMonitor(with_hist=True)], 'guard (skip)': lambda: [ExplosionGuard('skip')],
           'monitor+guard': lambda: [ActivationMonitor(), ExplosionGuard('skip')],
           'fastai ActivationStats': lambda: [ActivationStats()]}

def n_outputs(learn):
    from deepstable_fastai.engine import find_modules
    return len(find_modules(learn.model))

def budgets_table(models, nb):
    os.environ['DEEPSTABLE_KERNEL'] = 'compiled'
    print('| model | callbacks | aten ops added / batch | compiled calls / batch | (ops + calls) per hooked output '
          '| host syncs / batch | GPU-only syncs / batch | compiles 1st fit / 2nd fit |')
    print('|---|---|---|---|---|---|---|---|')
    for model in models:
        base = None
        for name,cbs in CONFIGS.items():
            learn = make(model); c = Count(); learn.add_cbs([c, CountEnd(c)])
            stop = [CancelAfter(nb)]
            g0 = du.counters['stats']['unique_graphs']
            with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=stop+cbs())
            g1 = du.counters['stats']['unique_graphs']
            c.res = []
            with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=stop+cbs())
            g2 = du.counters['stats']['unique_graphs']
            ops,calls,syncs,gs = (statistics.median(r[j] for r in c.res[1:]) for j in range(4))
            if base is None: base = ops
            nout = n_outputs(learn)
            print(f'| {model} | {name} | {ops-base:.0f} | {calls:.0f} | {(ops-base+calls)/nout:.2f} ({nout} outputs) '
                  f'| {syncs:.0f} | {gs:.0f} '
                  f'| {g1-g0} / {g2-g1} |')
    del os.environ['DEEPSTABLE_KERNEL']

class CancelAfter(Callback):
    order = 99
    def __init__(self, n): self.n = n
    def after_batch(self):
        if self.training and self.iter+1>=self.n: raise CancelTrainException
    def before_validate(self): raise CancelValidException

def tiny_learner():
    set_seed(0)
    m = nn.Sequential(*[o for _ in range(32) for o in (nn.Linear(8,8), nn.ReLU())], nn.Linear(8,1))
    x = torch.randn(64*32, 8); y = x.sum(1, keepdim=True)
    dls = DataLoaders.from_dsets(list(zip(x,y)), list(zip(x[:64],y[:64])), bs=64, num_workers=0)
    return Learner(dls, m, loss_func=F.mse_loss)

def host_table(repeats, epochs=4):
    "CPU time per batch and hooked module added by the monitor on the tiny model, per path"
    res = {}
    for path in ('compiled', 'auto'):
        os.environ['DEEPSTABLE_KERNEL'] = path
        learns = {k:tiny_learner() for k in ('none', 'monitor')}
        for k,l in learns.items(): # warm-up fit: compiles, first allocations
            with l.no_bar(), l.no_logging(): l.fit(1, 1e-3, cbs=[ActivationMonitor()] if k=='monitor' else [])
        ts = {k:[] for k in learns}
        for _ in range(repeats):
            for k,l in learns.items():
                t = time.process_time()
                with l.no_bar(), l.no_logging(): l.fit(epochs, 1e-3, cbs=[ActivationMonitor()] if k=='monitor' else [])
                ts[k].append(time.process_time()-t)
        nb = epochs*len(learns['none'].dls.train)
        nm = 65
        d = [(m-n)/nb/nm*1e6 for m,n in zip(ts['monitor'], ts['none'])]
        res[path] = (statistics.median(ts['none'])/nb*1e3, statistics.median(d), min(d), max(d))
    del os.environ['DEEPSTABLE_KERNEL']
    print('| path | fit CPU ms/batch without | monitor host us per module and batch (median, min-max) |\n|---|---|---|')
    for p,(b,m,lo,hi) in res.items():
        print(f"| {'device path (forced on CPU)' if p=='compiled' else 'CPU path (C++ op)'} | {b:.2f} | {m:.1f} ({lo:.1f}-{hi:.1f}) |")

def var_bs(x, y, sizes):
    "A loader of `x`, `y` whose batch size changes every batch (new shapes each batch, as padded text batches have)"
    c = [sum(sizes[:i]) for i in range(len(sizes)+1)]
    return DataLoader(TensorDataset(x, y), batch_sampler=[range(a, b) for a,b in zip(c, c[1:])])

def _scenario(k):
    if k=='xresnet18, fixed batch size': return make('xresnet18')
    if k=='xresnet18, batch size changing every batch (64, 63, ..., 57)':
        learn = make('xresnet18'); bs = [b for _,b in zip(range(12), learn.dls.train)]
        x,y = torch.cat([b[0] for b in bs]),torch.cat([b[1] for b in bs])
        learn.dls = DataLoaders(var_bs(x, y, [64-i%8 for i in range(12)]), var_bs(x, y, [64])); return learn
    learn = make('resnet18'); learn.freeze(); return learn # `fine_tune`'s first epoch: the body has no gradients

def uploads_table(nb=12):
    "Arrays made from host data per training batch (on a GPU, host-to-device copies the host waits for), device path"
    os.environ['DEEPSTABLE_KERNEL'] = 'compiled'
    print('| model and loader | callbacks | arrays uploaded / batch | host syncs / batch |\n|---|---|---|---|')
    for k in ('xresnet18, fixed batch size', 'xresnet18, batch size changing every batch (64, 63, ..., 57)',
              'vision_learner(resnet18) frozen, as in fine_tune\'s first epoch'):
        for name,cbs in CONFIGS.items():
            if name in ('none', 'fastai ActivationStats'): continue
            learn = _scenario(k); c = Count(); learn.add_cbs([c, CountEnd(c)])
            with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[CancelAfter(nb)]+cbs())
            up = [r[4] for r in c.res[2:]]; sy = [r[2] for r in c.res[2:]] # from the third batch: past the first layouts
            print(f'| {k} | {name} | {statistics.mean(up):.2f} | {statistics.mean(sy):.2f} |')
    del os.environ['DEEPSTABLE_KERNEL']

class _NoDefer(Callback):
    "Copy every staged output in its hook: the engine's behaviour before the copies waited for the forward's end"
    order = ActivationMonitor.order+1 # after the monitor's `before_train` has made the engine
    def before_train(self): self.learn._stats_engine.defer = False

def defer_table(repeats, epochs=4):
    "Host us per module and batch on the tiny model, device path, outputs copied in the hook or at the forward's end"
    os.environ['DEEPSTABLE_KERNEL'] = 'compiled'
    cbs = dict(none=lambda: [], hook=lambda: [ActivationMonitor(), _NoDefer()], end=lambda: [ActivationMonitor()])
    learns = {k:tiny_learner() for k in cbs}
    for k,l in learns.items():
        with l.no_bar(), l.no_logging(): l.fit(1, 1e-3, cbs=cbs[k]())
    ts = {k:[] for k in learns}
    for _ in range(repeats):
        for k,l in learns.items():
            t = time.process_time()
            with l.no_bar(), l.no_logging(): l.fit(epochs, 1e-3, cbs=cbs[k]())
            ts[k].append(time.process_time()-t)
    del os.environ['DEEPSTABLE_KERNEL']
    nb = epochs*len(learns['none'].dls.train)
    per = {k:[(m-n)/nb/65*1e6 for m,n in zip(ts[k], ts['none'])] for k in ('hook','end')}
    d = [a-b for a,b in zip(per['hook'], per['end'])]
    print(f"No-callback fit: {statistics.median(ts['none'])/nb*1e3:.2f} ms/batch\n")
    print('| staged outputs copied | monitor host us per module and batch (median, min-max) |\n|---|---|')
    for k,v in per.items(): print(f"| {'in each hook' if k=='hook' else 'at the end of the forward pass (default)'} | "
                                  f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f}) |")
    print(f"\nPaired (in the hook - at the end): median {statistics.median(d):.1f} us, "
          f"{sum(x>0 for x in d)} of {len(d)} repeats cheaper at the end")

class NaNAt(Callback):
    "All-NaN inputs in training batches `its`"
    order = -20
    def __init__(self, its): self.its = its
    def before_batch(self):
        if self.training and self.train_iter in self.its: self.learn.xb = (self.xb[0].clone().fill_(float('nan')),)

class Steps(Callback):
    "Wall seconds of each training batch, `before_batch` to `after_batch`"
    order = 98
    def before_fit(self): self.t = []
    def before_batch(self): self.t0 = time.perf_counter()
    def after_batch(self):
        if self.training: self.t.append(time.perf_counter()-self.t0)

def compiled_table(nb=10):
    "Frames, graphs and graph breaks dynamo makes of a compiled xresnet18 in a fit of `nb` batches, and its seconds"
    from torch._dynamo.utils import counters
    import torch._inductor.config as ic, torch._inductor.metrics as im
    ic.fx_graph_cache = False # each row compiles from scratch, not from the graphs of the rows before it
    cfgs = {'none': [], 'monitor': [ActivationMonitor()], 'monitor (with_hist)': [ActivationMonitor(with_hist=True)],
            "guard ('skip')": [ExplosionGuard('skip', verbose=False)],
            "guard ('skip'), 2 all-NaN batches": [ExplosionGuard('skip', verbose=False), NaNAt((3, 6))]}
    print('| callbacks | dynamo frames | graphs | graph breaks | inductor kernels | first batch s (compiling) '
          '| later batches ms (median) | guard events |\n|---|---|---|---|---|---|---|---|')
    for k,cbs in cfgs.items():
        torch._dynamo.reset(); counters.clear(); im.reset()
        learn = make('xresnet18'); learn.model = torch.compile(learn.model); st = Steps()
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cbs+[st, CancelAfter(nb)])
        ev = [c.events for c in cbs if isinstance(c, ExplosionGuard)]
        print(f"| {k} | {counters['frames']['total']} | {counters['stats']['unique_graphs']} | "
              f"{sum(counters['graph_break'].values())} | {im.generated_kernel_count} | {st.t[0]:.1f} | "
              f"{statistics.median(st.t[2:])*1e3:.0f} | "
              f"{len(ev[0]) if ev else '-'} |", flush=True)

def loops_table(cycles=3, nb=2):
    "Seconds, new graphs and resets of each fastai loop of a compiled xresnet18 with the monitor and guard in `cbs`"
    from torch._dynamo.utils import counters
    import torch._inductor.config as ic
    from fastai.callback.schedule import Learner # `lr_find`
    ic.fx_graph_cache = False
    torch._dynamo.reset(); counters.clear()
    learn = make('xresnet18'); learn.model = torch.compile(learn.model)
    learn.add_cbs([ActivationMonitor(), ExplosionGuard('skip', verbose=False)])
    steps = [('lr_find', lambda: learn.lr_find(num_it=nb, show_plot=False, suggest_funcs=()))]
    steps += [('fit', lambda: learn.fit(1, 1e-3, cbs=CancelAfter(nb))), ('get_preds', learn.get_preds),
              ('validate', learn.validate)]*cycles
    print('| loop | seconds | graphs compiled | compile caches reset |\n|---|---|---|---|')
    for k,f in steps:
        n,t = counters['stats']['unique_graphs'],time.perf_counter()
        with warnings.catch_warnings(record=True) as ws, learn.no_bar(), learn.no_logging():
            warnings.simplefilter('always'); f()
        r = any('compiles again' in str(w.message) for w in ws)
        print(f"| {k} | {time.perf_counter()-t:.1f} | {counters['stats']['unique_graphs']-n} | {'yes' if r else 'no'} |",
              flush=True)

if __name__=='__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--defer', action='store_true', help='only the table of the deferred copies')
    ap.add_argument('--uploads', action='store_true', help='only the table of arrays uploaded from the host')
    ap.add_argument('--compiled', action='store_true', help='only the table of a compiled model')
    ap.add_argument('--loops', action='store_true', help='only the table of fastai loops around fits of a compiled model')
    a = ap.parse_args()
    if a.loops:
        print(f"torch {torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
        loops_table(); raise SystemExit
    if a.compiled:
        print(f"torch {torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
        compiled_table(); raise SystemExit
    if a.uploads:
        print(f"torch {torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
        uploads_table(); raise SystemExit
    if a.defer:
        print(f"torch {torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
        defer_table(11); raise SystemExit
    print(f"torch {torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print('## Kernels\n'); kernels_table()
    print('\n## Host cost per module (tiny 65-module model)\n'); host_table(3 if a.quick else 7)
    print('\n## Budgets per training batch (device path forced)\n'); budgets_table(['xresnet18'] if a.quick else ['xresnet18', 'resnet18'], 4)
