"""`swajax serve` through clients no one here wrote: the `openai` package
(chat, completions, streaming, logprobs, echo; greedy answers token-exact
against transformers' `generate`, logprobs against its logits), lm-eval's
`local-completions` model on a small multiple-choice task (loglikelihoods
equal to transformers'), a load of 64 requests from 16 concurrent clients
(each equal to its answer served alone), client disconnects, overload (503),
bad requests. One server process (module fixture) on a tiny random Qwen2 (a
full layer and two window-8 layers, so every prompt + generation wraps the
rings), on 127.0.0.1, a free port; two more on the other MODELs
`io.model_source` resolves: a PEFT adapter folder (vs PEFT's `generate`,
with a generation_config.json eos id) and a LoRA `swajax train` run folder
(byte tokenizer; vs PEFT's `generate`, then SIGTERM).
"""

import asyncio
import json
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from flax import nnx

import models
from swajax.infer.engine import Engine, EngineRequest, Overloaded
from swajax.text.tokenizers import ByteTokenizer
from tests.serve_fixtures import MODEL_NAME, WINDOW, health, serve, tiny_checkpoint
from tests.test_faults import TINY, run

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4  # fp32 logprobs; observed ~1e-6
# MAX_LEN: a stream of MAX_LEN - 2 tokens (about a thousand decode steps)
# outlasts the overload flood and the disconnect test, also when the server
# has the machine to itself: no stream ends, and frees its slot, before the
# last request of the flood arrives.
MAX_BATCH, MAX_WAITING, MAX_LEN = 4, 16, 1024
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam."},
     {"role": "user", "content": "Translate to German: good morning"}],
]
BYTES = ByteTokenizer()  # a `swajax train` run's tokenizer
LM_EVAL_TASK = Path(__file__).parent / "data" / "lm_eval_tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  hf_model, folder = tiny_checkpoint(tmp_path_factory.mktemp("serve"))
  with serve(folder, "--max-batch", str(MAX_BATCH), "--max-len", str(MAX_LEN),
             "--max-waiting", str(MAX_WAITING), "--prefill-chunk", "16") as (url, _):
    yield SimpleNamespace(
        url=url, hf=hf_model, folder=folder,
        tokenizer=transformers.AutoTokenizer.from_pretrained(folder),
        client=openai.OpenAI(base_url=f"{url}/v1", api_key="unused",
                             max_retries=0, timeout=120))


def hf_greedy(server, ids, max_new_tokens):
  """transformers' greedy continuation of ids: (new ids, the logprob of
  each new token)."""
  eos = server.tokenizer.convert_tokens_to_ids("<|im_end|>")
  with torch.no_grad():
    out = server.hf.generate(
        torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=eos, pad_token_id=eos, output_logits=True,
        return_dict_in_generate=True)
  new = out.sequences[0, len(ids):].tolist()
  logprobs = [torch.log_softmax(step[0], -1)[t].item()
              for step, t in zip(out.logits, new)]
  return new, logprobs


def hf_prompt_logprobs(server, ids):
  """transformers' logprob of each token of ids after the ones before it."""
  with torch.no_grad():
    logits = server.hf(torch.tensor([ids])).logits[0]
  logprobs = torch.log_softmax(logits, -1)
  return [logprobs[t - 1, ids[t]].item() for t in range(1, len(ids))]


@pytest.mark.parametrize("messages", CHATS, ids=["one-turn", "multi-turn"])
def test_chat_greedy_equals_transformers(server, messages):
  ids = server.tokenizer.apply_chat_template(
      messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
  new, logprobs = hf_greedy(server, ids, 24)
  assert len(ids) + len(new) > 2 * WINDOW
  answer = server.client.chat.completions.create(
      model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0,
      logprobs=True, top_logprobs=3)
  choice = answer.choices[0]
  assert choice.message.content == server.tokenizer.decode(new, skip_special_tokens=True)
  assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), len(new))
  assert choice.finish_reason == ("length" if len(new) == 24 else "stop")
  got = [entry.logprob for entry in choice.logprobs.content]
  np.testing.assert_allclose(got, logprobs, atol=TOLERANCE)
  print(f"chat vs transformers: {len(new)} tokens equal, logprob max |diff| "
        f"{np.abs(np.subtract(got, logprobs)).max():.1e}")
  for entry in choice.logprobs.content:  # greedy: the chosen token is the top one
    assert len(entry.top_logprobs) == 3
    assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_completion_echo_logprobs_equal_transformers(server):
  ids = np.random.default_rng(1).integers(0, server.hf.config.vocab_size, 3 * WINDOW).tolist()
  new, logprobs = hf_greedy(server, ids, 10)
  answer = server.client.completions.create(
      model=MODEL_NAME, prompt=ids, max_tokens=10, temperature=0, echo=True,
      logprobs=2)
  choice = answer.choices[0]
  decode = lambda x: server.tokenizer.decode(x, skip_special_tokens=True)
  assert choice.text == decode(ids) + decode(new)
  scores = choice.logprobs.token_logprobs
  assert scores[0] is None and len(scores) == len(ids) + len(new)
  expected = hf_prompt_logprobs(server, ids) + logprobs
  np.testing.assert_allclose(scores[1:], expected, atol=TOLERANCE)
  print(f"echo logprobs vs transformers: {len(expected)} tokens, max |diff| "
        f"{np.abs(np.subtract(scores[1:], expected)).max():.1e}")
  assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs[1:])


def test_streams_equal_the_whole_answers(server):
  messages = CHATS[0]
  whole = server.client.chat.completions.create(
      model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0)
  chunks = list(server.client.chat.completions.create(
      model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0,
      stream=True, stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == whole.choices[0].message.content
  assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
  assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
  prompt = "Paris is the capital"
  whole = server.client.completions.create(model=MODEL_NAME, prompt=prompt,
                                           max_tokens=12, temperature=0)
  pieces = list(server.client.completions.create(
      model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True))
  assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text
  with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
      "model": MODEL_NAME, "prompt": prompt, "max_tokens": 3, "stream": True}) as r:
    lines = [line for line in r.iter_lines() if line]
  assert lines[-1] == "data: [DONE]" and all(l.startswith("data: ") for l in lines)


def test_stop_strings_and_sampling_seed(server):
  prompt = "Write a haiku about the sea."
  whole = server.client.completions.create(model=MODEL_NAME, prompt=prompt,
                                           max_tokens=16, temperature=0).choices[0]
  stop = whole.text[5:7]
  cut = server.client.completions.create(model=MODEL_NAME, prompt=prompt, stop=[stop],
                                         max_tokens=16, temperature=0).choices[0]
  assert (cut.text, cut.finish_reason) == (whole.text[:whole.text.index(stop)], "stop")
  sampled = [server.client.completions.create(
      model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=1.0, top_p=0.9,
      seed=seed).choices[0].text for seed in (7, 7, 8)]
  assert sampled[0] == sampled[1] != sampled[2]


def test_bad_requests_get_openai_errors(server):
  url = f"{server.url}/v1/completions"
  cases = [(b"{not json", 400), (json.dumps({"model": MODEL_NAME}).encode(), 400),
           (json.dumps({"model": MODEL_NAME, "prompt": "x", "temperature": -1}).encode(), 400),
           (json.dumps({"model": MODEL_NAME, "prompt": "x", "n": 2}).encode(), 400),
           (json.dumps({"model": MODEL_NAME, "prompt": "x", "bogus": 1}).encode(), 400),
           (json.dumps({"model": MODEL_NAME, "prompt": "x", "max_tokens": MAX_LEN}).encode(), 400),
           (json.dumps({"model": "no-such-model", "prompt": "x"}).encode(), 404)]
  for body, status in cases:
    response = httpx.post(url, content=body, timeout=30,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status, (body, response.text)
    error = response.json()["error"]
    assert error["message"] and error["type"], body
  with pytest.raises(openai.NotFoundError):
    server.client.chat.completions.create(model="other", messages=CHATS[0])
  assert [m.id for m in server.client.models.list()] == [MODEL_NAME]


def test_load_64_requests_16_clients_each_equal_its_alone_answer(server):
  """16 distinct prompts (4 to 40 tokens, so prefills of 1 to 3 chunks join
  running decodes), each answered alone first, then 4 times each from 16
  concurrent clients over 4 slots."""
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, server.hf.config.vocab_size, n).tolist()
             for n in rng.integers(4, 41, 16)]
  ask = lambda client, p: client.completions.create(
      model=MODEL_NAME, prompt=p, max_tokens=12, temperature=0, logprobs=1)
  alone = [ask(server.client, p).choices[0] for p in prompts]
  before = health(server.url)

  async def load():
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused",
                                max_retries=0, timeout=300)
    clients = asyncio.Semaphore(16)

    async def one(p):
      async with clients:
        return (await ask(client, p)).choices[0]

    try:
      return await asyncio.gather(*(one(prompts[i % 16]) for i in range(64)))
    finally:
      await client.close()

  answers = asyncio.run(load())
  for i, answer in enumerate(answers):
    expected = alone[i % 16]
    assert answer.text == expected.text
    assert answer.logprobs.tokens == expected.logprobs.tokens
  after = health(server.url)
  assert (after["active"], after["waiting"]) == (0, 0)  # no slot leaks
  assert after["generated"] - before["generated"] == sum(
      len(a.logprobs.tokens) for a in answers)
  print(f"load: {len(answers)} requests from 16 clients over {MAX_BATCH} slots, "
        f"{after['generated'] - before['generated']} tokens, all equal to alone")


def test_disconnect_frees_the_slot(server):
  before = health(server.url)
  with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
      "model": MODEL_NAME, "prompt": "x", "max_tokens": MAX_LEN - 2,
      "temperature": 0, "stream": True}) as response:
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")
  after = wait_idle(server.url)
  assert after["cancelled"] == before["cancelled"] + 1
  assert after["generated"] - before["generated"] < MAX_LEN - 2


def wait_idle(url, attempts=300):
  """/health once no request is active or waiting (polled, bounded)."""
  for _ in range(attempts):
    state = health(url)
    if state["active"] == state["waiting"] == 0:
      return state
    time.sleep(0.1)
  pytest.fail(f"requests still running: {state}")


def test_overload_is_503_with_a_retry_hint_and_recovers(server):
  """More streams than slots + the waiting bound: the rest get 503; closing
  the streams frees every slot."""
  total = MAX_BATCH + MAX_WAITING + 12

  async def flood():
    async with httpx.AsyncClient(timeout=120) as client:
      async def open_stream():
        request = client.build_request("POST", f"{server.url}/v1/completions", json={
            "model": MODEL_NAME, "prompt": "x", "max_tokens": MAX_LEN - 2,
            "temperature": 0, "stream": True})
        return await client.send(request, stream=True)
      responses = await asyncio.gather(*(open_stream() for _ in range(total)))
      refused = [r for r in responses if r.status_code == 503]
      for r in refused:
        await r.aread()
      bodies = [(r.json(), r.headers.get("retry-after")) for r in refused]
      codes = sorted(r.status_code for r in responses)
      for r in responses:
        await r.aclose()
      return codes, bodies

  codes, bodies = asyncio.run(flood())
  assert set(codes) == {200, 503} and codes.count(200) >= MAX_BATCH + MAX_WAITING
  for body, retry_after in bodies:
    assert body["error"]["code"] == "overloaded" and int(retry_after) >= 1
  wait_idle(server.url)
  assert server.client.completions.create(model=MODEL_NAME, prompt="x",
                                          max_tokens=2).usage.completion_tokens == 2


def test_the_waiting_bound_holds_before_the_engine_admits():
  """Free slots take max_batch requests and max_waiting more may wait, even
  while the engine's thread has admitted none yet (here it never started:
  it may be busy compiling). The bound once counted only requests beyond a
  full set of slots, so a burst ahead of the first admission was unbounded."""
  model = models.CausalLM(models.mistral_tiny(num_layers=1), rngs=nnx.Rngs(0))
  engine = Engine(model, max_batch=2, max_len=16, max_waiting=3)
  request = EngineRequest(prompt=(1, 2), max_tokens=4)
  for _ in range(2 + 3):
    engine.submit(request, lambda event: None)
  with pytest.raises(Overloaded, match="5 requests are already waiting"):
    engine.submit(request, lambda event: None)
  assert engine.load()["waiting"] == 5


def test_lm_eval_loglikelihoods_equal_transformers(server, tmp_path):
  """lm-eval's local-completions model scores each choice through
  /v1/completions (echo, logprobs); every loglikelihood equals transformers'
  on the tokens lm-eval's own rule gives (context, then the rest of
  context + continuation)."""
  lm_eval = pytest.importorskip("lm_eval")
  pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  config = (LM_EVAL_TASK / "tiny_mc.yaml").read_text().replace(
      "test: tiny_mc.jsonl", f"test: {LM_EVAL_TASK / 'tiny_mc.jsonl'}")
  (tmp_path / "tiny_mc.yaml").write_text(config)
  results = lm_eval.simple_evaluate(
      model="local-completions", model_args={
          "base_url": f"{server.url}/v1/completions", "model": MODEL_NAME,
          "tokenizer": str(server.folder), "tokenizer_backend": "huggingface",
          "tokenized_requests": True, "num_concurrent": 2, "max_retries": 1},
      tasks=["swajax_tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
      log_samples=True)
  samples = results["samples"]["swajax_tiny_mc"]
  scored, worst = 0, 0.0
  for sample in samples:
    for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
      context_ids = server.tokenizer.encode(context)
      whole = server.tokenizer.encode(context + continuation)
      expected = sum(hf_prompt_logprobs(server, whole)[len(context_ids) - 1:])
      assert response[0][0] == pytest.approx(expected, abs=TOLERANCE)
      scored, worst = scored + 1, max(worst, abs(response[0][0] - expected))
  print(f"lm-eval loglikelihoods vs transformers: {scored}, max |diff| {worst:.1e}")
  assert scored == 10 and len(samples) == 4
  assert 0 <= results["results"]["swajax_tiny_mc"]["acc,none"] <= 1


def test_a_peft_adapter_folder_serves_as_peft_generates(server, tmp_path):
  """A second server on a PEFT adapter folder as MODEL (`io.model_source`:
  on the base its adapter_config.json records), whose base's
  generation_config.json adds an eos id (a token of the adapter's greedy
  answer): the chat answer equals PEFT's greedy `generate` with those eos ids,
  token for token, and differs from the base's answer (the adapter acts)."""
  peft = pytest.importorskip("peft")
  base, adapter = tmp_path / "base", tmp_path / "adapter"
  shutil.copytree(server.folder, base)
  torch.manual_seed(1)
  tuned = peft.get_peft_model(
      transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager"),
      peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, target_modules=[
          "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
  tuned.save_pretrained(adapter)
  ids = server.tokenizer.apply_chat_template(
      CHATS[0], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
  im_end = server.tokenizer.convert_tokens_to_ids("<|im_end|>")
  with torch.no_grad():
    free = tuned.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                          eos_token_id=im_end, pad_token_id=im_end)[0, len(ids):].tolist()
  stop = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i])
  (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, stop]}))
  expected = free[:free.index(stop) + 1]
  base_answer = server.client.chat.completions.create(
      model=MODEL_NAME, messages=CHATS[0], max_tokens=16, temperature=0)
  with serve(adapter, "--max-batch", "2", "--max-len", "64", "--prefill-chunk", "16") as (url, _):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.chat.completions.create(model=MODEL_NAME, messages=CHATS[0],
                                            max_tokens=16, temperature=0)
  text = server.tokenizer.decode(expected, skip_special_tokens=True)
  assert answer.choices[0].message.content == text
  assert (answer.choices[0].finish_reason, answer.usage.completion_tokens) == (
      "stop", len(expected))
  assert base_answer.choices[0].message.content[:len(text)] != text


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """A 2-step LoRA `swajax train` run without --merge-lora (window 16, byte
  tokenizer): its hf/ holds base/ and adapter/ only."""
  out = tmp_path_factory.mktemp("lora") / "run"
  result = run("train", *TINY, "--steps", "2", "--lr", "0.05", "--lora-rank", "4",
               "--out", out)
  assert result.returncode == 0, result.stderr
  return out


def assert_listener_closes(url: str) -> None:
  """GET `url` until the connection is refused (the listening socket closed).
  A connection the kernel queued just before the close is reset, not
  served: that answer means "closing", so the loop goes on."""
  for _ in range(100):
    try:
      httpx.get(url, timeout=5)
    except httpx.ConnectError:
      return
    except (httpx.ReadError, httpx.RemoteProtocolError):
      pass
    time.sleep(0.05)
  pytest.fail(f"{url} still answered after 100 tries: the listening socket stayed open")


def test_sigterm_finishes_requests_in_flight_and_exits_0(lora_run):
  """A second server, on a LoRA run folder: SIGTERM during a stream stops new
  connections, lets the stream finish whole — equal to PEFT's greedy
  `generate` on the run's base and adapter — and the command exits 0."""
  peft = pytest.importorskip("peft")
  ids = [BYTES.bos_id, *BYTES.encode("x").tolist()]
  hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
      lora_run / "hf" / "base", attn_implementation="eager"), lora_run / "hf" / "adapter")
  with torch.no_grad():
    new = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                      eos_token_id=BYTES.eos_id, pad_token_id=BYTES.eos_id)[0, len(ids):]
  with serve(lora_run, "--max-batch", "1", "--max-len", "64",
             "--prefill-chunk", "16") as (url, process):
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
        "model": MODEL_NAME, "prompt": "x", "max_tokens": 40, "temperature": 0,
        "stream": True}) as response:
      lines = response.iter_lines()
      first = next(lines)
      process.send_signal(signal.SIGTERM)
      rest = [line for line in lines if line]
      assert_listener_closes(f"{url}/health")
    events = [json.loads(l[6:]) for l in [first, *rest] if l != "data: [DONE]"]
    assert rest[-1] == "data: [DONE]"
    assert "".join(e["choices"][0]["text"] for e in events) == BYTES.decode(new.tolist())
    assert events[-1]["choices"][0]["finish_reason"] == (
        "stop" if BYTES.eos_id in new else "length")
    assert process.wait(timeout=60) == 0
