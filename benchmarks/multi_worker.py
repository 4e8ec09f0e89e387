"""Try MultiWorkerMirroredStrategy with two worker processes on the loopback interface.

    python benchmarks/multi_worker.py                  # starts both workers, prints what each reported
    BATCHES=array python benchmarks/multi_worker.py    # the same with a plain array instead of dict batches

Each worker gets TF_CONFIG with 127.0.0.1 ports, builds a small MixtureVAE in the strategy's
scope and runs Keras' fit on the same synthetic counts for two epochs (global batch 64). Prints
each worker's loss history, or the error it ended with. Loopback only; both processes stop by
themselves (120 s limit)."""
import json
import os
import socket
import subprocess
import sys


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(index, ports):
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                          "task": {"type": "worker", "index": index}})
    import keras
    import numpy as np
    import tensorflow as tf

    from scvae_hier.data import CountBatches
    from scvae_hier.models import MixtureVAE
    from scvae_hier.training import KLWarmUp

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    counts = np.random.default_rng(0).poisson(2.0, (256, 30)).astype("float32")
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = MixtureVAE(30, n_components=3, latent_dim=2, hidden=(16,), normalisation="layer", seed=0)
        model.build()
        model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    if os.environ.get("BATCHES", "dict") == "dict":  # the package's own dict batches
        data, batch_size = CountBatches(counts, 64, shuffle=True, seed=0), None
    else:                                             # a plain array, Keras batching it
        data, batch_size = counts, 64
    history = model.fit(data, batch_size=batch_size, epochs=2, shuffle=False, verbose=0, callbacks=[KLWarmUp(1)])
    print(json.dumps({"worker": index, "replicas": strategy.num_replicas_in_sync, "loss": history.history["loss"]}))


def main():
    ports = [free_port(), free_port()]
    procs = [subprocess.Popen([sys.executable, __file__, str(i), *map(str, ports)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for i, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "\n(timed out after 120 s)"
        lines = [line for line in out.splitlines() if line.startswith("{")]
        print(f"worker {i}: exit {proc.returncode}: " + (lines[-1] if lines else err.strip().splitlines()[-1]))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        worker(int(sys.argv[1]), [int(p) for p in sys.argv[2:]])
    else:
        main()
