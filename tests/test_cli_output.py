"What the `deepstable` command writes when its output is not a terminal: one line per epoch per model, no redraws."
import os, re, subprocess, sys
from pathlib import Path
from conftest import cli
from test_cli import _two_class_folder

def _epoch_lines(out, name):
    return [l for l in out.splitlines() if re.match(rf'{re.escape(name)}: epoch \d+/\d+ train_loss ', l)]

def test_demo_piped_one_line_per_epoch(tmp_path):
    "`deepstable demo` into a pipe: no `\\r`, one line per epoch per model, guard events on their own lines"
    r = cli('demo', '--depth', 8, '--epochs', 2, '--sweep', 0, '--out', tmp_path/'rep')  # deep enough for N(0,1) weights to explode
    assert r.returncode in (0,1), r.stderr[-3000:]
    assert '\r' not in r.stdout and '\r' not in r.stderr, r.stdout[:2000]
    for name in ('kaiming','batchnorm','resblock'):
        lines = _epoch_lines(r.stdout, name)
        assert [l.split()[2] for l in lines]==['1/2','2/2'], (name, r.stdout)
    assert len(_epoch_lines(r.stdout, 'naive'))<=2
    guard = [l for l in r.stdout.splitlines() if 'ExplosionGuard:' in l]
    assert guard and all(re.match(r'^\w+: ExplosionGuard: \w+ at epoch \d+ iter \d+', l) for l in guard), guard
    assert any(l.startswith('naive: ExplosionGuard: ') for l in guard)
    assert re.search(r'^1\. naive ', r.stdout, re.M) and 'report: ' in r.stdout

def test_train_piped_one_line_per_epoch(tmp_path):
    src = _two_class_folder(tmp_path/'imgs')
    r = cli('train', src, '--arch', 'resnet18', '--epochs', 2, '--size', 32, '--bs', 8, '--out', tmp_path/'rep')
    assert r.returncode in (0,1), r.stderr[-3000:]
    assert '\r' not in r.stdout and '\r' not in r.stderr
    assert [l.split()[2] for l in _epoch_lines(r.stdout, 'resnet18+stem')]==['1/2','2/2'], r.stdout

def test_terminal_keeps_progress_bars(tmp_path):
    "On a terminal (a pseudo-terminal here) fastai's progress bars stay"
    import pty
    src = _two_class_folder(tmp_path/'imgs')
    main, sub = pty.openpty()
    exe = Path(sys.executable).parent/'deepstable'
    args = ['train', src, '--arch', 'resnet18', '--epochs', 1, '--size', 32, '--bs', 8, '--out', tmp_path/'rep']
    p = subprocess.Popen([str(exe), *map(str, args)], stdout=sub, stderr=subprocess.DEVNULL, env={**os.environ, 'MPLBACKEND': 'Agg'})
    os.close(sub)
    out = b''
    while True:
        try: b = os.read(main, 65536)
        except OSError: break
        if not b: break
        out += b
    p.wait(timeout=600); os.close(main)
    txt = out.decode(errors='replace')
    assert p.returncode in (0,1), txt[-2000:]
    assert '\r' in txt and not _epoch_lines(txt, 'resnet18+stem'), txt[-2000:]
