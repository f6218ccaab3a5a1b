"""The process group of a multi-process (multi-host) JAX training.

Every host runs the same `python -m pipeline train`, told the coordinator's address
(process 0's host and a free port), the process count and its own index, by flags
(`--coordinator HOST:PORT --num-processes N --process-id I`) or by Keras's own
variables (KERAS_DISTRIBUTION_JOB_ADDRESSES, _NUM_PROCESSES, _PROCESS_ID); a flag wins
over its variable. `initialize` joins the group through `jax.distributed.initialize`,
with timeouts Keras does not pass:

- initialization (PIPELINE_INIT_TIMEOUT_S, default 300 s: hosts start minutes apart);
- heartbeats (PIPELINE_HEARTBEAT_TIMEOUT_S, default 30 s, JAX's is 100 s): a process
  that stops answering for that long ends every process. Heartbeats come from a C++
  thread, so a long compile or a busy Python step does not miss them: only a frozen or
  cut-off host does;
- shutdown (PIPELINE_SHUTDOWN_TIMEOUT_S, default 300 s): at exit a process waits that
  long for the others, the chief still writing the model and the MLflow run.

When a peer dies, JAX aborts the survivors (SIGABRT) from a C++ thread with a wall of
absl log and a stack trace; its missed-heartbeat callback cannot be used from Python
(jaxlib 0.10.2 throws std::bad_cast calling it). So a small guard process holds this
process's stderr: it passes every line through and turns that wall into one line naming
the coordinator. A process that fails in Python must not wait at JAX's shutdown barrier
(its peers would wait in their next collective until the shutdown timeout): `abandon`
exits at once, and the others stop within the heartbeat timeout.

One process (the default) is a no-op everywhere. Nothing here imports jax at import time.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from pipeline.errors import ConfigError, PipelineError

ENV_ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
ENV_PROCESSES = "KERAS_DISTRIBUTION_NUM_PROCESSES"
ENV_PROCESS_ID = "KERAS_DISTRIBUTION_PROCESS_ID"
TIMEOUTS_S = {  # environment variable -> default seconds
    "PIPELINE_INIT_TIMEOUT_S": 300,
    "PIPELINE_HEARTBEAT_TIMEOUT_S": 30,
    "PIPELINE_SHUTDOWN_TIMEOUT_S": 300,
}
_ADDRESS = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})")


@dataclass(frozen=True)
class Cluster:
    """Where this process sits: the coordinator (process 0's HOST:PORT), how many
    processes train together, and which one this is."""

    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0

    @property
    def chief(self) -> bool:
        """Process 0: the only one that writes outputs, checkpoints and MLflow."""
        return self.process_id == 0

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


def from_env(args=None, environ=None, backend: str | None = None) -> Cluster:
    """The cluster the train flags (`args.coordinator`, `args.num_processes`,
    `args.process_id`, each None when not given) and Keras's variables describe; a flag
    overrides its variable. A partial set, a bad address or an id out of range is a
    ConfigError naming the setting; so is more than one process on TensorFlow."""
    environ = os.environ if environ is None else environ
    flags = {
        "coordinator": ("--coordinator", ENV_ADDRESSES),
        "num_processes": ("--num-processes", ENV_PROCESSES),
        "process_id": ("--process-id", ENV_PROCESS_ID),
    }
    raw: dict[str, tuple[str, str]] = {}  # field -> (value, where it came from)
    for field, (flag, var) in flags.items():
        value = getattr(args, field, None) if args is not None else None
        if value is not None:
            raw[field] = (str(value), flag)
        elif environ.get(var, "").strip():
            raw[field] = (environ[var].strip(), var)
    if not raw:
        return Cluster()
    missing = [f"{flag} (or {var})" for field, (flag, var) in flags.items() if field not in raw]
    if missing:
        given = ", ".join(where for _, where in raw.values())
        raise ConfigError(f"train: {given} given without {' and '.join(missing)}")
    num_processes = _integer(*raw["num_processes"], low=1)
    process_id = _integer(*raw["process_id"], low=0)
    if process_id >= num_processes:
        where = raw["process_id"][1]
        raise ConfigError(
            f"train: {where} is {process_id}, out of range for {num_processes} processes "
            f"(0 to {num_processes - 1})"
        )
    coordinator = _coordinator(*raw["coordinator"], num_processes)
    if num_processes > 1:
        backend = backend or _keras_backend(environ)
        if backend != "jax":
            raise ConfigError(
                f"train: {num_processes} processes need the jax backend (KERAS_BACKEND=jax), "
                f"not {backend}: multi-host training with Keras 3 fit is JAX's "
                "(TensorFlow's MultiWorkerMirroredStrategy is broken with it, keras#20585)"
            )
    return Cluster(coordinator, num_processes, process_id)


def _integer(text: str, where: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise ConfigError(f"train: {where} must be an integer >= {low}, not {text!r}")
    return value


def _coordinator(text: str, where: str, num_processes: int) -> str:
    """HOST:PORT, or Keras's comma list of every process's address (the first is the
    coordinator; the list must have one address per process)."""
    addresses = [a.strip() for a in text.split(",")]
    if len(addresses) > 1 and len(addresses) != num_processes:
        raise ConfigError(
            f"train: {where} lists {len(addresses)} addresses for {num_processes} processes"
        )
    for address in addresses:
        found = _ADDRESS.fullmatch(address)
        if found is None or not 0 < int(found["port"]) < 65536:
            raise ConfigError(
                f"train: {where} must be HOST:PORT (e.g. 10.0.0.1:12345), not {address!r}"
            )
    return addresses[0]


def _keras_backend(environ) -> str:
    """The backend Keras will run (its config file unless KERAS_BACKEND), without
    importing Keras if the variable says it."""
    if environ.get("KERAS_BACKEND"):
        return environ["KERAS_BACKEND"]
    import keras

    return keras.backend.backend()


def timeout_s(variable: str) -> int:
    """One of TIMEOUTS_S, from its environment variable (whole seconds >= 1)."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return TIMEOUTS_S[variable]
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{variable} must be a whole number of seconds >= 1, not {text!r}")
    return value


def initialize(cluster: Cluster, init_timeout_s: int | None = None) -> None:
    """Join the process group (before anything runs on a JAX device); a no-op for one
    process. Does what `keras.distribution.initialize` does, with timeouts."""
    if not cluster.multi_process:
        return
    heartbeat_s = timeout_s("PIPELINE_HEARTBEAT_TIMEOUT_S")
    shutdown_s = timeout_s("PIPELINE_SHUTDOWN_TIMEOUT_S")
    init_s = init_timeout_s or timeout_s("PIPELINE_INIT_TIMEOUT_S")
    guard_stderr(cluster, init_s, heartbeat_s)
    import jax

    # Its SIGTERM handler only records a preemption notice (and logs it): `kill` and the
    # launcher's SIGTERM would not stop the process. Nothing here uses preemption sync.
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator,
            num_processes=cluster.num_processes,
            process_id=cluster.process_id,
            initialization_timeout=init_s,
            heartbeat_timeout_seconds=heartbeat_s,
            shutdown_timeout_seconds=shutdown_s,
        )
    except Exception as exc:  # a bad address, a port taken, called twice
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(
            f"train: process {cluster.process_id} of {cluster.num_processes} could not join "
            f"the coordinator {cluster.coordinator}: {first}"
        ) from None
    # Keras's initialize then agrees on one random seed, unless one is set already.
    from keras.src.backend.jax.distribution_lib import initialize_rng

    initialize_rng()


def _initialized() -> bool:
    if "jax" not in sys.modules:
        return False
    import jax

    return jax.distributed.is_initialized()


def abandon(exit_code: int) -> None:
    """End a failed process of a group now (after its one error line): JAX's shutdown
    barrier would wait for peers stuck in a collective that this process will never
    join. The others notice within the heartbeat timeout and stop. A no-op for one
    process."""
    if not _initialized():
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(exit_code)


# The absl lines JAX's coordination service logs when the group breaks (ERROR/WARNING
# before the FATAL that aborts the process); held back briefly in case a FATAL follows.
_COORDINATION_LOG = re.compile(
    r"[EWF]\d{4} [\d:.]+ +\d+ (coordination_service\w*|preemption_\w+|client)\.(cc|h):\d+\] "
)
_FATAL = re.compile(r"F\d{4} [\d:.]+ +\d+ client\.h:\d+\] Terminating process because")
_GLOO = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\.")
HOLD_S = 3.0


class FatalFilter:
    """Lines of a group member's stderr in, lines to show out: JAX's abort (a FATAL line,
    the status spread over lines, a stack trace) becomes one error line; Gloo's
    connection notices are dropped; every other line passes unchanged."""

    def __init__(self, coordinator: str, process_id: int, init_s: int, heartbeat_s: int):
        self.coordinator, self.process_id = coordinator, process_id
        self.init_s, self.heartbeat_s = init_s, heartbeat_s
        self.held: list[str] = []
        self.held_since = 0.0
        self.fatal: list[str] | None = None

    def feed(self, line: str, now: float) -> list[str]:
        if self.fatal is not None:
            self.fatal.append(line)
            return []
        if _FATAL.match(line):
            self.fatal = [line]
            self.held = []
            return []
        if _GLOO.match(line):
            return []
        if self.held or _COORDINATION_LOG.match(line):
            if not self.held:
                self.held_since = now
            self.held.append(line)
            return []
        return [line]

    def tick(self, now: float) -> list[str]:
        """Held lines that no FATAL followed within HOLD_S, released."""
        if self.held and now - self.held_since > HOLD_S:
            out, self.held = self.held, []
            return out
        return []

    def close(self) -> list[str]:
        """At end of input: the one line for an abort, or whatever is still held."""
        if self.fatal is None:
            out, self.held = self.held, []
            return out
        return [self.summary("".join(self.fatal)) + "\n"]

    def summary(self, text: str) -> str:
        where = f"error: train: process {self.process_id}"
        coordinator = f"the coordinator {self.coordinator}"
        if "RegisterTask" in text or "initialization timeout" in text.lower():
            return (
                f"{where}: not every process reached {coordinator} within "
                f"{self.init_s} s (PIPELINE_INIT_TIMEOUT_S): start all of them with the "
                "same coordinator and process count, and check the port is reachable"
            )
        found = re.search(r"stopped sending heartbeats\):\s*([\d\s,]+)", text)
        if found:
            dead = ", ".join(found[1].split()).replace(",,", ",")
            return (
                f"{where}: process {dead} stopped answering {coordinator} for "
                f"{self.heartbeat_s} s (it died or hung; see its output): stopping too"
            )
        if "Shutdown barrier" in text or "ShutdownTask" in text:
            return (
                f"{where}: the other processes did not finish within the shutdown timeout "
                f"(PIPELINE_SHUTDOWN_TIMEOUT_S) at {coordinator}"
            )
        if re.search(r"Socket closed|Connection reset|leader task|failed to connect", text, re.I):
            return f"{where}: lost {coordinator} (process 0 died or is unreachable): stopping"
        status = re.search(r"absl::Status: ([^\n]+)", text)
        reason = status[1] if status else text.strip().splitlines()[0]
        return f"{where}: the process group at {coordinator} failed: {reason[:300]}"


def guard_stderr(cluster: Cluster, init_s: int, heartbeat_s: int) -> None:
    """Route this process's stderr (fd 2) through a guard process running FatalFilter,
    which outlives an abort to print its one line. The guard ignores Ctrl-C and SIGTERM
    (it ends when the last writer closes the pipe, so no output is lost)."""
    sys.stderr.flush()
    guard = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from pipeline.training.cluster import _guard_main; _guard_main()",
            str(cluster.coordinator),
            str(cluster.process_id),
            str(init_s),
            str(heartbeat_s),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=None,  # the real stderr, inherited
        env={**os.environ, "PYTHONPATH": _package_root()},
    )
    os.dup2(guard.stdin.fileno(), 2)
    guard.stdin.close()


def _package_root() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH", "")] if p)


def _guard_main() -> None:
    """The guard process: stdin (the trainer's stderr) through FatalFilter to stderr."""
    import select

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    coordinator, process_id, init_s, heartbeat_s = sys.argv[1:5]
    keep = FatalFilter(coordinator, int(process_id), int(init_s), int(heartbeat_s))
    source, out = sys.stdin.buffer.raw, sys.stderr.buffer
    pending = b""

    def show(lines: list[str]) -> None:
        if lines:
            out.write("".join(lines).encode(errors="replace"))
            out.flush()

    while True:
        ready, _, _ = select.select([source], [], [], 0.5)
        now = time.monotonic()
        if ready:
            chunk = os.read(source.fileno(), 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                show(keep.feed(line.decode(errors="replace") + "\n", now))
        elif pending and not keep.held and keep.fatal is None:
            show([pending.decode(errors="replace")])  # a partial line, quiet for 0.5 s
            pending = b""
        show(keep.tick(now))
    if pending:
        show(keep.feed(pending.decode(errors="replace"), time.monotonic()))
    show(keep.close())
