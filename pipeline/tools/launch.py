"""python -m pipeline launch --processes N -- train [ARGS]: N training processes on
this machine, as N hosts would run them.

Each child is `python -m pipeline [--params P] train [ARGS]` with Keras's variables
set (KERAS_DISTRIBUTION_JOB_ADDRESSES=127.0.0.1:<a free port>, _NUM_PROCESSES,
_PROCESS_ID), so it joins the group through pipeline.training.cluster exactly as a
host given `--coordinator` would. Every line a child prints is shown with its index,
`[p0] ...`, on the launcher's stdout or stderr as the child wrote it: the chief's
progress and any process's error stay visible. The first child to exit non-zero stops
the others (SIGTERM, SIGKILL after GRACE_S) and the launcher exits with its code; Ctrl-C
or SIGTERM to the launcher stops them all; the children die with the launcher
(PR_SET_PDEATHSIG on Linux) if it is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from pipeline.errors import ConfigError
from pipeline.training import cluster

GRACE_S = 10.0
POLL_S = 0.1


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the coordinator binds it moments later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pipeline_command(argv: list[str], params: str | None) -> list[str]:
    """The child's command line for `launch -- argv`: a pipeline subcommand."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise ConfigError("launch: give the command to run, e.g. launch --processes 2 -- train")
    if argv[0] != "train":
        raise ConfigError(f"launch: runs `train` in every process, not {argv[0]!r}")
    given = [a for a in argv if a.split("=")[0] in ("--coordinator", "--num-processes")]
    if given or any(a.startswith("--process-id") for a in argv):
        raise ConfigError("launch: sets the coordinator, process count and ids itself")
    return [sys.executable, "-m", "pipeline", *(["--params", params] if params else []), *argv]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the launcher dies (Linux; else nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _relay(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        with contextlib.suppress(OSError, ValueError):
            out.write(prefix + line.decode(errors="replace").rstrip("\n") + "\n")
            out.flush()
    stream.close()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run(command: list[str], processes: int, port: int | None = None) -> int:
    """Run `command` as `processes` members of one group on 127.0.0.1; the exit code of
    the first to fail, else 0."""
    if processes < 1:
        raise ConfigError(f"launch: --processes must be >= 1, not {processes}")
    address = f"127.0.0.1:{port or free_port()}"
    print(f"launch: {processes} processes, coordinator {address}", file=sys.stderr, flush=True)
    children: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    stop = threading.Event()
    stopped_by: list[int] = []

    def on_signal(signum, _frame):
        stopped_by.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for index in range(processes):
            env = {
                **os.environ,
                cluster.ENV_ADDRESSES: address,
                cluster.ENV_PROCESSES: str(processes),
                cluster.ENV_PROCESS_ID: str(index),
                "PYTHONUNBUFFERED": "1",
            }
            children.append(
                subprocess.Popen(
                    command,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            )
        for index, child in enumerate(children):
            for stream, out in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
                relay = threading.Thread(target=_relay, args=(stream, f"[p{index}] ", out))
                relay.start()
                relays.append(relay)
        code = _wait(children, stop)
        if stopped_by:
            code = 128 + stopped_by[0]
    finally:
        _stop_all(children)
        for relay in relays:
            relay.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _wait(children: list[subprocess.Popen], stop: threading.Event) -> int:
    """Until all exit 0 (0), one exits non-zero (its code) or the launcher is told to
    stop by a signal."""
    while not stop.is_set():
        codes = [child.poll() for child in children]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            index = codes.index(failed[0])
            others = [str(i) for i, c in enumerate(codes) if c is None]
            if others:
                print(
                    f"launch: process {index} exited with {_exit_code(failed[0])}; stopping "
                    f"process {', '.join(others)}",
                    file=sys.stderr,
                    flush=True,
                )
            return _exit_code(failed[0])
        if all(c == 0 for c in codes):
            return 0
        time.sleep(POLL_S)
    print("launch: interrupted; stopping every process", file=sys.stderr, flush=True)
    return 130


def _stop_all(children: list[subprocess.Popen]) -> None:
    """SIGTERM to each child still running, SIGKILL to any left after GRACE_S."""
    running = [c for c in children if c.poll() is None]
    for child in running:
        with contextlib.suppress(ProcessLookupError):
            child.terminate()
    deadline = time.monotonic() + GRACE_S
    for child in running:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
