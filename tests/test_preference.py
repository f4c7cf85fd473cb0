"""Preference tuning (`--stage dpo`): parity with TRL and transformers, the
pair data, the config's refusals, the step-1 loss and a LoRA run that learns.

Parity (fp32, a tiny random transformers Mistral with window 8 and pairs of
18 to 30 tokens per sequence): swajax's per-pair answer log-probabilities
(`preference.pair_log_probs` on one row per pair: chosen and rejected as two
segments) equal those of transformers eager run on each sequence alone, and
differ with the window removed (the negative control). Each loss and its
metrics equal TRL's own code fed with the transformers log-probabilities:
`DPOTrainer._compute_loss` (sigmoid, hinge, ipo) with TRL's per-token
log-probs (`selective_log_softmax` of the transformers logits, standing in
for its fused LM head) and precomputed reference log-probs; `CPOTrainer.cpo_loss`
for the label-smoothed sigmoid (cDPO: fed the log-ratios) and SimPO (fed
`get_batch_logps(average_log_prob=True)`); `ORPOTrainer.odds_ratio_loss`
for ORPO's odds-ratio term, whose NLL term is the chosen answers' mean
token NLL (TRL's ORPO also counts the prompt tokens there: docs/preference.md).
"""

import collections
import json
import math
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swajax.io.hf import load_hf
from swajax.text.tokenizers import DataError, load_tokenizer
from swajax.training import optimizer as optimizer_lib, pref_data, preference
from swajax.training.config import TrainConfig
from swajax.training.data import Document
from tests import hf_models

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.utils import selective_log_softmax  # noqa: E402

TOLERANCE = 1e-5  # fp32 sums over <= 30 tokens
WINDOW, VOCAB = 8, 128
HF_FIELDS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=256, sliding_window=WINDOW,
                 rms_norm_eps=1e-6)
SEQ = 64  # one row holds a pair


def _pairs(count=4, seed=0):
  """Pairs of random tokens: a shared prompt, answers of different lengths."""
  rng = np.random.default_rng(seed)
  pairs = []
  for _ in range(count):
    prompt = rng.integers(0, VOCAB, rng.integers(8, 12))
    sides = []
    for length in rng.integers(10, 19, 2):
      tokens = np.concatenate([prompt, rng.integers(0, VOCAB, length)]).astype(np.int32)
      sides.append(Document(tokens, np.arange(len(tokens)) >= len(prompt)))
    pairs.append(pref_data.Pair(*sides))
  return pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(swajax pair log-probs {"policy", "reference", "windowless" (the policy
  without windows)}: (logps [P, 2], counts [P, 2]); pair rows; the HF tensors
  input ids / labels [2P, L] (chosen rows first) and logits of the policy and
  the reference)."""
  policy_hf = hf_models.random_hf_model("MistralConfig", "MistralForCausalLM", **HF_FIELDS)
  reference_hf = hf_models.random_hf_model("MistralConfig", "MistralForCausalLM",
                                           **HF_FIELDS)
  with torch.no_grad():  # a reference near the policy, as after some training
    generator = torch.Generator().manual_seed(1)
    for p in reference_hf.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=generator))
  models = []
  for name, hf in (("policy", policy_hf), ("reference", reference_hf)):
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    models.append(load_hf(folder, dtype=jnp.float32, attn_impl="xla"))
  pairs = _pairs()
  rows = pref_data.pair_rows(pairs, SEQ, pad_id=0)
  docs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
  length = max(len(d.tokens) for d in docs)
  ids = np.zeros((len(docs), length), np.int64)
  labels = np.full((len(docs), length), -100, np.int64)
  attention = np.zeros((len(docs), length), np.int64)
  for i, d in enumerate(docs):  # right padding, as TRL's collator
    ids[i, :len(d.tokens)] = d.tokens
    labels[i, :len(d.tokens)] = np.where(d.trained, d.tokens, -100)
    attention[i, :len(d.tokens)] = 1
  hf = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attention),
        "labels": torch.tensor(labels)}
  with torch.no_grad():
    hf["logits"] = {name: m(input_ids=hf["input_ids"], attention_mask=hf["attention_mask"]
                            ).logits for name, m in (("policy", policy_hf),
                                                     ("reference", reference_hf))}
  policy, reference = models
  ours = {name: _swajax_logps(model, rows) for name, model in (
      ("policy", policy), ("reference", reference),
      ("windowless", policy.with_full_attention()))}
  return ours, rows, hf


@jax.jit
def _swajax_logps(model, rows):
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  logits = model(batch["input_ids"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"])
  return preference.pair_log_probs(logits, batch)


def _hf_token_logps(logits, labels):
  """TRL's per-token log-probs [N, L - 1] of the answer tokens (0 elsewhere)."""
  targets = labels[:, 1:]
  logps = selective_log_softmax(logits[:, :-1], targets.clamp(min=0))
  return torch.where(targets == -100, 0.0, logps)


def test_pair_log_probs_match_transformers_with_windows(setup):
  ours, rows, hf = setup
  assert rows["segment_ids"].max() == 2 and (rows["positions"].max(1) > 2 * WINDOW).all()
  logps, counts = ours["policy"]
  sums = _hf_token_logps(hf["logits"]["policy"], hf["labels"]).sum(1).numpy()
  expected = np.stack(np.split(sums, 2), axis=1)  # [P, 2]
  chex.assert_trees_all_close(logps, expected, atol=TOLERANCE)
  expected_counts = np.stack(np.split((hf["labels"][:, 1:] != -100).sum(1).numpy(), 2), 1)
  np.testing.assert_array_equal(counts, expected_counts)
  # Negative control: without the windows the log-probabilities differ.
  windowless, _ = ours["windowless"]
  assert float(jnp.max(jnp.abs(windowless - expected))) > 1e-2


def _options(loss, **fields):
  config = TrainConfig(stage="dpo", pref_loss=loss, **fields)
  return optimizer_lib.StepOptions.from_config(config)


def _ours(setup, options):
  ours, _, _ = setup
  (logps, counts), (ref_logps, _) = ours["policy"], ours["reference"]
  losses, metrics = preference.pair_losses(logps, counts, ref_logps, options)
  return float(jnp.mean(losses)), {k: float(jnp.mean(v)) for k, v in metrics.items()}


class _FusedHead(torch.nn.Module):
  """The transformers model as TRL's DPOTrainer calls it (`fused_lm_head`):
  the outputs its loss reads, from the real logits."""

  def __init__(self, logits):
    super().__init__()
    self.logits = logits

  def forward(self, labels, **_):
    zeros = torch.zeros(labels[:, 1:].shape)
    return types.SimpleNamespace(
        log_probs=_hf_token_logps(self.logits, labels), entropy=zeros,
        mean_logits=zeros, is_top1=zeros.bool())


def _trl_dpo(setup, loss, beta):
  """DPOTrainer._compute_loss on the HF log-probs: (loss, {metric: value})."""
  _, _, hf = setup
  ref = _hf_token_logps(hf["logits"]["reference"], hf["labels"]).sum(1)
  ref_chosen, ref_rejected = ref.chunk(2)
  accelerator = types.SimpleNamespace(device="cpu", gather=lambda x: x,
                                      gather_for_metrics=lambda x: x)
  model = _FusedHead(hf["logits"]["policy"]).train()
  trainer = types.SimpleNamespace(
      model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
      precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss],
      loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
      _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0,
      _tp_size=1, args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
  inputs = {"input_ids": hf["input_ids"], "attention_mask": hf["attention_mask"],
            "completion_mask": (hf["labels"] != -100).long(),
            "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
  value = trl.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
  return float(value), {k: v[0] for k, v in trainer._metrics["train"].items()}


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo"])
def test_reference_losses_match_trl_dpo_trainer(setup, loss):
  beta = 0.3
  ours, metrics = _ours(setup, _options(loss, pref_beta=beta))
  theirs, trl_metrics = _trl_dpo(setup, loss, beta)
  assert abs(ours - theirs) < TOLERANCE, (ours, theirs)
  for name in METRICS:
    assert abs(metrics[name] - trl_metrics[name]) < TOLERANCE, name
  assert 0 < metrics["rewards/accuracies"] < 1  # the pairs disagree: a real check


def _cpo(loss, beta, smoothing, gamma=0.0):
  return types.SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=smoothing,
                               loss_type=loss, simpo_gamma=gamma,
                               accelerator=types.SimpleNamespace(device="cpu"))


def _hf_sides(setup, name, average):
  _, _, hf = setup
  logps = CPOTrainer.get_batch_logps(hf["logits"][name], hf["labels"].clone(),
                                     average_log_prob=average)
  return logps.chunk(2)


def test_label_smoothed_sigmoid_matches_trl_cdpo(setup):
  beta, eps = 0.3, 0.2
  ours, metrics = _ours(setup, _options("sigmoid", pref_beta=beta, pref_label_smoothing=eps))
  policy, reference = _hf_sides(setup, "policy", False), _hf_sides(setup, "reference", False)
  ratios = [p - r for p, r in zip(policy, reference)]
  losses, chosen, rejected = CPOTrainer.cpo_loss(_cpo("sigmoid", beta, eps), *ratios)
  assert abs(ours - float(losses.mean())) < TOLERANCE
  assert abs(metrics["rewards/margins"] - float((chosen - rejected).mean())) < TOLERANCE


def test_simpo_matches_trl_cpo(setup):
  beta, gamma, eps = 2.0, 0.7, 0.1
  ours, metrics = _ours(setup, _options("simpo", pref_beta=beta, simpo_gamma=gamma,
                                        pref_label_smoothing=eps))
  chosen_logps, rejected_logps = _hf_sides(setup, "policy", True)
  losses, chosen, rejected = CPOTrainer.cpo_loss(_cpo("simpo", beta, eps, gamma),
                                                 chosen_logps, rejected_logps)
  assert abs(ours - float(losses.mean())) < TOLERANCE
  for name, value in (("rewards/chosen", chosen), ("rewards/rejected", rejected),
                      ("rewards/accuracies", (chosen > rejected).float()),
                      ("logps/chosen", chosen_logps), ("logps/rejected", rejected_logps)):
    assert abs(metrics[name] - float(value.mean())) < TOLERANCE, name


def test_orpo_matches_trl_odds_ratio_loss(setup):
  beta = 0.25
  ours, metrics = _ours(setup, _options("orpo", pref_beta=beta))
  chosen_logps, rejected_logps = _hf_sides(setup, "policy", True)
  trainer = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device="cpu"))
  losses, chosen, rejected, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
      trainer, chosen_logps, rejected_logps)
  nll = -float(chosen_logps.mean())  # the chosen answers' mean token NLL, per pair
  assert abs(ours - (nll - float(losses.mean()))) < TOLERANCE
  for name, value in (("rewards/chosen", chosen), ("rewards/rejected", rejected),
                      ("log_odds_ratio", ratio), ("log_odds_chosen", log_odds),
                      ("nll_loss", torch.tensor(nll))):
    assert abs(metrics[name] - float(value.mean())) < TOLERANCE, name


def test_pref_ftx_adds_the_chosen_nll(setup):
  base, metrics = _ours(setup, _options("hinge"))
  with_ftx, _ = _ours(setup, _options("hinge", pref_ftx=0.5))
  chosen_logps, _ = _hf_sides(setup, "policy", True)
  assert abs(with_ftx - base - 0.5 * -float(chosen_logps.mean())) < TOLERANCE


# ----- data ---------------------------------------------------------------------------

def _write(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                          for r in records))
  return path


def _answer_text(tokenizer, doc):
  return tokenizer.decode(doc.tokens[doc.trained].tolist())


def test_pair_formats_train_the_answers_only(tmp_path):
  tokenizer = load_tokenizer(None)
  user = lambda text: {"role": "user", "content": text}
  bot = lambda text: {"role": "assistant", "content": text}
  path = _write(tmp_path / "pairs.jsonl", [
      {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
      {"prompt": [user("hi"), bot("hey"), user("how are you?")],
       "chosen": [bot("fine")], "rejected": [bot("bad")]},
      {"conversations": [{"from": "human", "value": "hi"}],
       "chosen": {"from": "gpt", "value": "hello"},
       "rejected": {"from": "gpt", "value": "go away"}},
  ])
  pairs = [pair for _, pair in pref_data.read_pairs(path, tokenizer)]
  assert [tokenizer.decode(p.chosen.tokens[p.chosen.trained].tolist()) for p in pairs
          ][0] == "4"  # + eos, which decodes to nothing
  assert _answer_text(tokenizer, pairs[1].chosen) == "fine<|im_end|>"
  assert _answer_text(tokenizer, pairs[1].rejected) == "bad<|im_end|>"  # not "hey"
  assert _answer_text(tokenizer, pairs[2].rejected) == "go away<|im_end|>"
  rows = pref_data.pair_rows(pairs, 512, pad_id=tokenizer.pad_id)
  assert rows["input_ids"].shape == (3, 512)  # one pair per row
  np.testing.assert_array_equal(np.unique(rows["segment_ids"]), [0, 1, 2])


@pytest.mark.parametrize("record, match", [
    ({"prompt": "a", "chosen": "b"}, "line 2: expected an object with 'chosen' and 'rejected'"),
    ({"prompt": "a", "chosen": "b", "rejected": 3}, "line 2: 'rejected': expected a string"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [
        {"role": "user", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]},
     "line 2: 'chosen': expected the conversation to end with an assistant turn"),
    ("{not json", "line 2 is not JSON"),
])
def test_bad_pair_record_names_file_and_line(tmp_path, record, match):
  path = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                         record])
  with pytest.raises(DataError, match=f"data='{path}': {match}"):
    pref_data.read_pairs(path, load_tokenizer(None))


def test_too_long_pairs_are_truncated_dropped_or_refused():
  pairs = _pairs(3)  # each sequence 18 to 30 tokens
  short = pref_data.Pair(*(Document(d.tokens[:12], d.trained[:12]) for d in pairs[0]))
  with pytest.raises(DataError, match="3 of 4 preference pairs are longer than seq_len=40"):
    pref_data.fit_pairs([*pairs, short], 40, "split")
  kept, note = pref_data.fit_pairs([*pairs, short], 40, "drop")
  assert kept == [short] and "3 of 4 preference pairs" in note and "dropped" in note
  kept, note = pref_data.fit_pairs([*pairs, short], 40, "truncate")
  assert len(kept) == 4 and "truncated" in note
  assert all(len(p.chosen.tokens) + len(p.rejected.tokens) <= 40 for p in kept)
  rows = pref_data.pair_rows(kept, 40, pad_id=0)
  assert (preference.valid_pairs(preference.pair_log_probs(
      jnp.zeros((4, 40, VOCAB)), {k: jnp.asarray(v) for k, v in rows.items()})[1])).all()


# ----- config -------------------------------------------------------------------------

@pytest.mark.parametrize("fields, match", [
    (dict(pref_loss="ipo"), "pref_loss='ipo' with stage='sft': expected stage='dpo'"),
    (dict(stage="ppo"), "stage='ppo': expected one of"),
    (dict(stage="dpo", pref_loss="kto"), "pref_loss='kto': expected one of"),
    (dict(stage="dpo", simpo_gamma=0.5), "simpo_gamma=0.5 with pref_loss='sigmoid'"),
    (dict(stage="dpo", pref_loss="hinge", pref_label_smoothing=0.1),
     "pref_label_smoothing=0.1 with pref_loss='hinge'"),
    (dict(stage="dpo", pref_label_smoothing=0.5), "expected a float in \\[0, 0.5\\)"),
    (dict(stage="dpo", pref_beta=0.0), "pref_beta=0.0: expected a float > 0"),
    (dict(stage="dpo", pref_loss="simpo", precompute_ref=True), "simpo uses no reference"),
    (dict(stage="dpo", train_prompt=True), "train_prompt=True with stage='dpo'"),
])
def test_config_refuses_preference_settings_where_they_do_not_apply(fields, match):
  with pytest.raises(ValueError, match=match):
    TrainConfig(**fields)


def test_reference_source():
  assert TrainConfig(stage="dpo", lora_rank=4).reference == "adapters_off"
  assert TrainConfig(stage="dpo").reference == "frozen_copy"
  assert TrainConfig(stage="dpo", precompute_ref=True).reference == "precomputed"
  assert TrainConfig(stage="dpo", pref_loss="orpo").reference == "none"
  assert math.isclose(TrainConfig(stage="dpo").pref_beta, 0.1)
