"""Packaging and layering: the wheel installs only `scvae_hier`; the command line's help and the
tree clustering load no TensorFlow; the core never imports the analysis layer or a top-level `analyses` package; the pinned
set runs scanpy's neighbours on a large latent."""
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ["bounds", "choices", "data", "differential", "distributions", "files", "hierarchy", "initialisation", "metrics", "options",
        "outputs", "runs", "sampling", "training", "tree_clustering", "tree_shape"]


def test_wheel_installs_only_the_scvae_hier_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    wheel, = tmp_path.glob("scvae_hier-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"scvae_hier"}


def test_help_loads_no_tensorflow():
    code = ("import sys; from scvae_hier.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'scanpy')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_tree_clustering_loads_no_tensorflow():
    """The clustering of a latent into the tree is numpy / scikit-learn: analyses that regroup
    stored latents (and the tests of it) should not pay for TensorFlow's start-up."""
    code = ("import sys; import scvae_hier.tree_clustering, scvae_hier.tree_shape; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_core_never_imports_upward():
    for name in CORE + [f"models/{p.stem}" for p in (ROOT / "scvae_hier" / "models").glob("*.py")]:
        text = (ROOT / "scvae_hier" / f"{name}.py").read_text()
        imports = re.findall(r"^\s*(?:from|import)\s+(\S+)", text, flags=re.M)
        assert not [i for i in imports if i.startswith(("analyses", ".analysis", "..analysis", "scvae_hier.analysis",
                                                        ".api", "..api", ".pl", ".cli"))], name


def test_scanpy_neighbours_work_on_many_cells_in_the_pinned_set():
    """A user's plain `sc.pp.neighbors` on a latent of more than 8,192 cells (where scanpy switches
    to pynndescent) gives each cell its neighbours: with pynndescent 0.7.0 it raised "'csr_array'
    object has no attribute 'getnnz'" under scipy 1.17, so constraints.txt pins 0.5.13."""
    import anndata
    import numpy as np
    import scanpy as sc
    latent = np.random.default_rng(0).normal(size=(9000, 10)).astype(np.float32)
    adata = anndata.AnnData(np.zeros((9000, 0), dtype=np.float32), obsm={"latent": latent})
    sc.pp.neighbors(adata, use_rep="latent", n_neighbors=15)
    assert adata.obsp["distances"].shape == (9000, 9000)
    assert (adata.obsp["distances"].getnnz(axis=1) >= 14).all()        # every cell has its neighbours
