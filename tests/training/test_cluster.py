"""The multi-process JAX group (pipeline/training/cluster.py) and the local launcher:
settings parsed and refused in-process; real groups of 2 processes x 2 fake CPU devices
on 127.0.0.1 (Gloo collectives) started by tests/training/cluster_worker.py."""

import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.tools import launch
from pipeline.training import cluster as cl

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("cluster_worker.py")
HEARTBEAT_S = 5
BOUND_S = 60  # heartbeat timeout, the guard's flush and a loaded 2-core machine


def flags(coordinator=None, num_processes=None, process_id=None):
    return Namespace(coordinator=coordinator, num_processes=num_processes, process_id=process_id)


ENV = {
    cl.ENV_ADDRESSES: "10.0.0.1:1234",
    cl.ENV_PROCESSES: "2",
    cl.ENV_PROCESS_ID: "1",
}


def test_nothing_set_is_one_process():
    group = cl.from_env(flags(), environ={})
    assert group == cl.Cluster(None, 1, 0)
    assert group.chief and not group.multi_process
    cl.initialize(group)  # a no-op: jax is not even imported for one process


def test_env_and_flags_flags_win():
    assert cl.from_env(None, environ=ENV, backend="jax") == cl.Cluster("10.0.0.1:1234", 2, 1)
    group = cl.from_env(flags("host-b:99", 4, 0), environ=ENV, backend="jax")
    assert group == cl.Cluster("host-b:99", 4, 0) and group.chief


def test_keras_comma_list_names_the_coordinator_first():
    env = {**ENV, cl.ENV_ADDRESSES: "10.0.0.1:1234,10.0.0.2:2345"}
    assert cl.from_env(None, environ=env, backend="jax").coordinator == "10.0.0.1:1234"
    env[cl.ENV_PROCESSES] = "3"
    with pytest.raises(ConfigError, match="lists 2 addresses for 3 processes"):
        cl.from_env(None, environ=env, backend="jax")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (flags("h:1"), {}, r"--coordinator given without --num-processes \(or "),
        (flags(None, 2, 0), {}, r"without --coordinator \(or KERAS_DISTRIBUTION_JOB_ADDRESSES"),
        (None, {cl.ENV_PROCESSES: "2", cl.ENV_PROCESS_ID: "0"}, "without --coordinator"),
        (flags("h:1", 2, 2), {}, r"--process-id is 2, out of range for 2 processes \(0 to 1\)"),
        (flags("h:1", 0, 0), {}, "--num-processes must be an integer >= 1, not '0'"),
        (None, {**ENV, cl.ENV_PROCESS_ID: "x"}, "KERAS_DISTRIBUTION_PROCESS_ID must be an int"),
        (flags("h", 2, 0), {}, "--coordinator must be HOST:PORT .*not 'h'"),
        (flags("h:99999", 2, 0), {}, "not 'h:99999'"),
        (flags("h:1", -1, 0), {}, "--num-processes must be an integer >= 1"),
    ],
)
def test_refusals_name_the_setting(args, env, message):
    with pytest.raises(ConfigError, match=message):
        cl.from_env(args, environ=env, backend="jax")


def test_tensorflow_refuses_more_than_one_process():
    with pytest.raises(ConfigError, match="need the jax backend .*keras#20585"):
        cl.from_env(None, environ=ENV, backend="tensorflow")
    one = cl.from_env(flags("h:1", 1, 0), environ={}, backend="tensorflow")
    assert not one.multi_process


def test_bad_timeout_variable_is_named(monkeypatch):
    monkeypatch.setenv("PIPELINE_HEARTBEAT_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match="PIPELINE_HEARTBEAT_TIMEOUT_S .* not 'soon'"):
        cl.timeout_s("PIPELINE_HEARTBEAT_TIMEOUT_S")


def test_fatal_filter_keeps_other_lines_and_condenses_the_abort():
    keep = cl.FatalFilter("127.0.0.1:9", 0, 5, 7)
    lines = [
        "epoch 1\n",
        "[Gloo] Rank 0 is connected to 3 peer ranks. Expected number of connected peer "
        "ranks is : 3\n",
        "E1202 13:09:20.389486    9514 coordination_service.cc:1549] [1] Use error polling"
        " to propagate the following error to all tasks: UNAVAILABLE: The following tasks "
        "are unhealthy (stopped sending heartbeats):\n",
        "1\n",
        "F1202 13:09:20.390281    9525 client.h:80] Terminating process because the JAX "
        "distributed service detected fatal errors. absl::Status: UNAVAILABLE: The following"
        " tasks are unhealthy (stopped sending heartbeats):\n",
        "1\n",
        "*** Check failure stack trace: ***\n",
        "    @     0x7fab4d740634  absl::log_internal::LogMessage::SendToLog()\n",
    ]
    shown = [out for line in lines for out in keep.feed(line, 0.0)] + keep.close()
    assert shown == [
        "epoch 1\n",
        "error: train: process 0: process 1 stopped answering the coordinator 127.0.0.1:9 "
        "for 7 s (it died or hung; see its output): stopping too\n",
    ]
    quiet = cl.FatalFilter("127.0.0.1:9", 0, 5, 7)
    held = "W1202 13:09:20.3 1 preemption_sync_manager.cc:147] a warning\n"
    assert quiet.feed(held, 0.0) == [] and quiet.tick(1.0) == []
    assert quiet.tick(cl.HOLD_S + 1) == [held]  # no abort followed: shown after all


def _env(index=None, processes=2, port=None, devices=2, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERAS_DISTRIBUTION_")} | {
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONUNBUFFERED": "1",
        "PIPELINE_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_S),
        "PIPELINE_SHUTDOWN_TIMEOUT_S": "60",
        "PYTHONPATH": str(ROOT),
        **extra,
    }
    if index is not None:
        env |= {
            cl.ENV_ADDRESSES: f"127.0.0.1:{port}",
            cl.ENV_PROCESSES: str(processes),
            cl.ENV_PROCESS_ID: str(index),
        }
    return env


def _start(out, mode, port, index, *extra):
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), mode, *extra],
        env=_env(index, port=port),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _finish(proc, timeout=BOUND_S * 3):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"a group member hung past {timeout} s:\n{out}\n{err}")
    return proc.returncode, out, err


def _wait_for(path: Path, procs, timeout=BOUND_S * 3):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"{path.name} never appeared: {[_finish(p) for p in procs]}")
        time.sleep(0.2)


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture
def out(tmp_path):
    return tmp_path


def test_two_processes_match_one_process_of_four_devices(out):
    port = launch.free_port()
    procs = [_start(out, "fit", port, i) for i in range(2)]
    results = [_finish(p) for p in procs]
    assert [r[0] for r in results] == [0, 0], results
    assert all("Check failure" not in r[2] for r in results)
    two = [json.loads((out / f"p{i}.json").read_text()) for i in range(2)]
    single = out / "single"
    single.mkdir()
    done = subprocess.run(
        [sys.executable, str(WORKER), str(single), "fit"],
        env=_env(devices=4),
        capture_output=True,
        text=True,
        timeout=BOUND_S * 3,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    one = json.loads((single / "p0.json").read_text())
    assert two[0]["devices"] == two[1]["devices"] == one["devices"] == 4
    assert two[0]["loss"] == two[1]["loss"]  # one program: every process sees the same loss
    assert two[0]["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two[0]["loss"][-1] < two[0]["loss"][0]


@pytest.mark.parametrize("victim", [1, 0], ids=["worker-killed", "chief-killed"])
def test_sigkill_one_process_stops_the_other_with_one_line(out, victim):
    port = launch.free_port()
    procs = [_start(out, "slow", port, i) for i in range(2)]
    for i in range(2):
        _wait_for(out / f"training{i}", procs)
    killed = time.monotonic()
    procs[victim].send_signal(signal.SIGKILL)
    code, _, err = _finish(procs[1 - victim], timeout=BOUND_S)
    took = time.monotonic() - killed
    _finish(procs[victim])
    assert code != 0
    assert took < BOUND_S
    assert "Check failure stack trace" not in err and "client.h" not in err, err
    assert len(_errors(err)) == 1, err
    line = _errors(err)[0]
    assert f"127.0.0.1:{port}" in line
    assert ("process 1 stopped answering" in line) if victim == 1 else ("lost the" in line)


def test_a_python_failure_on_one_process_ends_both(out):
    port = launch.free_port()
    procs = [_start(out, "fail", port, i) for i in range(2)]
    failing = _finish(procs[1], timeout=BOUND_S * 3)
    started = time.monotonic()
    chief = _finish(procs[0], timeout=BOUND_S)
    assert failing[0] == 2, failing
    assert _errors(failing[2]) == ["error: train: process 1 failed on purpose"], failing[2]
    assert chief[0] != 0 and time.monotonic() - started < BOUND_S
    assert len(_errors(chief[2])) == 1 and f"127.0.0.1:{port}" in chief[2], chief[2]


def test_chief_alone_times_out_with_one_line_naming_the_coordinator(out):
    port = launch.free_port()
    started = time.monotonic()
    code, _, err = _finish(_start(out, "fit", port, 0, "3"), timeout=BOUND_S * 2)
    assert code != 0 and time.monotonic() - started < BOUND_S * 2
    assert _errors(err) == [
        f"error: train: process 0: not every process reached the coordinator "
        f"127.0.0.1:{port} within 3 s (PIPELINE_INIT_TIMEOUT_S): start all of them with the "
        "same coordinator and process count, and check the port is reachable"
    ], err
    assert "Check failure" not in err


def _launcher(out, mode, **popen):
    code = (
        "import sys; from pipeline.tools import launch; "
        f"sys.exit(launch.run([sys.executable, {str(WORKER)!r}, {str(out)!r}, {mode!r}], 2))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        **popen,
    )


def test_launcher_prefixes_lines_and_a_failing_child_stops_the_other(out):
    code, stdout, err = _finish(_launcher(out, "fail"), timeout=BOUND_S * 3)
    assert code == 2, err
    assert "[p1] error: train: process 1 failed on purpose" in err.splitlines()
    assert "launch: process 1 exited with 2; stopping process 0" in err
    assert "[p0] training 0" in stdout.splitlines()
    assert not (out / "p0.json").exists()


def test_sigterm_to_the_launcher_stops_every_child(out):
    launcher = _launcher(out, "slow")
    for i in range(2):
        _wait_for(out / f"training{i}", [launcher])
    pids = [int((out / f"pid{i}").read_text()) for i in range(2)]
    stopped = time.monotonic()
    launcher.send_signal(signal.SIGTERM)
    code, _, err = _finish(launcher, timeout=launch.GRACE_S + 30)
    assert code == 128 + signal.SIGTERM, err
    # SIGTERM stops a child at once (JAX's preemption service would swallow it: SIGKILL
    # after the grace)
    assert time.monotonic() - stopped < launch.GRACE_S - 2
    assert "launch: interrupted; stopping every process" in err
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_launch_cli_refuses_another_command(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "launch", "--processes", "2", "--", "check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: launch: runs `train` in every process, not 'check'"
