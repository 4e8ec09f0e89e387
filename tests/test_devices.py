"""Several devices through tf.distribute.MirroredStrategy, tested without GPUs on the CPU split
into two logical devices (in a fresh process: the split must come before TensorFlow starts)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scvae_hier.options import TrainOptions

SCRIPT = Path(__file__).resolve().parent / "devices_check.py"


def test_two_replicas_train_exactly_as_one_device_on_the_same_global_batches():
    out = subprocess.run([sys.executable, str(SCRIPT)], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    one, two = result["one"], result["two"]
    assert (one["replicas"], two["replicas"]) == (1, 2)
    assert two["jit_compile"] is False  # XLA is off under MirroredStrategy (see compile_model)
    # Each replica divides its sum by the global batch and takes its rows of the global noise, so
    # the loss history and the weights equal the one-device run's to float tolerance.
    np.testing.assert_allclose(two["history"]["loss"], one["history"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(two["history"]["elbo"], one["history"]["elbo"], rtol=1e-5)
    for a, b in zip(one["weights"], two["weights"]):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-4)
    assert one["noise_draws"] == two["noise_draws"] > 0  # the counter advances once per draw, not per replica


def test_devices_option_is_checked():
    with pytest.raises(ValueError, match="--devices must be at least 1"):
        TrainOptions(devices=0)
