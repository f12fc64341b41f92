"""The chat-template prompt around one audio clip, as token ids, and the reply's text.

Rendered like the Gemma 4 chat template with one user turn and thinking off::

    <bos><|turn>user\\n<|audio><|audio|>×n<audio|>{instruction}<turn|>\\n<|turn>model\\n

The audio item comes before the instruction, as in Google's audio examples (both orders
are valid renderings of the template). Special tokens are inserted by id — the audio ids
from config.json, the turn markers looked up by their strings in tokenizer.json — and
only the plain text between them is tokenized.

That text is tokenized as plain text, never as special tokens: the instruction carries
the user's prompt and language names, and a prompt holding ``<|audio|>`` or ``<turn|>``
must not become an audio placeholder (a count mismatch) or a turn marker (a request
rewriting the chat). The builder keeps its own copy of the tokenizer with
``encode_special_tokens`` set, so such strings are split into ordinary pieces; the fixed
template text (``user\n``, ``model\n``) holds no special token, so it encodes as before.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from producer.failures import AudioqError, FailureCode
from worker.gemma4.config import TokenIds

TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, tokens: TokenIds):
        self.tokenizer = tokenizer
        self.plain = Tokenizer.from_str(tokenizer.to_str())  # a copy: the caller's tokenizer is left as it is
        self.plain.encode_special_tokens = True
        self.tokens = tokens
        self.turn_open = self._special(TURN_OPEN)
        self.turn_close = self._special(TURN_CLOSE)
        self.channel_open = tokenizer.token_to_id(CHANNEL_OPEN)
        self.channel_close = tokenizer.token_to_id(CHANNEL_CLOSE)

    def _special(self, text: str) -> int:
        token_id = self.tokenizer.token_to_id(text)
        if token_id is None:
            raise AudioqError(FailureCode.MODEL_ERROR, f"tokenizer.json has no {text!r} token")
        return token_id

    def _text(self, text: str) -> list[int]:
        return self.plain.encode(text, add_special_tokens=False).ids

    def instruction_tokens(self, instruction: str) -> int:
        """How many tokens ``instruction`` takes in a prompt (the worker's ``max_prompt_tokens`` check)."""
        return len(self._text(instruction.strip()))

    def audio_prompt(self, instruction: str, audio_tokens: int) -> list[int]:
        """Token ids of a user turn holding ``audio_tokens`` placeholders and the instruction."""
        t = self.tokens
        return (
            [t.bos, self.turn_open] + self._text("user\n")
            + [t.boa] + [t.audio] * audio_tokens + [t.eoa]
            + self._text(instruction.strip())
            + [self.turn_close] + self._text("\n")
            + [self.turn_open] + self._text("model\n")
        )

    def text_prompt(self, instruction: str) -> list[int]:
        """Token ids of a user turn holding text only (a question over a transcript)."""
        t = self.tokens
        return ([t.bos, self.turn_open] + self._text("user\n") + self._text(instruction.strip())
                + [self.turn_close] + self._text("\n") + [self.turn_open] + self._text("model\n"))

    def reply_text(self, tokens: list[int]) -> str:
        """The reply's text, without a leading thought channel (``<|channel>…<channel|>``)."""
        if tokens and tokens[0] == self.channel_open and self.channel_close in tokens:
            tokens = tokens[tokens.index(self.channel_close) + 1:]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
