"""qcompiler.threads: the compile's torch thread count sees other processes' load, not its own,
restores the caller's setting, refuses nonsense, and never changes what is compiled."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from qcompiler import QCompileError, qcompile
from qcompiler import threads as qthreads

SPIN = "import time\nend = time.time() + 30\nwhile time.time() < end: pass\n"


@pytest.fixture
def hog():
    """A second process spinning on one core (at most 30 s)."""
    proc = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(autouse=True)
def fresh_decision(monkeypatch):
    monkeypatch.setattr(qthreads, "_last", None)


needs_two_cores = pytest.mark.skipif(qthreads.process_cores() < 2, reason="needs a machine with two cores")


@needs_two_cores
def test_a_spinning_process_is_seen_and_leaves_a_thread_free(hog):
    busy = qthreads.busy_cores(sample=0.5)
    assert busy is not None and busy >= 0.6
    assert qthreads.default_threads() <= qthreads.process_cores() - 1


@needs_two_cores
def test_own_threads_do_not_count_as_load(hog):
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    with_hog = qthreads.busy_cores(sample=0.5)
    hog.kill()
    hog.wait()
    worker = threading.Thread(target=spin)
    worker.start()
    try:
        own = qthreads.busy_cores(sample=0.5)
    finally:
        stop.set()
        worker.join()
    assert own is not None and with_hog is not None
    assert own <= with_hog - 0.5


def test_the_callers_thread_count_is_restored_and_bad_values_are_refused():
    before = torch.get_num_threads()
    with qthreads.torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with qthreads.torch_threads(None) as n:
        assert 1 <= n <= min(before, qthreads.process_cores())
    assert torch.get_num_threads() == before
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()
    for bad in (0, -2, "2", 1.5, True):
        with pytest.raises(QCompileError, match="threads"):
            qcompile(model, torch.randn(1, 3, 8, 8), threads=bad, progress=False)


def test_the_compile_does_not_depend_on_the_thread_count():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2)
    data = [torch.randn(8, 3, 24, 24, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    before = torch.get_num_threads()
    states = []
    for n in (1, 2):
        compiled = qcompile(model, data[0], calib_data=data, threads=n, progress=False)
        assert torch.get_num_threads() == before
        states.append(compiled.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
