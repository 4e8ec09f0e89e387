"""Install scvae-hier: hierarchical-prior VAEs for single-cell RNA-seq counts."""
from pathlib import Path

from setuptools import find_packages, setup

# The pinned set below installs and imports together on Python 3.11 (checked from a clean venv).
# TFP 0.25 needs tf-keras even for tfp.distributions; TF 2.21 wants h5py < 3.15;
# scikit-misc provides the loess fit behind scanpy's seurat_v3 gene selection.
REQUIREMENTS = [
    "tensorflow==2.21.0",
    "tf-keras==2.21.0",
    "tensorflow-probability==0.25.0",
    "keras>=3.15,<3.16",
    "numpy>=2.4,<2.5",
    "scipy>=1.17,<1.18",
    "h5py>=3.10,<3.15",
    "anndata>=0.12,<0.13",
    "scanpy>=1.11,<1.12",
    "scikit-misc>=0.5,<0.6",
    "scikit-learn>=1.5,<2",
    "threadpoolctl>=3.1,<4",  # one BLAS thread for the peers' PCA and kNN (analysis/leiden.py); scikit-learn's own dependency
    "pandas>=2.2,<3",
    "matplotlib>=3.8,<4",
    "pyyaml>=6,<7",
    "loompy>=3.0,<3.1",
    "leidenalg>=0.10,<0.13",  # Leiden for the experiment's peers (scanpy's own Leiden backend)
]

setup(
    name="scvae-hier",
    version="0.2.0",
    description="scVAE-style variational auto-encoders with cell-type-hierarchy priors",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["scvae_hier", "scvae_hier.*"]),
    install_requires=REQUIREMENTS,
    extras_require={"test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"]},
    entry_points={"console_scripts": ["scvae-hier=scvae_hier.cli:main"]},
)
