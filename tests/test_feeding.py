"""CountBatches.as_dataset, the native tf.data pipeline that training feeds Keras instead of the
PyDataset: the same batches in the same order, and the same training as through the PyDataset."""
import keras
import numpy as np
import pytest
import scipy.sparse as sp

from scvae_hier.data import CountBatches
from scvae_hier.models import MixtureVAE

N, G = 53, 12   # 53 cells: the last batch of 16 is partial


def counts(seed=0):
    rng = np.random.default_rng(seed)
    return ((rng.random((N, G)) < 0.3) * rng.poisson(4.0, (N, G))).astype("float32")


@pytest.mark.parametrize("layout", ["csr", "dense"])
def test_dataset_gives_the_pydatasets_batches_epoch_after_epoch(layout):
    x = counts()
    matrix = sp.csr_matrix(x) if layout == "csr" else x
    covariates = np.eye(3, dtype="float32")[np.arange(N) % 3]
    labels = np.stack([np.arange(N) % 2, np.arange(N) % 5 - 1], axis=1).astype("int32")
    batches = CountBatches(matrix, 16, shuffle=True, seed=7, covariates=covariates, labels=labels)
    stream = iter(batches.as_dataset(first_epoch=3))
    for epoch in (3, 4):   # as_dataset's first epoch reads the order of counter 3, then 4
        batches.epoch = epoch
        for index in range(len(batches)):
            expected, got = batches[index], next(stream)
            assert sorted(got) == ["counts", "covariates", "labels"]
            for key in expected:
                np.testing.assert_array_equal(got[key].numpy(), expected[key])
    assert not np.array_equal(batches.order(), CountBatches(matrix, 16, shuffle=True, seed=7).order())
    in_order = list(CountBatches(matrix, 16).as_dataset())
    assert len(in_order) == 4
    np.testing.assert_array_equal(np.concatenate([b["counts"].numpy() for b in in_order]), x)


def test_csr_rows_with_duplicate_entries_sum_as_toarray_does():
    x = sp.csr_matrix((np.array([1.0, 2.0, 5.0], "float32"), np.array([0, 0, 3]), np.array([0, 2, 3])), shape=(2, 4))
    got = next(iter(CountBatches(x, 2).as_dataset()))["counts"].numpy()
    np.testing.assert_array_equal(got, x.toarray())


def _trained(feed_natively: bool) -> dict:
    keras.utils.set_random_seed(0)
    model = MixtureVAE(G, n_components=3, latent_dim=2, hidden=(8,), normalisation="none")
    model.build()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    batches = CountBatches(sp.csr_matrix(counts(1)), 16, shuffle=True, seed=3)
    validation = CountBatches(counts(2)[:20], 16)
    if feed_natively:
        return model.fit(batches, validation_data=validation, epochs=3, verbose=0).history
    # Keras's own fit, reading the CountBatches as a PyDataset in its own batch order (shuffle=False:
    # otherwise Keras also permutes a PyDataset's batch indices; training.fit passes it)
    return keras.Model.fit(model, batches, validation_data=validation, epochs=3, shuffle=False, verbose=0).history


def test_training_through_the_pipeline_equals_training_through_the_pydataset():
    """Same batches in the same epochs (Keras's extra on_epoch_end before the first epoch
    included): the loss and validation histories agree; an order off by one epoch would not."""
    native, pydataset = _trained(True), _trained(False)
    for key in ("loss", "val_elbo"):
        np.testing.assert_allclose(native[key], pydataset[key], rtol=1e-5)
