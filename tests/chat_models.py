"""A tiny random transformers Mistral (window 8) whose folder carries a chat
tokenizer (`tests.test_chat`'s byte-level BPE and ChatML template with
{% generation %} marks): the model the chat / eval / merge command tests run."""

from tests.hf_models import random_hf_model
from tests.test_chat import CHATML, make_tokenizer

HF_CHAT = dict(vocab_size=416, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, head_dim=24,
               sliding_window=8, max_position_embeddings=512, rms_norm_eps=1e-6)


def chat_model_folder(folder, *, tokenizer: bool = True):
  """Saves the model (and with `tokenizer` its chat tokenizer) in `folder`;
  returns the transformers model."""
  model = random_hf_model("MistralConfig", "MistralForCausalLM", **HF_CHAT)
  model.save_pretrained(folder)
  if tokenizer:
    make_tokenizer(folder, CHATML)
  return model
