"""`save_hf` writes like `save_pretrained` (only its own files, each atomically,
normal permissions), `load_hf` rejects non-finite weights, and a `swajax train`
export carries what generation needs (tokenizer, eos)."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from swajax.hf_io import load_hf, save_hf
from tests.test_hf_io import CONFIGS, random_model


@pytest.fixture
def saved(tmp_path):
  directory = save_hf(random_model(CONFIGS["qwen2"]), tmp_path / "ckpt")
  return directory, load_file(directory / "model.safetensors")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_load_rejects_a_non_finite_weight_naming_the_tensor(saved, bad):
  directory, tensors = saved
  name = "model.layers.1.mlp.up_proj.weight"
  broken = tensors[name].copy()
  broken[3, 5] = bad
  save_file({**tensors, name: broken}, directory / "model.safetensors",
            metadata={"format": "pt"})
  with pytest.raises(ValueError, match=f"tensor '{name}' has non-finite values "
                     r"\(1 NaN/inf\)"):
    load_hf(directory)
