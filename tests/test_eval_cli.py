"""`swajax eval` against transformers: the mean loss over the same target
tokens on the same model and data, within 1e-4 relative.

The data mixes the three kinds training reads: chat records (scored on the
assistant tokens only; transformers' mask is its own
`apply_chat_template(return_assistant_tokens_mask=True)` on the template's
{% generation %} marks), text records ([text] [eos], every token after the
first) and a prompt/completion record (the completion and eos). Every
document is longer than the window (8), and transformers scores each
document alone, as the packed rows' segments do. A PEFT adapter is scored
against `peft.PeftModel`. Bad input is one line and exit 2.
"""

import json

import numpy as np
import pytest

from swajax.cli import entry
from tests.chat_models import chat_model_folder
from tests.test_chat import CONVERSATIONS
from tests.test_faults import run
from tests.test_merge_cli import TARGETS, one_line_error

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

RELATIVE = 1e-4  # the bound
TEXTS = ["What is the capital of France? Paris is the capital of France.",
         "Waves fold into foam, salt wind over grey water."]
EXAMPLE = {"prompt": "Translate to German: good morning\n", "completion": "Guten Morgen"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(base folder, transformers model, PEFT adapter folder, data file)."""
  folder = tmp_path_factory.mktemp("eval")
  model = chat_model_folder(folder / "base")
  config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS,
                           init_lora_weights=False)
  peft.get_peft_model(chat_model_folder(folder / "for_adapter"), config).save_pretrained(
      folder / "adapter")
  data = folder / "data.jsonl"
  records = ([{"messages": c} for c in CONVERSATIONS] + [{"text": t} for t in TEXTS]
             + [EXAMPLE])
  data.write_text("".join(json.dumps(r) + "\n" for r in records))
  return folder / "base", model, folder / "adapter", data


def transformers_loss(model, tokenizer) -> tuple[float, int]:
  """(mean loss, target count) of transformers' own loss (`labels=`) over
  the documents, each alone."""
  eos = tokenizer.eos_token_id
  documents = []
  for conversation in CONVERSATIONS:
    encoded = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(encoded["input_ids"])
    documents.append((ids, [i if m else -100 for i, m in zip(ids, encoded["assistant_masks"])]))
  for text in TEXTS:
    ids = tokenizer(text, add_special_tokens=False).input_ids + [eos]
    documents.append((ids, ids))
  prompt = tokenizer(EXAMPLE["prompt"], add_special_tokens=False).input_ids
  completion = tokenizer(EXAMPLE["completion"], add_special_tokens=False).input_ids + [eos]
  documents.append((prompt + completion, [-100] * len(prompt) + completion))
  total = count = 0
  for ids, labels in documents:
    assert len(ids) > 8  # longer than the window
    n = sum(label != -100 for label in labels[1:])
    with torch.no_grad():
      loss = model(torch.tensor([ids]), labels=torch.tensor([labels])).loss
    total, count = total + float(loss) * n, count + n
  return total / count, count


def test_eval_equals_transformers_loss(setup, tmp_path):
  base, model, _, data = setup
  out = tmp_path / "eval.json"
  result = run("eval", base, "--data", data, "--seq-len", "128", "--batch-size", "2",
               "--out", out)
  assert result.returncode == 0, result.stderr
  ours = json.loads(out.read_text())
  assert json.loads(result.stdout) == ours
  theirs, count = transformers_loss(model, transformers.AutoTokenizer.from_pretrained(base))
  print(f"eval vs transformers: loss {ours['loss']:.6f} vs {theirs:.6f}, "
        f"relative {abs(ours['loss'] - theirs) / theirs:.1e}")
  assert ours["tokens"] == count
  assert ours["loss"] == pytest.approx(theirs, rel=RELATIVE)
  assert ours["perplexity"] == pytest.approx(np.exp(ours["loss"]), rel=1e-12)


def test_eval_of_an_adapter_equals_peft(setup, capsys):
  base, _, adapter, data = setup
  assert entry.main(["eval", str(base), "--adapter", str(adapter), "--data", str(data),
                     "--seq-len", "128", "--batch-size", "2"]) == 0
  ours = json.loads(capsys.readouterr().out)
  with_adapter = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(base), adapter).eval()
  theirs, count = transformers_loss(with_adapter,
                                    transformers.AutoTokenizer.from_pretrained(base))
  assert ours["tokens"] == count
  assert ours["loss"] == pytest.approx(theirs, rel=RELATIVE)
  plain, _ = transformers_loss(
      transformers.AutoModelForCausalLM.from_pretrained(base),
      transformers.AutoTokenizer.from_pretrained(base))
  assert abs(plain - theirs) > 1e-2  # the adapter is scored, not dropped


def test_eval_bad_input_is_one_line(setup, tmp_path, capsys):
  base, _, _, data = setup
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  one_line_error(capsys, ["eval", base, "--data", empty], "no documents")
  one_line_error(capsys, ["eval", tmp_path / "nowhere", "--data", data],
                 "expected a Hugging Face folder")
  one_line_error(capsys, ["eval", base, "--data", tmp_path / "none.jsonl"],
                 "no such file or directory")
  no_targets = tmp_path / "empty.txt"  # one document: [eos], nothing to predict
  no_targets.write_text("")
  one_line_error(capsys, ["eval", base, "--data", no_targets], "no target tokens")
