"""A multi-turn conversation with a model: `ChatSession` (`swajax chat`).

Each turn renders the whole conversation with the tokenizer's chat template
and a generation prompt (`text.chat.ChatEncoder.prompt`, as transformers'
`apply_chat_template(..., add_generation_prompt=True)`), tokenizes it (no
special tokens added: the template writes them) and streams the answer with
`generate_stream` (the prompt prefilled afresh each turn, the window kept).
The answer stops at the first stop id: the tokenizer's eos, the ids given
(a model's generation_config.json eos ids) and the template's end-of-turn
marker when it is one token; an end-of-turn marker of several tokens (a byte
tokenizer's "<|im_end|>") is a stop text instead (`text.stream.TextStream`).
The answer's text, without the stop, joins the conversation.
"""

from __future__ import annotations

from typing import Sequence, TextIO

import jax
import numpy as np

from swajax.infer.generation import generate_stream
from swajax.infer.sampling import check_sampling_args
from swajax.text.chat import ChatEncoder
from swajax.text.stream import TextStream


class ChatSession:
  """The conversation so far (`messages`), and `reply` to add a turn.

  system: a system message opening the conversation (kept by `reset`).
  stop_ids: ids besides the tokenizer's eos and the template's end of turn.
  Sampling as `generate` (temperature 0: greedy); turn n samples with
  fold_in(key(seed), n).
  """

  def __init__(self, model, tokenizer, *, system: str | None = None,
               stop_ids: Sequence[int] = (), max_new_tokens: int = 256,
               temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int = 0):
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    self.model, self.tokenizer = model, tokenizer
    self.encoder = ChatEncoder(tokenizer)
    end = self.encoder.end_of_turn()
    end_ids = list(tokenizer.encode(end)) if end else []
    single = end_ids if len(end_ids) == 1 else []
    self.stop_ids = tuple(sorted({int(tokenizer.eos_id), *map(int, stop_ids), *single}))
    self.stop_text = end if len(end_ids) > 1 else None
    self.system = system
    self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p)
    self.key = jax.random.key(seed)
    self.turns = 0
    self.reset()

  def reset(self) -> None:
    """Forgets every turn (the system message stays)."""
    self.messages = [] if self.system is None else [
        {"role": "system", "content": self.system}]

  def prompt_ids(self) -> list[int]:
    """The ids the model continues: the conversation with a generation prompt."""
    return list(self.tokenizer.encode(self.encoder.prompt(self.messages)))

  def reply(self, text: str, out: TextIO) -> list[int]:
    """Adds the user turn `text`, writes the answer to `out` as it is
    generated, adds it to the conversation; returns its ids (the stop id
    left out)."""
    self.messages.append({"role": "user", "content": text})
    prompt = np.asarray([self.prompt_ids()], np.int32)
    stream = TextStream(self.tokenizer, out=out, stop=self.stop_text)
    answer = []
    for token in generate_stream(self.model, prompt, eos_token_id=self.stop_ids,
                                 rng=jax.random.fold_in(self.key, self.turns),
                                 **self.sampling):
      if int(token[0]) in self.stop_ids:
        break
      answer.append(int(token[0]))
      stream.add(answer[-1])
      if stream.stopped:
        break
    stream.flush(final=True)
    self.messages.append({"role": "assistant", "content": stream.text})
    self.turns += 1
    return answer
