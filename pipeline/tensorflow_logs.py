"""TensorFlow's C++ start-up lines kept off a user's terminal unless they ask for them.

On a CPU machine every process that imports TensorFlow prints a notice that oneDNN is
on, that no CUDA driver was found, that absl logs before it is initialised, and a
failed cuInit. They are printed while TensorFlow's libraries load, before it reads
TF_CPP_MIN_LOG_LEVEL, and level 3 would also hide TensorFlow's real errors. So the
first `import tensorflow` runs with the process's stderr (fd 2) in a temporary file,
and every line but these known ones is written back. A user who sets
TF_CPP_MIN_LOG_LEVEL (0 shows everything) gets exactly TensorFlow's behaviour.
oneDNN itself stays on (it makes CPU training faster): only its notice is hidden.
"""

from __future__ import annotations

import os
import re
import sys

# TensorFlow's C++ start-up lines that TF_CPP_MIN_LOG_LEVEL cannot reach: its libraries
# log through absl before absl is initialised (which ignores the level), and the GPU probe
# of a machine without one logs an ERROR. Matched whole, so nothing else is dropped.
_TF_STARTUP_NOISE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|I\d{4} [^\]]* (port\.cc:\d+\] oneDNN custom operations are on\."
    rb"|cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine)[^\n]*"
    rb"|E\d{4} [^\]]* cuda_(platform|driver|executor)\.cc:\d+\] failed call to cuInit: [^\n]*"
)


class _QuietTensorFlowImport:
    """Import hook: the first `import tensorflow` (from Keras or any module) runs with
    fd 2 in a temporary file, probes the devices there, then writes back every line but
    `_TF_STARTUP_NOISE`. An error raised by the import still propagates, and its output
    is shown."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec_module(module):
            import contextlib
            import tempfile

            sys.stderr.flush()
            saved = os.dup(2)
            with tempfile.TemporaryFile() as caught:
                os.dup2(caught.fileno(), 2)
                try:
                    exec_module(module)
                    # The GPU probe (cuInit) logs now, inside the capture; should it
                    # fail, the real call later raises the error where it belongs.
                    with contextlib.suppress(Exception):
                        module.config.list_physical_devices()
                finally:
                    sys.stderr.flush()
                    os.dup2(saved, 2)
                    os.close(saved)
                    caught.seek(0)
                    for line in caught.read().splitlines(keepends=True):
                        if not _TF_STARTUP_NOISE.fullmatch(line.rstrip(b"\r\n")):
                            os.write(2, line)

        spec.loader.exec_module = quiet_exec_module
        return spec


def quiet_tensorflow_startup() -> None:
    """Install the import hook (once, before anything imports TensorFlow) and hide
    TensorFlow's INFO and WARNING logs, unless TF_CPP_MIN_LOG_LEVEL is set."""
    quiet = "TF_CPP_MIN_LOG_LEVEL" not in os.environ and "tensorflow" not in sys.modules
    if quiet and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # INFO and WARNING; errors show
