"""`swajax.generate`: greedy parity with transformers, the fused decode loop
against the streamed one, tracing, EOS, sampling, argument errors, and the
`swajax generate` command end to end."""

import jax
import numpy as np
import pytest
from flax import nnx

import models
from swajax.infer.generation import (TRACE_COUNTS, check_request, decode, generate,
                               generate_stream, prefill)
from swajax.text.tokenizers import ByteTokenizer
from swajax.cli.generate import main as generate_main
from swajax.io.hf import load_hf, save_hf
from tests.test_hf_parity import WINDOW, random_hf_model

torch = pytest.importorskip("torch")

NEW_TOKENS = 3 * WINDOW + 2  # the ring wraps three times while generating
PROMPT_LENGTHS = [WINDOW + 3, 5]  # left-padded batch: above and below W


def saved_and_loaded(family, tmp_path_factory):
  """(transformers model, the same weights loaded by swajax.load_hf)."""
  hf_model = random_hf_model(family)
  directory = tmp_path_factory.mktemp(family)
  hf_model.save_pretrained(directory)
  return hf_model, load_hf(directory, attn_impl="xla")


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def hf_pair(request, tmp_path_factory):
  return saved_and_loaded(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """The Mistral model (every layer sliding), for the generation options."""
  return saved_and_loaded("mistral", tmp_path_factory)[1]


def left_padded_prompts(vocab_size, lengths, seed=0):
  """ids int32 [B, max(lengths)] (padding 0 on the left), attention mask."""
  rng = np.random.default_rng(seed)
  width = max(lengths)
  ids = np.zeros((len(lengths), width), np.int32)
  mask = np.zeros_like(ids)
  for b, n in enumerate(lengths):
    ids[b, width - n:] = rng.integers(0, vocab_size, n)
    mask[b, width - n:] = 1
  return ids, mask


def test_greedy_equals_transformers_generate(hf_pair):
  hf_model, model = hf_pair
  ids, mask = left_padded_prompts(model.config.vocab_size, PROMPT_LENGTHS)
  hf_model.generation_config.eos_token_id = None  # never stop: full length
  with torch.no_grad():
    expected = hf_model.generate(
        torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask), do_sample=False,
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        pad_token_id=0).numpy()
  ours = generate(model, ids, prompt_lengths=PROMPT_LENGTHS,
                  max_new_tokens=NEW_TOKENS)
  np.testing.assert_array_equal(ours, expected)


def streamed(model, ids, *, max_new_tokens, eos_token_id=None, **kwargs):
  """`generate`'s result assembled from `generate_stream` (one program per
  token), padded with the first eos id as documented."""
  steps = list(generate_stream(model, ids, max_new_tokens=max_new_tokens,
                               eos_token_id=eos_token_id, **kwargs))
  pad = np.ravel(eos_token_id if eos_token_id is not None else 0)[0]
  new = np.full((ids.shape[0], max_new_tokens), pad, np.int32)
  if steps:
    new[:, :len(steps)] = np.stack(steps, axis=1)
  return np.concatenate([ids, new], axis=1)


def traces(fn):
  """TRACE_COUNTS added by fn(), as a dict without zero entries."""
  before = TRACE_COUNTS.copy()
  fn()
  return {k: v for k, v in (TRACE_COUNTS - before).items() if v}


def test_decode_traces_once_per_shapes_and_options(model):
  ids, _ = left_padded_prompts(model.config.vocab_size, [4, 4, 2])  # B = 3
  run = lambda fn, **kw: traces(lambda: fn(
      model, ids, prompt_lengths=[4, 4, 2], max_new_tokens=20, **kw))
  assert run(generate) == {"prefill": 1, "decode_loop": 1}  # 19 steps, 1 trace
  assert run(generate) == {}
  assert run(streamed) == {"decode": 1}  # the prefill program is shared
  assert run(streamed) == {}
  assert run(generate, temperature=0.5) == {"decode_loop": 1}  # new options
  assert run(generate, temperature=0.5) == {}


@pytest.mark.parametrize("options", [
    dict(),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.3, top_k=10, top_p=0.9, prefill_chunk=3),
], ids=["greedy", "temperature", "top_k", "top_p", "all_chunked"])
def test_fused_loop_equals_streamed(model, options):
  """Left-padded ragged batch, the ring wrapping three times."""
  ids, _ = left_padded_prompts(model.config.vocab_size, PROMPT_LENGTHS)
  kwargs = dict(prompt_lengths=PROMPT_LENGTHS, max_new_tokens=NEW_TOKENS,
                rng=jax.random.key(7), **options)
  fused = generate(model, ids, **kwargs)
  np.testing.assert_array_equal(fused, streamed(model, ids, **kwargs))
  if options.get("temperature"):  # the rng is used: another gives another text
    other = dict(kwargs, rng=jax.random.key(8))
    assert (generate(model, ids, **other) != fused).any()


def test_pallas_decode_steps_give_the_xla_tokens(model, tmp_path):
  """The decode steps through the Pallas flash-decoding kernel (interpreted
  on a CPU, compiled on a GPU: gpu_check.sh runs this test), fused and
  streamed, past the ring's first wrap."""
  pallas = load_hf(save_hf(model, tmp_path / "model"), attn_impl="pallas")
  ids, _ = left_padded_prompts(model.config.vocab_size, PROMPT_LENGTHS)
  kwargs = dict(prompt_lengths=PROMPT_LENGTHS, max_new_tokens=WINDOW + 2)
  expected = generate(model, ids, **kwargs)
  np.testing.assert_array_equal(generate(pallas, ids, **kwargs), expected)
  np.testing.assert_array_equal(streamed(pallas, ids, **kwargs), expected)


@pytest.mark.parametrize("new_tokens", [0, 1, 2])
def test_fused_loop_equals_streamed_for_few_tokens(model, new_tokens):
  ids, _ = left_padded_prompts(model.config.vocab_size, PROMPT_LENGTHS)
  kwargs = dict(prompt_lengths=PROMPT_LENGTHS, max_new_tokens=new_tokens,
                temperature=1.0, eos_token_id=3)
  fused = generate(model, ids, **kwargs)
  assert fused.shape == (len(PROMPT_LENGTHS), ids.shape[1] + new_tokens)
  np.testing.assert_array_equal(fused, streamed(model, ids, **kwargs))


def test_fused_loop_ends_once_every_row_has_stopped(model):
  """eos = each row's greedy token at step 3: both rows stop there, and the
  loop runs no further step (the cache holds no later position)."""
  ids, _ = left_padded_prompts(model.config.vocab_size, PROMPT_LENGTHS)
  kwargs = dict(prompt_lengths=PROMPT_LENGTHS, max_new_tokens=NEW_TOKENS)
  free = generate(model, ids, **kwargs)[:, ids.shape[1]:]
  eos = [int(free[0, 3]), int(free[1, 3])]
  fused = generate(model, ids, eos_token_id=eos, **kwargs)
  np.testing.assert_array_equal(fused, streamed(model, ids, eos_token_id=eos,
                                                **kwargs))
  stop = max(int(np.flatnonzero(np.isin(row, eos))[0]) for row in free)
  assert stop <= 3 and (fused[:, ids.shape[1] + stop + 1:] == eos[0]).all()

  request = check_request(
      model, ids, max_new_tokens=NEW_TOKENS, prompt_lengths=PROMPT_LENGTHS,
      temperature=0.0, top_k=None, top_p=None, eos_token_id=eos, rng=None,
      max_len=None, prefill_chunk=256)
  _, cache = decode(request, prefill(model, request))
  # Step s feeds the token of column s - 1 at position length + s - 1; the
  # last step runs when the last row's eos is at column `stop`.
  last_fed = np.asarray(cache.layers[0].positions).max(axis=1)
  np.testing.assert_array_equal(last_fed,
                                np.asarray(PROMPT_LENGTHS) + stop - 1)


def test_chunked_prefill_generates_the_same(model):
  ids, _ = left_padded_prompts(model.config.vocab_size, PROMPT_LENGTHS)
  kwargs = dict(prompt_lengths=PROMPT_LENGTHS, max_new_tokens=NEW_TOKENS)
  np.testing.assert_array_equal(generate(model, ids, prefill_chunk=3, **kwargs),
                                generate(model, ids, **kwargs))


@pytest.mark.parametrize("pad", [-1, 10**6])
def test_padding_values_are_ignored(model, pad):
  """Out-of-vocab padding ids (NaN embeddings) change nothing: padding k, v
  never reach a real query, not even as masked keys of a prefill chunk."""
  ids, mask = left_padded_prompts(model.config.vocab_size, PROMPT_LENGTHS)
  kwargs = dict(prompt_lengths=PROMPT_LENGTHS, max_new_tokens=NEW_TOKENS)
  np.testing.assert_array_equal(
      generate(model, np.where(mask, ids, pad), **kwargs)[:, ids.shape[1]:],
      generate(model, ids, **kwargs)[:, ids.shape[1]:])


@pytest.mark.parametrize("token", [-1, 10**6])
@pytest.mark.parametrize("fn", [generate, generate_stream])
def test_prompt_tokens_outside_the_vocab_raise(model, fn, token):
  ids, _ = left_padded_prompts(model.config.vocab_size, [6, 3])
  ids[1, -1] = token
  with pytest.raises(ValueError, match=rf"input_ids\[1, 5\]={token}: expected "
                     rf"a token id in \[0, {model.config.vocab_size}\)"):
    fn(model, ids, prompt_lengths=[6, 3], max_new_tokens=2)


def expected_after_eos(tokens, eos):
  """Each row up to and including its first eos, then eos."""
  out = tokens.copy()
  for row in out:
    hits = np.flatnonzero(row == eos)
    if hits.size:
      row[hits[0]:] = eos
  return out


@pytest.mark.parametrize("eos", [jax.numpy.int32(7), np.asarray([7, 9]), [7]])
def test_eos_ids_as_arrays(model, eos):
  """A jax/numpy scalar or array of ids is as good as Python ints."""
  assert check_request(model, np.ones((1, 3), np.int32), max_new_tokens=1,
                       prompt_lengths=None, temperature=0.0, top_k=None,
                       top_p=None, eos_token_id=eos, rng=None, max_len=None,
                       prefill_chunk=4).sampling.eos_token_ids == tuple(
                           np.asarray(eos).reshape(-1).tolist())


def test_stops_at_eos_and_pads_with_it(model):
  ids, _ = left_padded_prompts(model.config.vocab_size, PROMPT_LENGTHS)
  kwargs = dict(prompt_lengths=PROMPT_LENGTHS, max_new_tokens=NEW_TOKENS)
  free = generate(model, ids, **kwargs)[:, ids.shape[1]:]
  eos = int(free[0, 3])  # row 0 stops at step 3 at the latest
  stopped = generate(model, ids, eos_token_id=eos, **kwargs)[:, ids.shape[1]:]
  np.testing.assert_array_equal(stopped, expected_after_eos(free, eos))
  assert (stopped[0, 4:] == eos).all()
  assert not (free[0, 4:] == eos).all()  # the test can fail


def test_sampling_follows_the_rng(model):
  ids, _ = left_padded_prompts(model.config.vocab_size, PROMPT_LENGTHS)
  kwargs = dict(prompt_lengths=PROMPT_LENGTHS, max_new_tokens=NEW_TOKENS)
  sample = lambda seed, **options: generate(
      model, ids, temperature=1.0, rng=jax.random.key(seed), **options,
      **kwargs)
  np.testing.assert_array_equal(sample(1), sample(1))
  assert (sample(1) != sample(2)).any()
  np.testing.assert_array_equal(sample(3, top_k=1), generate(model, ids,
                                                             **kwargs))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(max_len=8), ValueError, "max_len"),  # prompt 6 + 4 new > 8
    (dict(max_len=0), ValueError, "max_len"),
    (dict(prompt_lengths=[7]), ValueError, "prompt_lengths"),
    (dict(eos_token_id=10**6), ValueError, "eos_token_id"),
    (dict(eos_token_id=[3, True]), ValueError, "eos_token_id"),
    (dict(eos_token_id=2.0), ValueError, "eos_token_id"),
    (dict(prefill_chunk=0), ValueError, "prefill_chunk"),
])
@pytest.mark.parametrize("fn", [generate, generate_stream])
def test_bad_arguments(fn, kwargs, error, match):
  """Raised by the call itself (generate_stream: before any iteration)."""
  model = nnx.eval_shape(lambda: models.CausalLM(  # layer 0: full attention
      models.qwen2_tiny(num_layers=2), rngs=nnx.Rngs(0)))
  with pytest.raises(error, match=match):
    fn(model, np.zeros((1, 6), np.int32), **{"max_new_tokens": 4, **kwargs})


def test_sliding_only_model_generates_past_max_len(model):
  """No full-attention layer and max_len >= W: rings, with no length limit."""
  assert model.config.layer_windows == (WINDOW, WINDOW)
  ids, _ = left_padded_prompts(model.config.vocab_size, [6])
  out = generate(model, ids, max_new_tokens=NEW_TOKENS, max_len=WINDOW)
  np.testing.assert_array_equal(out, generate(model, ids,
                                              max_new_tokens=NEW_TOKENS))


@pytest.mark.parametrize("fn", [generate, generate_stream])
def test_sliding_only_model_with_max_len_below_window_raises(model, fn):
  """max_len < W: linear buffers of max_len slots, too short for 6 + 4."""
  ids, _ = left_padded_prompts(model.config.vocab_size, [6])
  with pytest.raises(ValueError, match=r"max_len=7: .* needs 10 positions"):
    fn(model, ids, max_new_tokens=4, max_len=WINDOW - 1)


def test_short_generation_below_window_is_exact(model):
  """Default max_len = 6 + 1 < W: linear buffers, and the same tokens as a
  ring of W slots (max_len=W)."""
  ids, _ = left_padded_prompts(model.config.vocab_size, [6, 3])
  kwargs = dict(prompt_lengths=[6, 3], max_new_tokens=1)
  np.testing.assert_array_equal(generate(model, ids, **kwargs),
                                generate(model, ids, max_len=WINDOW, **kwargs))


def test_cli_streams_a_continuation(tmp_path, capsys):
  config = models.mistral_tiny(num_layers=2, hidden_size=64,
                               intermediate_size=64, num_q_heads=4,
                               num_kv_heads=2, head_dim=16,
                               layer_windows=(4, 4))
  save_hf(models.CausalLM(config, rngs=nnx.Rngs(0)), tmp_path / "hf",
          tokenizer=ByteTokenizer())
  code = generate_main([str(tmp_path), "--prompt", "def f():",  # run folder
                        "--max-new-tokens", "12", "--attn-impl", "xla"])
  out, err = capsys.readouterr()
  assert code == 0, err
  assert out.startswith("def f():") and "12 tokens" in err
  code = generate_main([str(tmp_path), "--prompt", "x", "--top-p", "2"])
  assert code == 2 and "top_p" in capsys.readouterr().err
