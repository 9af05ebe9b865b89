"A training script as a user (or `deepstable train`) writes it, for `torchrun`: `data_parallel`, rank-0-only files"
import os, sys, json, hashlib, warnings
from pathlib import Path
import torch, torch.nn as nn
warnings.simplefilter('ignore')
from fastai.basics import Learner, Callback, CrossEntropyLossFlat, set_seed
from deepstable_fastai.data import digits_dls
from deepstable_fastai.monitor import ActivationMonitor
from deepstable_fastai.guard import ExplosionGuard
from deepstable_fastai.distrib import setup_device, data_parallel, rank, world, is_rank0, rank0_only

class NaNOnRank1(Callback):
    order = 0 # after `BatchShardTrainer` (-8) sliced the batch
    def before_batch(self):
        if self.training and rank()==1 and self.train_iter==4: x = self.xb[0].clone(); x[0,0] = float('nan'); self.learn.xb = (x,)

@rank0_only
def write_report(out, learn):
    mon = learn.activation_monitor
    (out/'report.json').write_text(json.dumps(dict(world=world(), events=learn.explosion_guard.events, names=mon.names)))
    mon.plot().savefig(out/'std.png')

out = Path(sys.argv[1])
dev = setup_device()
set_seed(0)
learn = Learner(digits_dls(flat=True, bs=64, device=dev), nn.Sequential(nn.Linear(64,64), nn.ReLU(), nn.Linear(64,10)),
                loss_func=CrossEntropyLossFlat(), cbs=[ActivationMonitor(), ExplosionGuard('rollback', verbose=False), NaNOnRank1()])
with data_parallel(learn, timeout=60): learn.fit(1, 1e-2)
write_report(out, learn)
h = hashlib.sha1(b''.join(p.detach().numpy().tobytes() for p in learn.model.parameters())).hexdigest()
(out/f'rank{rank()}.json').write_text(json.dumps(dict(rank=rank(), world=world(), digest=h, events=learn.explosion_guard.events,
                                                      std=learn.activation_monitor.values('std').nan_to_num(-1).tolist())))
# As in ddp_worker.py: skip interpreter teardown, where a gloo rank intermittently aborts after its work is done.
sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
