"""What a trained model says about expression: denoised expression (posterior means of the
count law's shares), counts drawn from its posterior predictive law, differential expression
between groups of cells, and the marker genes of every node of the hierarchy. A mixin of the
API's model class (as scvi-tools' RNASeqMixin): it reads cells through the model's `_cells_of` /
`_outputs` / `_decode`; the statistics are in `differential.py`."""
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .choices import check_whole
from .data import SetupError
from .outputs import PREDICT_BATCH_SIZE


class ExpressionMixin:
    """get_normalized_expression, posterior_predictive_sample, differential_expression and
    hierarchy_markers."""

    def get_normalized_expression(self, adata=None, library_size=1.0, transform_batch=None, gene_list=None,
                                  n_samples=None, seed=0, batch=None) -> pd.DataFrame:
        """Denoised expression: the count law's mean as shares of the cell's expected total, times
        `library_size` (1: proportions, as scVI's default; 1e4: per 10,000 counts), [cells of adata,
        genes of the model or gene_list], NaN rows for cells left out. With a zero-inflated law
        the mean includes the structural zeros.

        n_samples: None decodes each cell's latent mean E_q[z|x] once (fast, deterministic); a
        number S averages the shares over S draws z ~ q(z|x) (seeded by `seed`), as scvi-tools
        does: the posterior mean of the expression, which the latent-mean decode approximates
        (README: 3% apart over all genes, sharp markers' class means up to 15-25%).
        transform_batch: decode every cell as if it came from this training batch, so cells from
        different batches are compared on one footing (the encoder still reads each cell's own
        batch). batch: read query cells from a batch the model never saw as this training batch."""
        if not np.isfinite(library_size) or library_size <= 0:
            raise ValueError(f"library_size must be a positive number of counts, got {library_size!r}.")
        check_whole("n_samples", n_samples, unit=" of draws", none_means="decode the latent mean")
        genes, columns = self._gene_columns(gene_list)
        if n_samples is None:                  # the latent means: the model's outputs give them
            out, rows, adata, (X, covariates) = self._outputs(adata, batch)
            latent = out["latent"]
        else:                                  # draws from q(z|x) read the counts themselves
            adata, X, covariates, rows = self._cells_of(adata, batch)
            latent = None
        shares = self._mean_shares(X, covariates, self._as_batch(covariates, transform_batch), n_samples, seed,
                                   latent=latent)
        values = (shares * library_size)[:, columns].astype(np.float32)
        return pd.DataFrame(self._by_cell(values, rows, adata.n_obs), index=adata.obs_names, columns=genes[columns])

    def _gene_columns(self, gene_list):
        """(the model's genes, the columns of those in gene_list; all of them for None)."""
        genes = pd.Index(self.module.metadata["genes"])
        columns = np.arange(len(genes)) if gene_list is None else genes.get_indexer(list(gene_list))
        missing = [g for g, c in zip(gene_list or [], columns) if c < 0]
        if missing:
            raise SetupError(f"gene_list names {len(missing)} gene(s) the model was not trained on: "
                             f"{missing[:10]}; the model's genes are in model.module.metadata['genes'].")
        return genes, columns

    def posterior_predictive_sample(self, adata=None, n_samples=1, gene_list=None, seed=0, batch=None) -> np.ndarray:
        """Counts drawn for each cell from the model: z ~ q(z|x), then x' ~ p(x | z) with the cell's
        own batch and (library_size="observed") its own total count, as scvi-tools' method of this
        name: [cells of adata, genes] for n_samples=1, else [cells, genes, n_samples], float32 with
        NaN rows for cells left out (dense: 4 bytes per cell, gene and draw; gene_list or a subset
        of cells for large data). Set beside the observed counts, they check the fit (a gene's
        share of zeros, its variance: README, "Posterior predictive checks"). Seeded."""
        import tensorflow as tf

        from .sampling import sample_counts

        check_whole("n_samples", n_samples, unit=" of draws")
        _, columns = self._gene_columns(gene_list)
        adata, X, covariates, rows = self._cells_of(adata, batch)
        rng = np.random.default_rng(seed)
        drawn = []
        for part, x, z in self._posterior_draws(X, covariates, int(n_samples), seed):
            own = None if covariates is None else tf.constant(covariates[part], tf.float32)
            log_library = tf.math.log(self.module.library(x))[:, 0]
            params = {k: v.numpy().astype(np.float64)[:, :, columns] for k, v in self._decode(z, own, log_library).items()}
            drawn.append(sample_counts(params, rng).transpose(0, 2, 1).astype(np.float32))    # [cells, genes, S]
        values = np.concatenate(drawn) if drawn else np.zeros((0, len(columns), int(n_samples)), np.float32)
        out = self._by_cell(values, rows, adata.n_obs)
        return out[:, :, 0] if n_samples == 1 else out

    def _posterior_draws(self, X, covariates, n_samples, seed):
        """(rows, counts, z [cells, n_samples, D] ~ q(z|x)) chunk by chunk, cells x draws per chunk
        within CELLS_TIMES_SAMPLES; each chunk's draws are keyed by (seed, its first row)."""
        import tensorflow as tf

        from .bounds import CELLS_TIMES_SAMPLES
        from .models.mixture import draw_latent

        step = max(1, min(PREDICT_BATCH_SIZE, CELLS_TIMES_SAMPLES // n_samples))
        for start in range(0, X.shape[0], step):
            part = slice(start, start + step)
            x = tf.constant(np.asarray(X[part].todense() if sp.issparse(X) else X[part]), tf.float32)
            own = None if covariates is None else tf.constant(covariates[part], tf.float32)
            yield part, x, draw_latent(*self.module.posterior_mixture(x, own), n_samples, tf.constant([seed, start], tf.int64))

    def _as_batch(self, covariates, transform_batch):
        """The covariates the decoder reads: every cell's as one training batch's (None: their own)."""
        if transform_batch is None:
            return covariates
        index = self._training_batch(transform_batch, "transform_batch")
        moved = np.zeros_like(covariates)
        moved[:, index] = 1.0
        return moved

    def differential_expression(self, groupby, group1, group2=None, adata=None, delta=0.25, fdr_target=0.05,
                                max_cells=2000, n_draws=4, n_replicates=200, transform_batch=None, seed=0,
                                batch=None) -> pd.DataFrame:
        """Genes whose denoised expression differs between two groups of cells, one row per gene of
        the model, most significant first (`scvae_hier.differential`): lfc_mean / median / std,
        p_value, p_value_adjusted, is_de_fdr, proba_de, bayes_factor, scale1 / 2, raw_mean1 / 2,
        non_zeros_proportion1 / 2; the group sizes in `.attrs`.

        groupby: a column of adata.obs (true labels, or predictions joined from predict_levels);
        group1: a value of it (or a list), or a class above values of it ("T cell" takes the CD4 T
        and CD8 T cells of a level-3 column). group2: None, group1's siblings in the hierarchy (the
        other classes under its parent: "CD8 T" against "CD4 T", not against every other cell; an
        only child meets its parent's siblings), else the rest; "rest": every other cell with a
        value; or values / classes as for group1.
        The log2 fold change is the difference of the groups' mean log2 expression (one count per
        10,000 added); its spread comes from n_replicates resamplings of each group's cells (at most
        max_cells of each, n_draws draws from q(z|x) per cell). p_value tests |LFC| <= delta;
        is_de_fdr is Benjamini-Hochberg's adjusted p-value <= fdr_target. transform_batch: decode
        both groups as from one training batch, so groups from different batches are compared on
        one footing."""
        adata, X, covariates, rows = self._cells_of(adata, batch)
        values = self._obs_values(adata, groupby, rows)
        return self._differential(X, covariates, values, groupby, group1, group2, delta=delta, fdr_target=fdr_target,
                                  max_cells=max_cells, n_draws=n_draws, n_replicates=n_replicates,
                                  transform_batch=transform_batch, seed=seed)

    @staticmethod
    def _obs_values(adata, groupby, rows) -> np.ndarray:
        """The model's cells' values of an obs column, as text ("" for missing)."""
        if groupby not in adata.obs:
            raise SetupError(f"groupby={groupby!r} is not a column of adata.obs (it has {list(adata.obs.columns)}); "
                             f"join the predictions first (adata.obs = adata.obs.join(model.predict_levels())) "
                             f"or name a label column.")
        return _as_text(adata.obs[groupby].astype(object).to_numpy()[rows])

    def _differential(self, X, covariates, values, groupby, group1, group2, delta, fdr_target, max_cells, n_draws,
                      n_replicates, transform_batch, seed) -> pd.DataFrame:
        """differential_expression on the model's prepared cells (counts X, covariates, values)."""
        from .differential import change_test, log_shares, resampled_means

        for name, value in (("max_cells", max_cells), ("n_draws", n_draws), ("n_replicates", n_replicates)):
            check_whole(name, value)
        first, second, second_name = self._groups(groupby, values, group1, group2)
        rng = np.random.default_rng(seed)
        decode = self._as_batch(covariates, transform_batch)
        log_means, scales = [], []
        for index, members in enumerate((first, second)):
            cells = np.flatnonzero(members)
            if len(cells) > max_cells:
                cells = np.sort(rng.choice(cells, size=int(max_cells), replace=False))
            take = lambda a: None if a is None else a[cells]  # noqa: E731
            shares = self._mean_shares(X[cells], take(covariates), take(decode), int(n_draws), 2 * seed + index,
                                       average=False)                                  # [cells, draws, genes]
            log_means.append(resampled_means(log_shares(shares), n_replicates, rng))
            scales.append(shares.mean(axis=(0, 1)))
        genes = list(self.module.metadata["genes"])
        table = change_test(log_means[0], log_means[1], genes, delta=delta, fdr_target=fdr_target)
        for index, (members, scale) in enumerate(zip((first, second), scales), start=1):
            table[f"scale{index}"] = pd.Series(scale, index=genes)
            counts = X[members]
            table[f"raw_mean{index}"] = pd.Series(np.asarray(counts.mean(axis=0)).ravel(), index=genes)
            table[f"non_zeros_proportion{index}"] = pd.Series(np.asarray((counts > 0).mean(axis=0)).ravel(), index=genes)
        table["group1"] = ", ".join(map(str, np.atleast_1d(group1)))
        table["group2"] = second_name
        table.attrs.update(cells1=int(first.sum()), cells2=int(second.sum()))
        return table

    def hierarchy_markers(self, adata=None, groupby=None, n_genes=10, batch=None, **options) -> pd.DataFrame:
        """The marker genes of every node of the hierarchy against its siblings, one table: for each
        class that splits from its siblings (coarse to fine; a class alone under its parent is the
        same cells as its parent and is listed once), the genes called by `differential_expression`
        and up in the node, at most n_genes, largest fold change first. Columns: level, node,
        against, rank, gene, lfc_mean, p_value_adjusted, scale1, scale2, cells1, cells2.

        groupby: an obs column of class names (any level; coarser nodes take the cells under
        them); default: the model's finest-level predictions (`predict_levels`), so no labels are
        needed. options: differential_expression's (delta, fdr_target, max_cells, transform_batch, ...)."""
        import inspect

        if self.hierarchy is None:
            raise SetupError("hierarchy_markers needs a model trained with a hierarchy (labels); use "
                             "differential_expression with groups of your own.")
        check_whole("n_genes", n_genes, unit=" of genes")
        defaults = {name: p.default for name, p in inspect.signature(self.differential_expression).parameters.items()
                    if name not in ("groupby", "group1", "group2", "adata", "batch")}
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise TypeError(f"hierarchy_markers got unknown options {unknown}; it takes {sorted(defaults)}.")
        settings = {**defaults, **options}
        if groupby is None:                       # the model's own calls; the counts are read once
            groupby = "scvae_" + self.hierarchy.levels[-1]
            outputs = self._outputs(adata, batch)
            _, rows, adata_read, (X, covariates) = outputs
            table = self._named_levels(outputs, adata is None or adata is self.adata)
            values, adata = _as_text(table[groupby].astype(object).to_numpy()[rows]), adata_read
        else:
            adata, X, covariates, rows = self._cells_of(adata, batch)
            values = self._obs_values(adata, groupby, rows)
        tables, seen = [], set()
        for level, level_name in enumerate(self.hierarchy.levels):
            for node in self.hierarchy.classes(level):
                if not self.hierarchy.siblings([node]):
                    continue
                try:
                    first, second, _ = self._groups(groupby, values, node, None)
                except SetupError:                # a class with no cells here, or siblings without
                    continue
                key = (np.flatnonzero(first).tobytes(), np.flatnonzero(second).tobytes())
                if key in seen:
                    continue
                seen.add(key)
                de = self._differential(X, covariates, values, groupby, node, None, **settings)
                up = de[de["is_de_fdr"] & (de["lfc_mean"] > 0)].sort_values("lfc_mean", ascending=False).head(n_genes)
                tables.append(pd.DataFrame({
                    "level": level_name, "node": node, "against": de["group2"].iloc[0],
                    "rank": np.arange(1, len(up) + 1), "gene": up.index,
                    **{c: up[c].to_numpy() for c in ("lfc_mean", "p_value_adjusted", "scale1", "scale2")},
                    "cells1": de.attrs["cells1"], "cells2": de.attrs["cells2"]}))
        return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
            columns=["level", "node", "against", "rank", "gene", "lfc_mean", "p_value_adjusted", "scale1", "scale2",
                     "cells1", "cells2"])

    def _groups(self, groupby, values, group1, group2):
        """Boolean masks of the two groups' cells (values: text per model cell) and a name for the
        second. A group is the cells whose value is one of its names or lies under one in the
        hierarchy; group2=None reads as group1's siblings in the hierarchy (the rest where it has none)."""
        under = self.hierarchy.under if self.hierarchy is not None else (lambda v, n: np.isin(v, list(n)))
        wanted = [str(g) for g in np.atleast_1d(group1)]
        held = sorted(set(values) - {""})
        first = under(values, wanted)
        if not first.any():
            raise SetupError(f"group1 {wanted} matches no value of adata.obs[{groupby!r}] among the model's cells "
                             f"(it holds {held}), nor a class above one.")
        if group2 is None:
            group2 = (self.hierarchy.siblings(wanted) if self.hierarchy is not None else []) or "rest"
        if isinstance(group2, str) and group2 == "rest":
            second, name = (values != "") & ~first, "rest"
        else:
            others = [str(g) for g in np.atleast_1d(group2)]
            second, name = under(values, others), ", ".join(others)
        if (first & second).any():
            raise SetupError(f"group1 {wanted} and group2 ({name}) share {int((first & second).sum())} cells; "
                             f"a cell can be in one group only.")
        if not second.any():
            raise SetupError(f"group2 ({name}) matches no value of adata.obs[{groupby!r}] among the model's cells "
                             f"(it holds {held}), nor a class above one.")
        return first, second, name

    def _mean_shares(self, X, covariates, decode_covariates, n_samples, seed, latent=None, average=True) -> np.ndarray:
        """[cells, genes] decoded expression shares, averaged over n_samples draws z ~ q(z|x)
        (None: decoded once at `latent`, the latent means); [cells, draws, genes] with average=False.
        The encoder reads `covariates`, the decoder `decode_covariates`; cells x draws per decoder
        call stay within CELLS_TIMES_SAMPLES."""
        import tensorflow as tf

        if n_samples is None:
            chunks = (slice(start, start + PREDICT_BATCH_SIZE) for start in range(0, X.shape[0], PREDICT_BATCH_SIZE))
            parts = ((part, None, tf.constant(latent[part])[:, None]) for part in chunks)
        else:
            parts = self._posterior_draws(X, covariates, int(n_samples), seed)
        shares = []
        for part, _, z in parts:
            decode = None if decode_covariates is None else tf.constant(decode_covariates[part], tf.float32)
            # The log library is a placeholder: the shares below do not depend on it.
            params = self._decode(z, decode, log_library=tf.zeros(tf.shape(z)[0]))
            mean = self.module.decoder.likelihood.mean(params).numpy().astype(np.float64)   # [cells, S, G]
            part_shares = mean / mean.sum(axis=-1, keepdims=True)
            shares.append(part_shares.mean(axis=1) if average else part_shares)
        return np.concatenate(shares)


def _as_text(values) -> np.ndarray:
    """Class names as text, "" for missing (NaN, None)."""
    return np.array([str(v) if pd.notna(v) else "" for v in values], dtype=object)
