"""Scripts run as a fresh `python script.py` would run them, in children forked from one Python
that has imported torch and the other libraries once: a fresh interpreter spends 3-4 s on its
imports before a tiny run's first step, most of that run's time. The parent only imports
(no torch thread pool exists to be forked); each child imports the project's modules from its
own folder, so a copy of the repository runs its own code."""
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

SERVER = r"""
import json, os, runpy, sys, traceback
import matplotlib; matplotlib.use("Agg")
import matplotlib.pyplot, numpy, pytest, tiktoken, torch, torch._dynamo  # noqa
jobs, width = json.loads(sys.argv[1]), int(sys.argv[2])
running, codes = {}, [None] * len(jobs)


def reap():
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)


def child(job):
    os.chdir(job["cwd"])
    os.environ.update(job["env"])
    for fd, name in ((1, "out"), (2, "err")):
        os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.path[0], argv = job["cwd"], job["argv"]
    try:
        if argv[0] == "-m":
            sys.argv = argv[1:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as e:  # as the interpreter reports it: a message goes to stderr with code 1
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


for j, job in enumerate(jobs):
    while running and (len(running) == width or job["after"]):
        reap()
    pid = os.fork()
    if pid == 0:
        code = child(job)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    running[pid] = j
while running:
    reap()
print(json.dumps(codes))
"""


def job(cwd, *argv, env=None, after=False):
    """`python argv...` (a script and its flags, or "-m", a module and its flags) run in cwd with
    env added to this process's environment; after: once every earlier job has ended."""
    return dict(cwd=str(cwd), argv=[str(a) for a in argv], env={k: str(v) for k, v in (env or {}).items()}, after=after)


def run(jobs, width=2, timeout=900):
    """The jobs, at most width at a time, in their order -> [(exit code, stdout, stderr)]."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [dict(j, out=f"{tmp}/{i}.out", err=f"{tmp}/{i}.err") for i, j in enumerate(jobs)]
        r = subprocess.run([sys.executable, "-c", SERVER, json.dumps(jobs), str(width)], capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        codes = json.loads(r.stdout.strip().splitlines()[-1])
        return [(c, Path(j["out"]).read_text(errors="replace"), Path(j["err"]).read_text(errors="replace"))
                for c, j in zip(codes, jobs)]


def two_processes(cwd, *argv, after=True):
    """The two jobs torchrun --standalone --nproc_per_node=2 would start: the variables it sets
    for each process (rank, world size, where rank 0 listens), one thread each as it sets."""
    with socket.socket() as s:  # a free port for the process group's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = lambda rank: dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=port, OMP_NUM_THREADS=1, SCD_THREADS=1)
    return [job(cwd, *argv, env=env(0), after=after), job(cwd, *argv, env=env(1))]
