"""GPU benchmark, made to run unattended the day a GPU is lent (under 5 minutes on one GPU).

For xresnet18 and resnet50, bs 64 and 256, fp32 and fastai `MixedPrecision`: median training-step time (CUDA events
from the first `before_batch` to the last callback before fastai's Recorder, `--steps` steps after `--warmup`) for
none / monitor / monitor+hist / guard skip / guard rollback / both / fastai ActivationStats (and, for the first
model, two settings of the statistics engine to choose its defaults by), peak memory, the first fit's time and graphs
compiled; then the host syncs inside this package's hooks and callback events per training batch, counted with
`torch.cuda.set_sync_debug_mode('warn')` switched on around our code only (fastai's own syncs, `MixedPrecision`'s
`GradScaler` for one, are not ours to count), also with a batch size that changes every batch and a frozen first
layer (new layouts and parameters without gradients: tables the engine uploads); then xresnet18 bs 256 given to
`torch.compile` (none / monitor / guard skip: the engine's hooks traced into the model's graph; not with `--quick`),
and the other models and sizes. A variant that fails gets an ERROR
row and the run goes on; the table is rewritten after every row; past `--budget-s` seconds the remaining rows say "skipped (time)".
`python bench/gpu.py --device cpu --quick` runs the same code on the CPU as a smoke test (tests/test_gpu_script.py).
"""
import argparse, gc, statistics, sys, time, traceback, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent)) # the package from this checkout, installed or not
import torch, torch.nn.functional as F
warnings.filterwarnings('ignore')
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.hook import ActivationStats
from fastai.vision.models.xresnet import xresnet18
from fastai.torch_core import set_seed
from torchvision.models import resnet50
import torch._dynamo.utils as du
from deepstable_fastai.monitor import ActivationMonitor
from deepstable_fastai.guard import ExplosionGuard, _GK
from deepstable_fastai.engine import _Hook, OpCounter
from deepstable_fastai.stats import _kernels

class DeviceDL:
    "`n` batches of one fixed random batch already on the device: the loop measures the model and the callbacks only"
    def __init__(self, x, y, n): self.x,self.y,self.n,self.device = x,y,n,x.device
    def __len__(self): return self.n
    def __iter__(self):
        for _ in range(self.n): yield self.x,self.y

class VarDL(DeviceDL):
    "`DeviceDL` with a batch size that changes every batch, as a padded text batch's shape does: new layouts each batch"
    def __iter__(self):
        for i in range(self.n): k = len(self.x)-i%8; yield self.x[:k],self.y[:k]

class DLs:
    def __init__(self, dl):
        self.train,self.valid,self.device,self.loaders = dl,DeviceDL(dl.x[:2], dl.y[:2], 1),dl.device,[dl]
    def __getitem__(self, i): return [self.train, self.valid][i]

class StepStart(Callback):
    "Start timing a training step: a CUDA event on a GPU, the host clock elsewhere"
    order,run_valid = -100,False
    def __init__(self): self.ev,self.t = [],[]
    def before_batch(self):
        if self.x.is_cuda: e = torch.cuda.Event(enable_timing=True); e.record(); self.ev.append([e])
        else: self.t0 = time.perf_counter()
    def times(self):
        if self.ev: torch.cuda.synchronize(); self.t = [p[0].elapsed_time(p[1]) for p in self.ev if len(p)==2]
        return self.t

class StepEnd(Callback):
    "End the step after every callback before fastai's Recorder (order 50): the monitor writes in `after_batch`"
    order,run_valid = 49,False
    def __init__(self, start): self.start = start
    def after_batch(self):
        s = self.start
        if s.ev: e = torch.cuda.Event(enable_timing=True); e.record(); s.ev[-1].append(e)
        else: s.t.append((time.perf_counter()-s.t0)*1e3)

CONFIGS = {'none': lambda: [], 'monitor': lambda: [ActivationMonitor()],
           'monitor+hist': lambda: [ActivationMonitor(with_hist=True)],
           'guard skip': lambda: [ExplosionGuard('skip')], 'guard rollback': lambda: [ExplosionGuard('rollback')],
           'monitor+guard': lambda: [ActivationMonitor(), ExplosionGuard('rollback')],
           'fastai ActivationStats': lambda: [ActivationStats()]}

COMPILED = ('none', 'monitor', 'guard skip') # on a model given to `torch.compile`: one graph, the hooks in it

class EngineSet(Callback):
    "Set attributes of the learner's statistics engine once the monitor has made it"
    order = ActivationMonitor.order+1 # after the monitor's `before_train`
    def __init__(self, **kw): self.kw = kw
    def before_train(self):
        for k,v in self.kw.items(): setattr(self.learn._stats_engine, k, v)

# Engine settings to choose the defaults by, in the first section only: each staged output copied in its hook (as
# before the copies waited for the end of the forward pass), and every output staged (64 MB of buffer, a copy of
# each large output, no `_direct` compiled call per large output)
ENGINE = {'monitor, copies in hooks (defer=False)': lambda: [ActivationMonitor(), EngineSet(defer=False)],
          'monitor, all staged (direct_min=2**24)':
              lambda: [ActivationMonitor(), EngineSet(direct_min=1<<24, stage_rows=1<<14)]}

def learner(arch, bs, size, n, dev, fp16, vary=False):
    "`vary`: the batch size changes every batch and the first layer is frozen (as in `fine_tune`'s first epochs)"
    set_seed(0)
    m = xresnet18(n_out=10) if arch=='xresnet18' else resnet50(num_classes=10)
    if vary: m[0].requires_grad_(False)
    x,y = torch.randn(bs, 3, size, size, device=dev),torch.randint(0, 10, (bs,), device=dev)
    learn = Learner(DLs((VarDL if vary else DeviceDL)(x, y, n)), m.to(dev), loss_func=F.cross_entropy)
    if fp16: learn.add_cb(MixedPrecision())
    return learn

def fresh(dev):
    "Free what earlier variants left (dead learners sit in reference cycles) before measuring memory"
    gc.collect()
    if dev.type=='cuda': torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(); torch.cuda.synchronize()

def compile_errors():
    "Compiled functions that fell back to eager PyTorch so far (their warning is filtered out here)"
    return {k for k,c in list(_kernels.items())+list(_GK.items()) if c.error is not None}

def run(arch, bs, size, fp16, name, dev, warmup, steps, comp=False):
    "`comp`: the model given to `torch.compile` (the engine's hooks are then traced into its graph)"
    fresh(dev)
    learn = learner(arch, bs, size, warmup, dev, fp16)
    if comp: learn.model = torch.compile(learn.model)
    g0,t0 = du.counters['stats']['unique_graphs'],time.perf_counter()
    cbs = {**CONFIGS, **ENGINE}[name]
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cbs()) # warm-up fit: compiles
    if dev.type=='cuda': torch.cuda.synchronize()
    first,graphs = time.perf_counter()-t0,du.counters['stats']['unique_graphs']-g0
    learn.dls.train.n = warmup+steps
    st = StepStart()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[st, StepEnd(st)]+cbs())
    ts = st.times()[warmup:]
    mem = torch.cuda.max_memory_allocated()/2**30 if dev.type=='cuda' else float('nan')
    return statistics.median(ts),first,graphs,mem

class SyncWatch(Callback):
    "Arms `watch`ed functions on training batches after the first two (one-time uploads of index tables are left out)"
    order = -100
    def __init__(self): self.n,self.batches,self.armed,self.depth = 0,0,False,0
    def before_batch(self): self.armed = self.training and self.iter>=2; self.batches += self.armed
    def after_train(self): self.armed = False # once-per-epoch work is not per-batch cost
    def after_fit(self): self.armed = False

def watch(f, w):
    "`f`, counting into `w.n` the host syncs it makes while `w` is armed: CUDA's own count, or `OpCounter`'s on the CPU"
    def g(*a, **k):
        if not w.armed or w.depth: return f(*a, **k) # a hook inside one of our events: the outer call counts
        w.depth += 1
        try: return counted(*a, **k)
        finally: w.depth -= 1
    def counted(*a, **k):
        if not torch.cuda.is_available():
            with OpCounter() as c:
                try: return f(*a, **k)
                finally: w.n += c.syncs+c.gpu_syncs+c.uploads
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter('always'); torch.cuda.set_sync_debug_mode('warn')
            try: return f(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode('default')
                w.n += sum('synchroniz' in str(r.message) for r in rec)
    return g

def sync_count(arch, dev, fp16, name, n=12, vary=False):
    "Host syncs per training batch inside this package's hooks and events (`n` batches: the update-ratio batch 8 too)"
    fresh(dev)
    learn,w = learner(arch, 64, 32, n, dev, fp16, vary),SyncWatch()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=CONFIGS[name]()) # compiles and autotunes, unwatched
    saved = [(c, c.__dict__.get('__call__')) for c in (_Hook, ActivationMonitor, ExplosionGuard)]
    for c,_ in saved: c.__call__ = watch(c.__call__, w) # the class's own, or the `Callback.__call__` it inherits
    try:
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[w]+CONFIGS[name]())
    finally:
        for c,f in saved:
            if f is None: delattr(c, '__call__')
            else: c.__call__ = f
    return f"{w.n/max(w.batches, 1):.2f} per batch ({w.n} in {w.batches} batches)"

def err(e): return f"ERROR {type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"

def groups(a, dev):
    "(arch, bs, fp16) in order of importance: a run cut short keeps the rows that matter most"
    if a.quick: return [('xresnet18', 8, False)]
    precs = [False]+([True] if dev.type=='cuda' else [])
    return [(arch, bs, p) for bs in (64, 256) for arch in ('xresnet18', 'resnet50') for p in precs]

def main(a):
    dev,t_start = torch.device(a.device),time.perf_counter()
    gpu = torch.cuda.get_device_name() if dev.type=='cuda' else 'CPU'
    tf32 = f", cuDNN TF32 {torch.backends.cudnn.allow_tf32}, matmul TF32 {torch.backends.cuda.matmul.allow_tf32}" \
           if dev.type=='cuda' else ''
    now = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    out = [f"# GPU benchmark: {gpu}, torch {torch.__version__}{tf32}, {now}\n",
           f"Median ms per training step ({a.steps} steps after {a.warmup}), x none, the warm-up fit's seconds and the "
           "graphs it compiled, peak GiB.\n",
           '| model | bs | precision | callbacks | ms/step | x none | first fit s (graphs) | peak GiB |',
           '|---|---|---|---|---|---|---|---|']
    def emit(row):
        out.append(row); print(row, flush=True); Path(a.out).write_text('\n'.join(out)+'\n')
    late = lambda: time.perf_counter()-t_start > a.budget_s
    def section(arch, bs, fp16, extra=(), names=CONFIGS, comp=False):
        size = 32 if arch=='xresnet18' else (64 if a.quick else 128)
        prec = 'fp16 (MixedPrecision)' if fp16 else 'fp32'
        head,base = f"| {arch} {size}px{', torch.compile' if comp else ''} | {bs} | {prec} |",None
        for name in [*names, *extra]:
            if late(): emit(f"{head} {name} | skipped (time) | | | |"); continue
            try:
                e0 = compile_errors()
                ms,first,graphs,mem = run(arch, bs, size, fp16, name, dev, a.warmup, a.steps, comp)
                if name=='none': base = ms
                ratio = f"{ms/base:.3f}x" if base else '-'
                errs = sorted(compile_errors()-e0)
                emit(f"{head} {name} | {ms:.2f} | {ratio} | {first:.1f} ({graphs}) | {mem:.2f} |"
                     + (f" eager fallback from here on: {', '.join(errs)}" if errs else ''))
            except Exception as e:
                traceback.print_exc()
                emit(f"{head} {name} | {err(e)} | | | |")
    gs = groups(a, dev)
    section(*gs[0], extra=ENGINE)
    out.extend(['', '| host syncs inside our hooks and events, xresnet18 bs 64 | result |', '|---|---|'])
    for name in ('monitor', 'monitor+hist', 'guard skip', 'monitor+guard'):
        for fp16 in ((False, True) if dev.type=='cuda' else (False,)):
            exp = 1 if 'guard' in name else 0
            what = f"| {'fp16' if fp16 else 'fp32'} {name} (expected: {exp}) |"
            try: emit(f"{what} {'skipped (time)' if late() else sync_count('xresnet18', dev, fp16, name)} |")
            except Exception as e: emit(f"{what} {err(e)} |")
    for name in ('monitor', 'monitor+guard'): # new layouts every batch, parameters without gradients
        exp = 1 if 'guard' in name else 0
        what = f"| fp32 {name}, batch size changing every batch, stem frozen (expected: {exp}) |"
        try: emit(f"{what} {'skipped (time)' if late() else sync_count('xresnet18', dev, False, name, vary=True)} |")
        except Exception as e: emit(f"{what} {err(e)} |")
    hdr = ['', '| model | bs | precision | callbacks | ms/step | x none | first fit s (graphs) | peak GiB |',
           '|---|---|---|---|---|---|---|---|']
    if not a.quick: # compiling xresnet18 takes minutes on a CPU: the smoke test leaves this section out
        out.extend(hdr); section('xresnet18', 256, False, names=COMPILED, comp=True)
    out.extend(hdr)
    for g in gs[1:]: section(*g)
    print(f'\nwritten to {a.out} in {time.perf_counter()-t_start:.0f} s')

if __name__=='__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--device', default='cuda')
    ap.add_argument('--quick', action='store_true', help='one small model, few steps (smoke test)')
    ap.add_argument('--warmup', type=int, default=10)
    ap.add_argument('--steps', type=int, default=50)
    ap.add_argument('--budget-s', type=float, default=270, help='rows not started by then are marked skipped')
    ap.add_argument('--out', default='bench/gpu_results.md')
    a = ap.parse_args()
    if a.device=='cuda' and not torch.cuda.is_available(): sys.exit('no CUDA device: --device cpu runs a smoke test')
    main(a)
