"""How deep can each network go on the digits? Trains each depth x variant and prints a markdown table.

Default: `resblock_learner` variants (gamma 0, gamma 1, no BatchNorm). With `--plain`: the demo's depth sweep
(`deepstable_fastai.demo.depth_sweep`: plain Kaiming stack vs plain BatchNorm stack vs zero-gamma residual blocks)."""
import math, time, torch
from fastcore.script import call_parse
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.schedule import *
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from deepstable_fastai.data import digits_dls
from deepstable_fastai.learner import resblock_learner
import fastai.callback.progress # `Learner.no_bar`, `no_logging`

VARIANTS = dict(zero=dict(zero_gamma=True), one=dict(zero_gamma=False), nobn=dict(bn=False))
DESC = dict(zero='BN, gamma=0', one='BN, gamma=1', nobn='no BN')

class NonFinite(Callback):
    "Stop at the first non-finite loss or parameter and remember the iteration"
    order = 90
    def before_fit(self): self.at = None
    def after_batch(self):
        if not self.training: return
        bad = not torch.isfinite(self.loss).item() or not all(torch.isfinite(p).all() for p in self.model.parameters())
        if bad: self.learn.non_finite.at = self.train_iter; raise CancelFitException()

def run(n_blocks, variant, epochs, lr, nf, bs, seed):
    set_seed(seed)
    dls = digits_dls(bs=bs)
    t0 = time.time()
    learn = resblock_learner(dls, n_blocks=n_blocks, nf=nf, metrics=accuracy, cbs=NonFinite(), **VARIANTS[variant])
    t_build = time.time()-t0
    with learn.no_bar(): init = learn.signal_check(plot=False).verdict
    t0,c0 = time.time(),time.process_time()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr)
        t_fit,c_fit = time.time()-t0,time.process_time()-c0
        at = learn.non_finite.at
        acc = learn.validate()[1] if at is None else float('nan')
    ep_done = epochs if at is None else max(at,1)/len(dls.train)
    return dict(blocks=n_blocks, variant=DESC[variant], init=init, nonfinite='none' if at is None else f'iter {at}',
                acc=acc, s_epoch=t_fit/ep_done, cpu_epoch=c_fit/ep_done,
                build_s=t_build, epochs=epochs)

def plain_sweep(depths, epochs, lrs, nf, bs, seed):
    "The demo's depth sweep as a markdown table: one row per depth, one column per variant"
    from deepstable_fastai.demo import depth_sweep
    rows = depth_sweep(depths, epochs, lrs, nf=nf, bs=bs, seed=seed, verbose=False)
    vs = list(dict.fromkeys(r['variant'] for r in rows))
    print(f"| depth | {' | '.join(vs)} | wall s |\n|---|{'---|'*len(vs)}---|")
    for d in depths:
        rs = {r['variant']:r for r in rows if r['depth']==d}
        accs = ' | '.join(f"{rs[v]['accuracy']:.3f}" for v in vs)
        print(f"| {d} | {accs} | {sum(r['secs'] for r in rs.values()):.1f} |", flush=True)

@call_parse
def main(depths:str='10,100,1000', # comma-separated numbers of blocks (layers for the plain stacks)
         plain:bool=False, # the demo's sweep: plain Kaiming vs plain BatchNorm vs zero-gamma residual
         lrs:str='kaiming=1e-3,batchnorm=3e-3,resblock=3e-3', # with --plain: lr per variant
         variants:str='zero,one,nobn', # from zero (gamma=0), one (gamma=1), nobn (no BatchNorm)
         epochs:int=5, # epochs of fit_one_cycle
         lr:float=1e-2, # max learning rate
         nf:int=8, # width of the first stage
         bs:int=64, # batch size
         seed:int=0, # random seed
         threads:int=1): # torch threads (1 avoids oversubscription on shared CPUs)
    "Train `resblock_learner` at each depth and variant; print a markdown table"
    torch.set_num_threads(threads)
    if plain:
        print(f'digits 8x8, nf={nf}, bs={bs}, fit_one_cycle({epochs}), lrs {lrs}, threads={threads}\n', flush=True)
        return plain_sweep([int(d) for d in depths.split(',')], epochs, {k:float(v) for k,v in (o.split('=') for o in lrs.split(','))}, nf, bs, seed)
    print(f'digits 8x8, nf={nf}, bs={bs}, fit_one_cycle({epochs}, {lr}), seed={seed}, threads={threads}\n', flush=True)
    print('| blocks | variant | signal at init | non-finite | valid acc | wall s/epoch | CPU s/epoch | build s |\n|---|---|---|---|---|---|---|---|', flush=True)
    for d in map(int, depths.split(',')):
        for v in variants.split(','):
            r = run(d, v, epochs, lr, nf, bs, seed)
            acc = '-' if math.isnan(r['acc']) else f"{r['acc']:.3f}"
            print(f"| {r['blocks']} | {r['variant']} | {r['init']} | {r['nonfinite']} | {acc} | {r['s_epoch']:.1f} | {r['cpu_epoch']:.1f} | {r['build_s']:.1f} |", flush=True)
