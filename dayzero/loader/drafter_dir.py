"""A DSpark drafter shipped in a directory of its own, loaded onto a target checkpoint
(`speculative_config={"method": "dspark", "model": <directory or built-in drafter name>}`).

The drafter directory holds the official DSpark tensors only (`mtp.0.*`, `mtp.1.*`, `mtp.2.*`, names,
shapes and dtypes as in V4-Flash-0731, reference/dspark.py) and a config.json that is the target's
config plus the `dspark_*` keys (as 0731's root config). The target's backbone tensors are read from
the target directory (its own `mtp.*`, an MTP module, is not read), the drafter's from the drafter
directory, both strictly: a missing, unexpected or misshapen tensor is named with its file, and a
config field that disagrees with the target's is named with both values.
`load_model(target, drafter=directory)` (loader/model_io.py) loads the two, under any layout.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path


from dayzero.config import ModelArgs
from dayzero.config_keys import _HUB_KEY_OF
from dayzero.loader.checkpoint import CheckpointError
from dayzero.loader.model_io import read_args

# the fields a drafter directory's config may (must) differ in from its target's
_DRAFTER_FIELDS = ("n_mtp_layers", "dspark_stages", "dspark_block_size", "dspark_noise_token_id",
                   "dspark_target_layer_ids", "dspark_markov_rank", "extra")


def drafter_args(target_path: str | os.PathLike, drafter_path: str | os.PathLike) -> ModelArgs:
    """The ModelArgs of target + drafter: the drafter directory's config, checked against the target's."""
    d = Path(drafter_path)
    if not d.is_dir():
        raise CheckpointError(f"speculative_config.model: {str(d)!r} is not a directory (a DSpark drafter "
                              "directory with config.json and its mtp.* tensors, or a built-in drafter name)")
    target, args = read_args(target_path), read_args(d)
    if not args.dspark_stages:
        raise CheckpointError(f"{d / 'config.json'}: no dspark_* keys (dspark_block_size, dspark_noise_token_id, "
                              "dspark_target_layer_ids, dspark_markov_rank): not a DSpark drafter directory")
    differ = [f"`{_HUB_KEY_OF.get(f.name, f.name)}`: drafter {getattr(args, f.name)!r}, target {getattr(target, f.name)!r}"
              for f in dataclasses.fields(ModelArgs)
              if f.name not in _DRAFTER_FIELDS and getattr(args, f.name) != getattr(target, f.name)]
    if differ:
        raise CheckpointError(f"{d / 'config.json'} disagrees with the target {Path(target_path) / 'config.json'} "
                              "(a drafter is trained on one target):\n  " + "\n  ".join(differ))
    return args
