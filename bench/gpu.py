"""GPU benchmark, made to run unattended the day a GPU is lent (under 5 minutes on one GPU).

For xresnet18 and resnet50, bs 64 and 256, fp32 and fastai `MixedPrecision`: median training-step time (CUDA events,
`--steps` steps after `--warmup`) for none / monitor / monitor+hist / guard skip / guard rollback / both / fastai
ActivationStats, peak memory, the first fit's compile time; then the monitor and the guard under
`torch.cuda.set_sync_debug_mode('error')` (any host sync in a training batch raises). Prints a markdown table and
writes it to `--out`.
`python bench/gpu.py --device cpu --quick` runs the same code on the CPU as a smoke test (tests/test_gpu_script.py).
"""
import argparse, statistics, sys, time, warnings
from pathlib import Path
import torch, torch.nn as nn, torch.nn.functional as F
warnings.filterwarnings('ignore')
from fastai.learner import Learner
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.hook import ActivationStats
from fastai.vision.models.xresnet import xresnet18
from fastai.torch_core import set_seed
from torchvision.models import resnet50
import torch._dynamo.utils as du
from deepstable_fastai.monitor import ActivationMonitor
from deepstable_fastai.guard import ExplosionGuard

class DeviceDL:
    "`n` batches of one fixed random batch already on the device: the loop measures the model and the callbacks only"
    def __init__(self, x, y, n): self.x,self.y,self.n,self.device = x,y,n,x.device
    def __len__(self): return self.n
    def __iter__(self):
        for _ in range(self.n): yield self.x,self.y

class DLs:
    def __init__(self, dl): self.train,self.valid,self.device,self.loaders = dl,DeviceDL(dl.x[:2], dl.y[:2], 1),dl.device,[dl]
    def __getitem__(self, i): return [self.train, self.valid][i]

class StepTimer(Callback):
    "Time each training step from `before_batch` to `after_batch`: CUDA events on a GPU, the host clock elsewhere"
    order = -100
    def __init__(self, sync_check=False): self.t,self.ev,self.sync_check = [],[],sync_check
    def before_batch(self):
        if self.sync_check: torch.cuda.set_sync_debug_mode('error')
        if self.x.is_cuda: e = torch.cuda.Event(enable_timing=True); e.record(); self.ev.append([e])
        else: self.t0 = time.perf_counter()
    def after_batch(self):
        if self.x.is_cuda: e = torch.cuda.Event(enable_timing=True); e.record(); self.ev[-1].append(e)
        else: self.t.append((time.perf_counter()-self.t0)*1e3)
        if self.sync_check: torch.cuda.set_sync_debug_mode('default')
    def times(self):
        if self.ev: torch.cuda.synchronize(); self.t = [a.elapsed_time(b) for a,b in self.ev]
        return self.t

CONFIGS = {'none': lambda: [], 'monitor': lambda: [ActivationMonitor()],
           'monitor+hist': lambda: [ActivationMonitor(with_hist=True)],
           'guard skip': lambda: [ExplosionGuard('skip')], 'guard rollback': lambda: [ExplosionGuard('rollback')],
           'monitor+guard': lambda: [ActivationMonitor(), ExplosionGuard('rollback')],
           'fastai ActivationStats': lambda: [ActivationStats()]}

def learner(arch, bs, size, n, dev, fp16):
    set_seed(0)
    m = xresnet18(n_out=10) if arch=='xresnet18' else resnet50(num_classes=10)
    x,y = torch.randn(bs, 3, size, size, device=dev),torch.randint(0, 10, (bs,), device=dev)
    learn = Learner(DLs(DeviceDL(x, y, n)), m.to(dev), loss_func=F.cross_entropy)
    if fp16: learn.add_cb(MixedPrecision())
    return learn

def run(arch, bs, size, fp16, name, dev, warmup, steps):
    learn = learner(arch, bs, size, warmup+steps, dev, fp16)
    if dev.type=='cuda': torch.cuda.reset_peak_memory_stats(); torch.cuda.synchronize()
    g0,t0 = du.counters['stats']['unique_graphs'],time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[StepTimer()]+CONFIGS[name]()) # warm-up fit
    first = time.perf_counter()-t0
    tm = StepTimer()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[tm]+CONFIGS[name]())
    ts = tm.times()[warmup:]
    mem = torch.cuda.max_memory_allocated()/2**30 if dev.type=='cuda' else float('nan')
    return statistics.median(ts),first,du.counters['stats']['unique_graphs']-g0,mem

def sync_check(arch, dev, fp16, name):
    "Run a few training batches with host syncs turned into errors inside training batches"
    learn = learner(arch, 64, 32, 4, dev, fp16)
    try:
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[StepTimer(sync_check=True)]+CONFIGS[name]())
        return 'no sync'
    except RuntimeError as e: return f'SYNC: {str(e).splitlines()[0][:80]}'
    finally: torch.cuda.set_sync_debug_mode('default')

def main(a):
    dev = torch.device(a.device)
    archs,bss = (['xresnet18'],[8]) if a.quick else (['xresnet18','resnet50'],[64,256])
    precs = [False] + ([True] if dev.type=='cuda' else [])
    out = [f"# GPU benchmark: {torch.cuda.get_device_name() if dev.type=='cuda' else 'CPU'}, torch {torch.__version__}, "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
           f"median ms per training step ({a.steps} steps after {a.warmup}), x none, first fit s (compiles), peak GiB\n",
           '| model | bs | precision | callbacks | ms/step | x none | first fit s (graphs) | peak GiB |', '|---|---|---|---|---|---|---|---|']
    for arch in archs:
        size = 32 if arch=='xresnet18' else (64 if a.quick else 128)
        for bs in bss:
            for fp16 in precs:
                base = None
                for name in CONFIGS:
                    ms,first,graphs,mem = run(arch, bs, size, fp16, name, dev, a.warmup, a.steps)
                    base = base or ms
                    out.append(f"| {arch} {size}px | {bs} | {'fp16 (MixedPrecision)' if fp16 else 'fp32'} | {name} | {ms:.2f} | "
                               f"{ms/base:.3f}x | {first:.1f} ({graphs}) | {mem:.2f} |")
                    print(out[-1], flush=True)
    if dev.type=='cuda':
        out += ['', '| sync debug mode "error" | result |', '|---|---|']
        for name in ('monitor', 'monitor+hist', 'guard skip', 'monitor+guard'):
            for fp16 in (False, True):
                out.append(f"| xresnet18 {'fp16' if fp16 else 'fp32'} {name} | {sync_check('xresnet18', dev, fp16, name)} |")
                print(out[-1], flush=True)
    Path(a.out).write_text('\n'.join(out)+'\n')
    print(f'\nwritten to {a.out}')

if __name__=='__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--device', default='cuda')
    ap.add_argument('--quick', action='store_true', help='one small model, few steps (smoke test)')
    ap.add_argument('--warmup', type=int, default=10)
    ap.add_argument('--steps', type=int, default=50)
    ap.add_argument('--out', default='bench/gpu_results.md')
    a = ap.parse_args()
    if a.device=='cuda' and not torch.cuda.is_available(): sys.exit('no CUDA device: run with --device cpu for a smoke test')
    main(a)
