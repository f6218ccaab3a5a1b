"""Training stops when the `dvc repro` that started it is gone.

DVC runs a stage's command as its child, through `$SHELL -c` (bash execs a lone command,
dash forks it: a shell may sit between), and has no SIGTERM handler: `kill <dvc pid>`
ends DVC at once and nothing tells the trainer. Left alone it would train to the end,
write a model that no dvc.lock records and delete the checkpoint, so the next
`dvc repro` would train again from scratch.

While a stage runs under DVC (DVC sets `DVC_STAGE` for its commands), a daemon thread
checks every half second that the processes from this one up to DVC are still parent and
child (the shells between are followed up to the first process that is not a shell).
When DVC is gone it interrupts training like Ctrl-C does: the epoch running is lost, the
checkpoint of the last whole one stays, and the next `dvc repro` resumes from it (where
SIGINT is ignored, or training does not stop within GRACE_S, the process exits: the
checkpoint is written whole or not at all). A trainer started by hand (no `DVC_STAGE`)
outlives its terminal as it always did (nohup). On Linux the chain is read from /proc;
elsewhere only the direct parent is watched.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

POLL_S = 0.5
# After the interrupt, the seconds training gets to stop (an epoch is interrupted between
# batches) before the process exits regardless: a checkpoint is written whole or not at all.
GRACE_S = 30.0
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish", "busybox"})


def _stat(pid: int) -> tuple[str, int] | None:
    """(command name, parent pid) of `pid` from /proc, or None where that cannot be read."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, _, rest = text.partition(" (")[2].rpartition(") ")
    return name, int(rest.split()[1])


def ancestry() -> list[int]:
    """This process's parent, and above it each parent of a shell, up to the first
    process that is not a shell (DVC): the links that must hold while DVC runs us."""
    chain = [os.getppid()]
    while (found := _stat(chain[-1])) is not None and found[0] in SHELLS and found[1] > 1:
        chain.append(found[1])
    return chain


def intact(chain: list[int]) -> bool:
    """Whether every process of `chain` is still the child of the next one."""
    if os.getppid() != chain[0]:
        return False
    for child, parent in zip(chain, chain[1:], strict=False):
        found = _stat(child)
        if found is None or found[1] != parent:
            return False
    return True


def _stop_when_broken(chain: list[int], done: threading.Event, stage: str) -> None:
    while not done.wait(POLL_S):
        if not intact(chain):
            with contextlib.suppress(OSError):  # a terminal or pipe that went with DVC
                print(
                    f"{stage}: the dvc process that ran this stage (pid {chain[-1]}) is gone; "
                    "stopping: the next `dvc repro` resumes from the last whole epoch",
                    file=sys.stderr,
                    flush=True,
                )
            # SIGINT ignored (a background job of a script): nothing would raise; exit now
            if _interrupt_main() and done.wait(GRACE_S):
                return
            os._exit(130)


def _interrupt_main() -> bool:
    """KeyboardInterrupt in the main thread, as Ctrl-C raises it: a real SIGINT where there
    are signals, so that a main thread blocked in a wait wakes up too. False where Python
    does not handle SIGINT (it was ignored when the process started)."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return False
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    else:
        _thread.interrupt_main()
    return True


@contextlib.contextmanager
def stop_with_dvc(stage: str = "train") -> Iterator[None]:
    """Interrupt the block when the DVC process running this stage goes away (a no-op
    outside DVC)."""
    if "DVC_STAGE" not in os.environ:
        yield
        return
    done = threading.Event()
    watcher = threading.Thread(
        target=_stop_when_broken, args=(ancestry(), done, stage), daemon=True
    )
    watcher.start()
    try:
        yield
    finally:
        done.set()
