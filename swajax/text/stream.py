"""Text printed as tokens arrive: `TextStream` (`swajax generate`, `swajax chat`)."""

from __future__ import annotations

import sys


class TextStream:
  """Prints decoded text as tokens arrive, holding back a partial character
  (a trailing U+FFFD) until the next token completes it.

  `context`: the prompt ids (already printed). The new tokens are decoded
  after them, so the tokenizer's own spacing between the prompt and the first
  new token is kept (a WordLevel tokenizer joins words with spaces).
  `stop`: a text that ends the new text (a chat template's end of turn that
  is no single token): neither it nor what follows is printed, a tail that
  may begin it is held back until it cannot, and `stopped` turns True once
  it has appeared. `text` is the new text printed so far (all of it after the
  final flush).
  """

  def __init__(self, tokenizer, context=(), out=sys.stdout, stop: str | None = None):
    self.tokenizer, self.out, self.stop = tokenizer, out, stop or None
    self.ids: list[int] = [int(i) for i in context]
    self.start = self.printed = len(tokenizer.decode(self.ids))
    self.stopped = False

  @property
  def text(self) -> str:
    return self.tokenizer.decode(self.ids)[self.start:self.printed]

  def add(self, token: int, final: bool = False) -> None:
    self.ids.append(token)
    self.flush(final)

  def flush(self, final: bool) -> None:
    text = self.tokenizer.decode(self.ids)
    stable = len(text) if final else len(text.rstrip("\ufffd"))
    if self.stop is not None:
      at = text.find(self.stop, self.start)
      self.stopped = at >= 0
      if self.stopped:
        stable = at
      elif not final:
        stable -= _stop_prefix(text[:stable], self.stop)
    if stable > self.printed:
      self.out.write(text[self.printed:stable])
      self.out.flush()
      self.printed = stable


def _stop_prefix(text: str, stop: str) -> int:
  """The length of the longest tail of `text` that begins `stop`."""
  for n in range(min(len(text), len(stop) - 1), 0, -1):
    if stop.startswith(text[-n:]):
      return n
  return 0
