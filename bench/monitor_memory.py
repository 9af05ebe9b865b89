"Memory of `ActivationMonitor` over a long run: stored bytes against the documented cap, and process RSS growth."
import argparse, gc, time, warnings
import torch, torch.nn as nn, torch.nn.functional as F
from fastai.learner import Learner
from fastai.callback.core import Callback, CancelFitException, CancelValidException
from fastai.callback.hook import ActivationStats
from fastai.callback.progress import *
from fastai.torch_core import set_seed
from deepstable_fastai.data import digits_dls
from deepstable_fastai.monitor import ActivationMonitor, MONITOR_STATS
warnings.filterwarnings('ignore')

def rss_mb():
    for l in open('/proc/self/status'):
        if l.startswith('VmRSS'): return int(l.split()[1])/1024

class Count(Callback):
    "Stop the fit after `n` training batches; skip validation"
    def __init__(self, n): self.n = n
    def after_batch(self):
        if self.training and self.train_iter>=self.n: raise CancelFitException
    def before_validate(self): raise CancelValidException

def make(cb):
    set_seed(0)
    m = nn.Sequential(nn.Linear(64,64), nn.ReLU(), nn.Linear(64,64), nn.ReLU(), nn.Linear(64,10))
    return Learner(digits_dls(flat=True, bs=8), m, loss_func=F.cross_entropy, cbs=cb)

def run(cb, n):
    learn = make(cb)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=Count(50))   # warm-up: allocations, kernel
    gc.collect(); r0,t = rss_mb(),time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit(10_000, 1e-3, cbs=Count(n))
    gc.collect()
    return learn, rss_mb()-r0, time.perf_counter()-t

if __name__=='__main__':
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--batches', type=int, default=5000)
    p.add_argument('--cap', type=int, default=1024)
    a = p.parse_args()
    torch.set_num_threads(2)
    print(time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))
    print(f"\n{a.batches} training batches of 8 digits (no validation), MLP 64-64-64-10 (5 hooked modules), CPU\n")
    print("| callback | records kept | stride | stored bytes | documented cap (bytes) | RSS growth (MB) | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name,cb in ((f'ActivationMonitor(cap={a.cap})', ActivationMonitor(cap=a.cap)),
                    (f'ActivationMonitor(cap={a.cap}, with_hist=True)', ActivationMonitor(cap=a.cap, with_hist=True)),
                    ('fastai ActivationStats()', ActivationStats())):
        learn,d,w = run(cb, a.batches)
        if isinstance(cb, ActivationMonitor):
            m = learn.activation_monitor
            capb = a.cap*(len(m.names)*(4*(len(MONITOR_STATS)+1) + cb.with_hist*4*(cb.bins+3)) + 40)
            assert m.nbytes()<=capb, (m.nbytes(), capb)
            print(f"| {name} | {m.k} | {m.stride} | {m.nbytes():,} | {capb:,} | {d:.1f} | {w:.0f} |")
        else:
            print(f"| {name} | {len(learn.activation_stats.stats)} | 1 | unbounded | none | {d:.1f} | {w:.0f} |")
