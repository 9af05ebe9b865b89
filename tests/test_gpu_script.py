"`bench/gpu.py`, the script a lent GPU runs unattended, as a smoke test on the CPU."
import subprocess, sys
from pathlib import Path

def test_gpu_script_runs_on_cpu(tmp_path):
    out = tmp_path/'gpu.md'
    r = subprocess.run([sys.executable, 'bench/gpu.py', '--device', 'cpu', '--quick', '--warmup', '1', '--steps', '2',
                        '--budget-s', '1e9', '--out', str(out)], capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert r.returncode==0, r.stderr[-2000:]
    rows = [l for l in out.read_text().splitlines() if l.startswith('| xresnet18')]
    assert [l.split('|')[4].strip() for l in rows] == ['none', 'monitor', 'monitor+hist', 'guard skip', 'guard rollback',
                                                       'monitor+guard', 'fastai ActivationStats',
                                                       'monitor, copies in hooks (defer=False)',
                                                       'monitor, all staged (direct_min=2**24)']
    assert all(float(l.split('|')[5]) > 0 for l in rows)
    syncs = {l.split('|')[1].strip():l.split('|')[2].strip() for l in out.read_text().splitlines() if 'expected' in l}
    assert len(syncs)==6, syncs # on the CPU `OpCounter` counts: the monitor none, the guard its one read per batch
    assert sum('changing' in k for k in syncs)==2, syncs # also with new shapes each batch and a frozen layer
    for k,v in syncs.items(): assert v.startswith('1.00' if 'guard' in k else '0.00'), (k, v)
