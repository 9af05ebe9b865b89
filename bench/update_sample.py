"""The monitor's sampled update ratio against the exact one: the error of the sampled step norms per module and
step (xresnet18 on the digits, one epoch, SGD and Adam), and the CPU time of an update batch with and without the
sample (`before_step` + `after_step`, one thread)."""
import statistics, time, warnings
import torch, torch.nn.functional as F
from fastai.vision.all import *
from deepstable_fastai.data import digits_dls
from deepstable_fastai.monitor import ActivationMonitor, _UpdateSample
warnings.filterwarnings('ignore')

def make(opt=Adam):
    set_seed(0)
    return Learner(digits_dls(size=32, bs=64), xresnet18(c_in=1, n_out=10), loss_func=F.cross_entropy, opt_func=opt)

class Compare(Callback):
    "Sampled step norms of every parameter over 16,384 elements against a full copy, every step"
    def __init__(self): self.err = []
    def before_step(self):
        self.ps = list(self.learn.model.parameters())
        self.old = [p.detach().clone() for p in self.ps]; self.s = _UpdateSample(self.ps, 16384); self.s.take()
    def after_step(self):
        with torch.no_grad():
            ex = torch.stack([(o-p).float().norm() for o,p in zip(self.old, self.ps)]); est = self.s.steps()
        big = torch.tensor([p.numel()>16384 for p in self.ps])
        self.err.append((est/ex-1).abs()[big & (ex>0)])

def accuracy_table():
    print('| optimizer | module-steps | median error | 90th percentile | worst |\n|---|---|---|---|---|')
    for opt,lr in ((SGD, 1e-2), (Adam, 1e-3)):
        learn,c = make(opt),Compare()
        with learn.no_bar(), learn.no_logging(): learn.fit(1, lr, cbs=c)
        e = torch.cat(c.err)
        print(f'| {opt.__name__} | {len(e)} | {e.median():.2%} | {e.quantile(.9):.2%} | {e.max():.2%} |')

def cost_table(repeats=3):
    "Own CPU ms of `before_step` + `after_step` per training batch, median over the batches of a fit"
    acc = []
    for n in ('before_step','after_step'):
        f = ActivationMonitor.__dict__[n]
        def w(self, *a, _f=f):
            t = time.process_time(); r = _f(self, *a); acc[-1] += time.process_time()-t; return r
        setattr(ActivationMonitor, n, w)
    class Mark(Callback):
        def before_batch(self): acc.append(0.)
    learn,res = make(),{}
    with learn.no_bar(), learn.no_logging():
        for _ in range(repeats):
            for k in (0, 16384):
                for u in (1, 10**6): # every batch an update batch, or none after the first
                    acc.clear(); learn.fit(1, 1e-3, cbs=[ActivationMonitor(update_every=u, update_sample=k), Mark()])
                    res.setdefault((k,u), []).append(statistics.median(acc[1:])*1e3)
    print('| `update_sample` | every batch an update batch | no update batch | the update itself |\n|---|---|---|---|')
    for k in (0, 16384):
        a,b = (statistics.median(res[(k,u)]) for u in (1, 10**6))
        print(f'| {k} | {a:.1f} ms | {b:.1f} ms | {a-b:.1f} ms |')

if __name__=='__main__':
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    accuracy_table(); print(); cost_table()
