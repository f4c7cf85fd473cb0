"""Tiny random transformers models (torch CPU, eager attention) and the
comparisons the parity tests make on them."""

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def random_hf_model(config_cls: str, model_cls: str, **config_fields):
  """`transformers.<model_cls>` of `<config_cls>(**config_fields)` with eager
  attention and every parameter random (fixed seed): norms 1 + 0.1·N(0, 1),
  the rest 0.1·N(0, 1)."""
  config = getattr(transformers, config_cls)(**config_fields,
                                             attn_implementation="eager")
  torch.manual_seed(0)
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn_like(p)
      p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
  return model


def hf_logits(model, ids) -> np.ndarray:
  """transformers logits [B, T, V] of int ids [B, T]."""
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


@nnx.jit
def forward(model, ids):
  """swajax logits [B, T, V] of ids [B, T] (one compile per model and shape)."""
  return model(ids)


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def saved_checkpoint(model, directory, *, vocab_size: int, seq_len: int):
  """`model.save_pretrained(directory)` and (ids int32 [2, seq_len], its
  transformers logits [2, seq_len, V]) on seeded random ids."""
  model.save_pretrained(directory)
  ids = np.random.default_rng(0).integers(0, vocab_size, (2, seq_len))
  return np.asarray(ids, np.int32), hf_logits(model, ids)
