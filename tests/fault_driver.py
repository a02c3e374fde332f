"""Kills a library write at every file-system step it takes (run as a subprocess by test_hardening_library.py).

    python fault_driver.py WORK ADAPTERS_DIR
    python fault_driver.py WORK --train     (training: an outdated adapter retrained and a new one, killed alike)

For each operation (build, add, remove, compact, index) it makes the library the operation starts from, counts
the steps the operation takes (opening, writing, syncing, renaming, removing a file, making a folder), then for
every step N forks a child that runs the operation on a fresh copy and SIGKILLs itself just before step N. It
prints one JSON object: per operation the adapters before and after, the steps counted and the copies made."""

from __future__ import annotations

import builtins
import json
import os
import pathlib
import shutil
import signal
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # no OpenMP pool before fork()
sys.path.insert(0, str(Path(__file__).parent))

from conftest import tiny_llama  # noqa: E402

from loralag import build_library, open_library  # noqa: E402
from loralag.library.store import module_shapes  # noqa: E402

SHAPES = module_shapes(tiny_llama())


def build(path, folders, **kw):
    return build_library(path, folders, base_model="tiny", shapes=SHAPES, progress=False, **kw)


class Steps:
    """Counts file-system steps; with `kill_at`, SIGKILLs the process just before that step."""

    def __init__(self, kill_at: int | None = None):
        self.n, self.kill_at = 0, kill_at

    def step(self):
        self.n += 1
        if self.n == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self):
        def wrap(fn, writes_only=False):
            def hooked(*args, **kwargs):
                mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
                if not writes_only or (isinstance(mode, str) and any(c in mode for c in "wax+")):
                    self.step()
                return fn(*args, **kwargs)

            return hooked

        builtins.open = wrap(builtins.open, writes_only=True)
        for name in ("replace", "rename", "fsync", "unlink", "mkdir", "rmdir"):
            setattr(os, name, wrap(getattr(os, name)))
        pathlib.Path.unlink = wrap(pathlib.Path.unlink)
        pathlib.Path.mkdir = wrap(pathlib.Path.mkdir)


def kill_at_every_step(run, root: Path, steps: int, pristine: Path | None) -> list[dict]:
    """For every step N (and one past the last), a forked child runs `run` on root/killN (a copy of `pristine`)
    and SIGKILLs itself just before step N; returns each run's folder and how it ended."""
    runs = []
    for n in range(1, steps + 2):
        dst = root / f"kill{n}"
        if pristine is not None:
            shutil.copytree(pristine, dst)
        pid = os.fork()
        if pid == 0:
            Steps(kill_at=n).install()
            try:
                run(dst)
            except BaseException:
                os._exit(3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        runs.append({"dir": str(dst), "step": n, "killed": killed, "exit": None if killed else os.WEXITSTATUS(status)})
    return runs


def main(work: Path, ads: Path) -> None:
    a = [ads / f"a{i}" for i in range(4)]
    starts = {
        "build": (None, lambda lib: build(lib, a[:3], chunk_size=2)),
        "add": (lambda lib: build(lib, a[:2]), lambda lib: open_library(lib).add(a[2:], progress=False)),
        "remove": (lambda lib: build(lib, a[:3]), lambda lib: open_library(lib).remove(["a0", "a2"])),
        "compact": (
            lambda lib: build(lib, a[:3], chunk_size=2).remove(["a1"]),
            lambda lib: open_library(lib).compact(),
        ),
        "index": (lambda lib: build(lib, a[:3]), lambda lib: open_library(lib).build_index(progress=False)),
    }
    report = {}
    for op, (make, run) in starts.items():
        root = work / op
        pristine = root / "pristine"
        if make is not None:
            make(pristine)
        old = open_library(pristine).names if make is not None else None
        probe = root / "probe"
        if make is not None:
            shutil.copytree(pristine, probe)
        counter = Steps()
        pid = os.fork()
        if pid == 0:  # count in a child too, so the parent's own state stays untouched
            counter.install()
            run(probe)
            (root / "steps").write_text(str(counter.n))
            os._exit(0)
        os.waitpid(pid, 0)
        steps = int((root / "steps").read_text())
        new = open_library(probe).names
        runs = kill_at_every_step(run, root, steps, pristine if make is not None else None)
        report[op] = {"old": old, "new": new, "steps": steps, "runs": runs}
    print(json.dumps(report))


def train_main(work: Path) -> None:
    """Training into a folder that holds one finished adapter: it is retrained (its settings changed) and a second
    one is added. Prints the steps and, per kill point, the folder and whether the run was killed."""
    from tiny_text import tiny_tokenizer

    from loralag.training.train import Document, TrainConfig, train_adapters

    model, tok = tiny_llama(), tiny_tokenizer()
    docs = [Document("d0", "the cat sat on the mat"), Document("d1", "a dog ran in the park")]
    old = TrainConfig(target_modules=["up_proj"], steps=1, batch_size=1)
    new = TrainConfig(target_modules=["up_proj"], steps=2, batch_size=1)
    pristine = work / "pristine"
    train_adapters(model, tok, docs[:1], pristine, old, progress=False)

    def run(out):
        train_adapters(model, tok, docs, out, new, progress=False)

    shutil.copytree(pristine, work / "probe")
    counter = Steps()
    pid = os.fork()
    if pid == 0:
        counter.install()
        run(work / "probe")
        (work / "steps").write_text(str(counter.n))
        os._exit(0)
    os.waitpid(pid, 0)
    steps = int((work / "steps").read_text())
    runs = kill_at_every_step(run, work, steps, pristine)
    print(json.dumps({"steps": steps, "probe": str(work / "probe"), "runs": runs}))


if __name__ == "__main__":
    if sys.argv[2] == "--train":
        train_main(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
