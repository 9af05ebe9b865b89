"Which `resblock_learner` defaults train well at the `lr_find` suggestion? Prints a markdown table."
import time, torch
from fastcore.script import call_parse
from fastai.learner import Learner
from fastai.callback.schedule import *  # Learner.lr_find, Learner.fit_one_cycle
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.models.xresnet import xresnet18
from deepstable_fastai.data import digits_dls
from deepstable_fastai.learner import resblock_learner
import fastai.callback.progress # `Learner.no_bar`, `no_logging`

# name -> resblock_learner kwargs; 'xresnet18' is fastai's reference at the same budget
CONFIGS = {
    'b8_nf16_s2_nohead': dict(n_blocks=8, nf=16, n_stages=2, head_bn=False),  # the defaults before the head BatchNorm
    'b8_nf16_s2': dict(n_blocks=8, nf=16, n_stages=2),
    'b4_nf16_s2': dict(n_blocks=4, nf=16, n_stages=2),
    'b16_nf16_s2': dict(n_blocks=16, nf=16, n_stages=2),
    'b8_nf32_s2': dict(n_blocks=8, nf=32, n_stages=2),
    'b8_nf32_s2_nohead': dict(n_blocks=8, nf=32, n_stages=2, head_bn=False),
    'b8_nf16_s3': dict(n_blocks=8, nf=16, n_stages=3),
    'xresnet18': None,
    'default': {},  # whatever `resblock_learner`'s defaults are (today b8_nf16_s3); not in the default table
}

def make(name, dls):
    if CONFIGS[name] is None:
        return Learner(dls, xresnet18(c_in=dls.one_batch()[0].shape[1], n_out=dls.c), metrics=accuracy)
    return resblock_learner(dls, metrics=accuracy, **CONFIGS[name])

def run(name, size, bs, epochs, seed):
    "`lr_find`, then `fit_one_cycle(epochs, valley)` as a user would; returns (params, valley, accuracy, s, CPU s)"
    set_seed(seed)  # before the loaders, whose shuffling generator is drawn when they are built
    dls = digits_dls(size=size, bs=bs)
    learn = make(name, dls)
    n = sum(p.numel() for p in learn.model.parameters())
    with learn.no_bar(), learn.no_logging():
        lr = learn.lr_find(show_plot=False).valley
        t,c = time.time(),time.process_time()
        learn.fit_one_cycle(epochs, lr)
        secs,cpu = (time.time()-t)/epochs,(time.process_time()-c)/epochs
        acc = learn.validate()[1]
    return n, lr, acc, secs, cpu

@call_parse
def main(configs:str=','.join(k for k in CONFIGS if k!='default'), # comma-separated names from CONFIGS
         size:int=16, # digits image size
         epochs:int=4, # epochs of fit_one_cycle
         seeds:str='0,1,2', # comma-separated random seeds
         bs:int=64, # batch size
         threads:int=1): # torch threads (1 avoids oversubscription on shared CPUs)
    "`lr_find` + `fit_one_cycle(epochs, valley)` for each config and random seed; print a markdown table"
    torch.set_num_threads(threads)
    seeds = [int(s) for s in seeds.split(',')]
    print(f'digits {size}x{size}, bs={bs}, lr_find().valley then fit_one_cycle({epochs}), threads={threads}\n',
          flush=True)
    print('| config | params | valley lr (per run) | accuracy (per run) | mean acc | s/epoch | CPU s/epoch |',
          flush=True)
    print('|---|---|---|---|---|---|---|', flush=True)
    for name in configs.split(','):
        rs = [run(name, size, bs, epochs, s) for s in seeds]
        lrs = ' '.join(f'{r[1]:.1e}' for r in rs)
        accs = ' '.join(f'{r[2]:.3f}' for r in rs)
        mean,secs,cpu = (sum(r[i] for r in rs)/len(rs) for i in (2,3,4))
        print(f'| {name} | {rs[0][0]:,} | {lrs} | {accs} | {mean:.3f} | {secs:.2f} | {cpu:.2f} |', flush=True)
