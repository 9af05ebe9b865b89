"""Cost of `ActivationMonitor` vs no callback and fastai's `ActivationStats`: process CPU time per fit (whole epochs,
validation included, or `--batches` training batches), as paired ratios, and the CPU time spent inside each callback's
own hooks and events (every event, per-fit ones included, and the hooks' time in validation, per training batch)."""
import argparse, collections, os, random, statistics, time, warnings
import torch, torch.nn.functional as F
from fastai.vision.all import *
from fastai.callback.hook import ActivationStats
from deepstable_fastai.data import digits_dls, digits_image_dls
from deepstable_fastai.monitor import ActivationMonitor
from deepstable_fastai.stats import kernel_path
from deepstable_fastai.engine import _Hook, StatsEngine, find_modules
warnings.filterwarnings('ignore')

class Limit(Callback):
    "Stop the training phase after `n` batches and skip validation, so an 'epoch' is `n` training batches"
    order = 100
    def __init__(self, n): self.n = n
    def after_batch(self):
        if self.training and self.iter+1>=self.n: raise CancelTrainException
    def before_validate(self): raise CancelValidException

VARIANTS = {
    'no callback': lambda: [],
    'no callback again (noise floor)': lambda: [],
    'fastai ActivationStats()': lambda: [ActivationStats()],
    'fastai ActivationStats(with_hist=True)': lambda: [ActivationStats(with_hist=True)],
    'ActivationMonitor() default': lambda: [ActivationMonitor()],
    'ActivationMonitor(with_hist=True)': lambda: [ActivationMonitor(with_hist=True)],
    'ActivationMonitor(grads=False) activations only': lambda: [ActivationMonitor(grads=False)],
    'ActivationMonitor(update_sample=0) update ratio on every element': lambda: [ActivationMonitor(update_sample=0)],
}

class SelfTime:
    "Process CPU time spent inside the given methods (hooks and callback events), summed over calls"
    def __init__(self, targets): self.targets,self.t,self.n = targets,0.,0
    def __enter__(self):
        self.saved = []
        for cls,name in self.targets:
            f = cls.__dict__[name]; self.saved.append((cls,name,f))
            def w(*a, _f=f, **k):
                t = time.process_time()
                try: return _f(*a, **k)
                finally: self.t += time.process_time()-t
            setattr(cls, name, w)
        return self
    def __exit__(self, *a):
        for cls,name,f in self.saved: setattr(cls, name, f)

def events(cls):
    "`(class, name)` of every event `cls` handles, at the class that defines it (a `super()` call is not counted twice)"
    from fastai.callback.core import _events
    res = []
    for ev in _events:
        c = next((c for c in cls.__mro__ if ev in c.__dict__), None)
        if c is not None and c is not Callback: res.append((c, ev))
    return res

def self_targets(k):
    "The hooks and every event of the variant's callback: per-fit work (hooking, allocating, after_fit) included"
    from fastai.callback.hook import Hook
    if k.startswith('fastai'): return [(Hook,'hook_fn')]+events(ActivationStats)
    if k.startswith('ActivationMonitor'): return [(_Hook,'__call__')]+events(ActivationMonitor)
    return []

def make(model):
    set_seed(0)
    if model=='xresnet18':
        return Learner(digits_dls(size=32, bs=64), xresnet18(c_in=1, n_out=10), loss_func=F.cross_entropy)
    dls = digits_image_dls(size=32, bs=64, num_workers=0)
    return vision_learner(dls, resnet18, pretrained=False, loss_func=F.cross_entropy)

def run(model, batches, repeats):
    learn = make(model)
    lim = [Limit(batches)] if batches else [] # 0: whole epochs, validation included, as a user's fit
    res = {k:[] for k in VARIANTS}
    with learn.no_bar(), learn.no_logging():
        for k,f in VARIANTS.items(): learn.fit(1, 1e-3, cbs=lim+f())   # warm-up, not timed
        for r in range(repeats):
            order = list(VARIANTS); random.Random(r).shuffle(order)
            for k in order:
                cbs = lim+VARIANTS[k]()
                with SelfTime(self_targets(k)) as st:
                    t,w = time.process_time(),time.perf_counter()
                    learn.fit(1, 1e-3, cbs=cbs)
                    res[k].append((time.process_time()-t, time.perf_counter()-w, st.t))
    return res

def table(model, res, batches, repeats, nb):
    "Medians; the CPU ratio is the median of each repeat's ratio to that repeat's no-callback fit (paired)"
    base = res['no callback']
    base_c = statistics.median(x[0] for x in base)
    what = f"{batches} training batches" if batches else f"whole epochs ({nb} training batches and the validation)"
    print(f"\n**{model}**, {what} of 64, median of {repeats} interleaved repeats\n")
    print("| variant | CPU s/fit | x no callback (CPU, paired) | range | own CPU ms/training batch "
          "| own / no-callback CPU |")
    print("|---|---|---|---|---|---|")
    for k,v in res.items():
        c,o = (statistics.median(x[i] for x in v) for i in (0,2))
        r = sorted(x[0]/b[0] for x,b in zip(v, base))
        own = f"{o/nb*1e3:.1f} | {o/base_c*100:.1f}%" if k!='no callback' else "- | -"
        print(f"| {k} | {c:.2f} | {statistics.median(r):.3f}x | {r[0]:.3f}-{r[-1]:.3f} | {own} |")

class Floor(Callback):
    """CPU time per training batch of hooks on the monitor's modules that do nothing (`'none'`), read each output once
    (`'sum'`) or run the engine (`'engine'`); and of reading the gradients once (`torch.sum`) and of their norms"""
    order = 40
    def __init__(self, mode): self.mode,self.t,self.n = mode,collections.Counter(),0
    def before_fit(self):
        m = self.learn.model
        if self.mode=='engine': self.e = StatsEngine(m); return
        f = (lambda o: None) if self.mode=='none' else (lambda o: o.sum())
        def hook(mod, i, o):
            if not self.on: return
            t = time.process_time(); f(o); self.t['hooks'] += time.process_time()-t
        self.on,self.hs = False,[o.register_forward_hook(hook) for _,o in find_modules(m)]
    def before_batch(self):
        if not self.training: return
        self.n += 1
        if self.mode=='engine': self.e.begin(self.iter)
        else: self.on = True
    def before_step(self):
        gs = [p.grad for p in self.learn.model.parameters() if p.grad is not None]
        fs = [('grads: torch.sum of each', lambda: [g.sum() for g in gs]),
              ('grads: _foreach_norm', lambda: torch._foreach_norm(gs))]
        for k,f in (fs if self.n%2 else fs[::-1]): # alternate: the second pass may find the first one's cache
            t = time.process_time(); f(); self.t[k] += time.process_time()-t
    def after_batch(self):
        if self.mode=='engine': self.e.end()
        self.on = False
    def after_fit(self):
        if self.mode=='engine': self.e.remove()
        else: [h.remove() for h in self.hs]

def floor(model, repeats):
    "What a complete monitor cannot go below: hooks that do nothing, one read of each output and of each gradient"
    learn = make(model)
    modes,res,base = ('none','sum','engine'),collections.defaultdict(list),[]
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3); learn.fit(1, 1e-3, cbs=Floor('engine')) # warm-up, not timed
        for r in range(repeats):
            order = ['base',*modes]; random.Random(r).shuffle(order)
            for k in order:
                if k=='base': t = time.process_time(); learn.fit(1, 1e-3); base.append(time.process_time()-t); continue
                cb = Floor(k)
                with SelfTime([(_Hook,'__call__')] if k=='engine' else []) as st: learn.fit(1, 1e-3, cbs=cb)
                res[f"hooks: {dict(none='doing nothing', sum='torch.sum of each output', engine='the engine')[k]}"
                    ].append((st.t if k=='engine' else cb.t['hooks'])/cb.n)
                for g in ('grads: torch.sum of each', 'grads: _foreach_norm'): res[g].append(cb.t[g]/cb.n)
    nb,b = len(learn.dls.train),statistics.median(base)
    print(f"\n**{model}**: CPU time per training batch, median of {repeats} interleaved fits of one epoch; "
          f"share of a no-callback fit ({b:.2f} s, {nb} training batches and the validation)\n")
    print("| part (inside the hook functions, or around the gradient pass) | CPU ms/training batch | share of a fit |")
    print("|---|---|---|")
    for k,v in sorted(res.items(), key=lambda kv: (kv[0][:5], statistics.median(kv[1]))):
        print(f"| {k} | {statistics.median(v)*1e3:.2f} | {statistics.median(v)*nb/b*100:.2f}% |")

if __name__=='__main__':
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--models', default='xresnet18,resnet18')
    p.add_argument('--batches', type=int, default=0, help='training batches per fit; 0: whole epochs with validation')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--floor', action='store_true', help='the floor table: hooks and gradient reads, taken apart')
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 1)))
    wp = os.environ.get('OMP_WAIT_POLICY', '(unset)')
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={wp}, "
          f"statistics path: {kernel_path(wait=True)}")
    print(time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))
    for m in a.models.split(','):
        if a.floor: floor(m, a.repeats); continue
        nb = a.batches or len(make(m).dls.train)
        table(m, run(m, a.batches, a.repeats), a.batches, a.repeats, nb)
