"""The few lines with which TRIDENT and CLAM read a feature file, re-implemented as they are, so the
tests check our HDF5 files against the readers that matter (see outputs/features_h5.py)."""

from __future__ import annotations

import h5py
import torch


def trident_read(path):
    """TRIDENT mahmoodlab/TRIDENT@a91fa84 trident/wsi_objects/WSI.py:1103-1105."""
    with h5py.File(path, "r") as f:
        coords = f["coords"][:]
        patch_features = f["features"][:]
        coords_attrs = dict(f["coords"].attrs)
    return coords, patch_features, coords_attrs


def clam_read(path):
    """CLAM mahmoodlab/CLAM@53e2409 dataset_modules/dataset_generic.py:347-349 (features as a tensor)."""
    with h5py.File(path, "r") as hdf5_file:
        features = hdf5_file["features"][:]
        coords = hdf5_file["coords"][:]
    return torch.from_numpy(features), coords
