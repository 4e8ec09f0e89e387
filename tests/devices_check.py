"""Run by tests/test_devices.py in a fresh process (the CPU can be split into logical devices
only before TensorFlow runs anything): the same global batches on one device and on two
logical CPU devices under MirroredStrategy; prints the histories and weights as JSON."""
import json

from scvae_hier.training import KLWarmUp, compile_model, distribution_strategy, in_scope

strategy = distribution_strategy(2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})  # as tests/conftest.py

from scvae_hier.data import CountBatches  # noqa: E402
from scvae_hier.models import MixtureVAE  # noqa: E402
from scvae_hier.options import TrainOptions  # noqa: E402

rng = np.random.default_rng(0)
counts = rng.poisson(rng.gamma(2.0, 1.0, (256, 30))).astype("float32")


def run(strategy, options):
    keras.utils.set_random_seed(0)  # Keras draws initializer seeds when layers are constructed
    with in_scope(strategy):
        # Layer normalisation: batch normalisation would compute its statistics per replica.
        model = MixtureVAE(30, n_components=3, latent_dim=2, hidden=(16,), normalisation="layer", seed=0)
        compile_model(model, options, counts)
        # Plain SGD: Adam's normalised steps would hide gradients scaled N-fold on N replicas.
        model.compile(optimizer=keras.optimizers.SGD(1e-3), jit_compile=model.jit_compile)
    history = model.fit(CountBatches(counts, 64, shuffle=True, seed=0), epochs=3, shuffle=False, verbose=0,
                        callbacks=[KLWarmUp(1)])
    return {"history": history.history, "weights": [w.tolist() for w in model.get_weights()],
            "noise_draws": int(model.noise_draws.numpy()), "replicas": model.distribute_strategy.num_replicas_in_sync,
            "jit_compile": bool(model.jit_compile)}


one = run(None, TrainOptions(learning_rate=1e-2, xla=False))
two = run(strategy, TrainOptions(learning_rate=1e-2, xla=True, devices=2))  # XLA falls back to off
print(json.dumps({"one": one, "two": two}))
