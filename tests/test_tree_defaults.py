"""TreeVAE's defaults are the configuration chosen on validation cells (analyses/tuning/tree/NOTES.md,
`k2l`): learnable p(c), re-seeding at epoch 5 with 2 clusters per leaf, a 10-step final refit
re-seeded with 4 clusters per leaf (refit_rules.py), in
the constructor and on the command line alike; the other models keep a uniform p(y)."""
import pytest

from scvae_hier.cli import build_parser
from scvae_hier.models import TreeVAE
from scvae_hier.options import TrainOptions


def test_constructor_defaults_are_the_tuned_configuration():
    model = TreeVAE(7, level_sizes=(2, 3), parents=[[0, 0, 1]])
    assert (model.prior_probabilities, model.reseed_epochs, model.reseed_clusters, model.final_refit,
            model.final_refit_clusters) == ("learnable", (5,), 2, 10, 4)


@pytest.mark.parametrize("argv, expected", [
    (["--model", "tree"], "learnable"),
    (["--model", "tree", "--prior-probabilities", "uniform"], "uniform"),   # an explicit choice stays
    (["--model", "mixture"], "uniform"),
    (["--model", "momix"], "uniform"),
])
def test_command_line_prior_probabilities_follow_the_model(argv, expected):
    arguments = vars(build_parser().parse_args(["train", "data.h5ad", *argv]))
    options = TrainOptions.from_dict(arguments)
    assert options.prior_probabilities == expected
    assert (options.reseed_epochs, options.reseed_clusters, options.final_refit, options.final_refit_clusters) == (
        (5,), 2, 10, 4)
