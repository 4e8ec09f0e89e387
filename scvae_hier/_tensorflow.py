"""Import TensorFlow once, and quietly on a machine without a GPU.

TensorFlow's C++ start-up writes "Could not find cuda drivers" and "failed call to cuInit" to
standard error before any Python logging setting applies; on a CPU-only machine these lines say
nothing useful, so the import (and device discovery) runs with file descriptor 2 pointed at
/dev/null. Python exceptions still propagate. With a GPU present nothing is hidden.
Core modules that use TensorFlow import this module first.
"""
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def _has_gpu() -> bool:
    return any(os.path.exists(path) for path in GPU_DEVICE_FILES)


def _import_quietly() -> None:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


if "tensorflow" not in sys.modules and not _has_gpu():
    _import_quietly()
