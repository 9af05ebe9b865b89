"He et al. 2015 on the digits: a 30-layer plain ReLU conv net with Xavier init vs `kaiming_init_`. Prints a markdown table."
import time, torch, torch.nn as nn
from functools import partial
from fastcore.script import call_parse
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import SGD, Adam
from fastai.metrics import accuracy
from fastai.callback.progress import *
from fastai.torch_core import set_seed
from deepstable_fastai.data import digits_dls
from deepstable_fastai.init import kaiming_init_, signal_check

def plain_net(n_layers=30, nf=16, n_in=1, n_out=10, padding_mode='zeros'):
    "`n_layers-1` 3x3 convs with ReLU (no BatchNorm, no shortcut), average pool and a linear layer"
    convs = [o for i in range(n_layers-1) for o in (nn.Conv2d(n_in if i==0 else nf, nf, 3, padding=1, padding_mode=padding_mode), nn.ReLU())]
    return nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(nf, n_out))

def xavier_init_(m):
    "Glorot-normal weights (gain 1) and zero biases for every conv and linear layer"
    for l in m.modules():
        if isinstance(l, (nn.Conv2d, nn.Linear)): nn.init.xavier_normal_(l.weight); nn.init.zeros_(l.bias)
    return m

INITS = dict(xavier=xavier_init_, kaiming=kaiming_init_)

def train(init, n_layers=30, nf=16, epochs=15, lr=1e-3, bs=64, seed=0, size=8, padding_mode='zeros', opt='adam'):
    "Train `plain_net` initialised by `init`; returns per-epoch train loss, valid loss and accuracy, and the init std ratio"
    set_seed(seed)
    dls = digits_dls(size=size, bs=bs)
    m = INITS[init](plain_net(n_layers, nf, padding_mode=padding_mode))
    r = signal_check(m, dls.one_batch()[0], plot=False)
    learn = Learner(dls, m, loss_func=CrossEntropyLossFlat(), opt_func=Adam if opt=='adam' else partial(SGD, mom=0.9), metrics=accuracy)
    t0 = time.time()
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, lr)
    v = learn.recorder.values
    return dict(init=init, verdict=r.verdict, out_std=r.table['std'].iloc[-2], train_loss=[o[0] for o in v],
                valid_loss=[o[1] for o in v], acc=[o[2] for o in v], secs=time.time()-t0)

@call_parse
def main(n_layers:int=30, # weight layers (convs + the final linear)
         nf:int=16, # channels
         epochs:int=15, # epochs at a constant learning rate
         lr:float=1e-3, # learning rate
         opt:str='adam', # 'adam' or 'sgd' (momentum 0.9)
         seed:int=0, # random seed
         size:int=8, # image size (digits are upsampled from 8x8)
         padding_mode:str='zeros', # conv padding; zero padding loses variance at the borders of small images
         threads:int=1): # torch threads
    "Print the per-epoch curves of both inits as a markdown table"
    torch.set_num_threads(threads)
    rs = [train(i, n_layers, nf, epochs, lr, seed=seed, size=size, padding_mode=padding_mode, opt=opt) for i in INITS]
    print(f'{n_layers}-layer plain ReLU conv net, nf={nf}, digits {size}x{size}, padding {padding_mode}, {opt} lr={lr} (constant), seed={seed}\n')
    for r in rs: print(f"{r['init']}: signal at init {r['verdict']}, std before the head {r['out_std']:.2e}, {r['secs']:.0f}s")
    print('\n| epoch | ' + ' | '.join(f"{r['init']} train loss | {r['init']} valid acc" for r in rs) + ' |')
    print('|---|' + '---|---|'*len(rs))
    for e in range(epochs): print(f'| {e+1} | ' + ' | '.join(f"{r['train_loss'][e]:.3f} | {r['acc'][e]:.3f}" for r in rs) + ' |')
