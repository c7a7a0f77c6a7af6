"""Streaming detokenization for one request: token ids in, text deltas out.

Two layers, each holding back only what it must:

1. UTF-8 layer. Byte-level BPE tokens can end in the middle of a multi-byte character; decoding
   such a prefix yields U+FFFD where the finished text has a real character. We decode a short
   window of recent tokens (starting at a token index where the text is known to split cleanly)
   and hold back a trailing U+FFFD until the next tokens settle it. Cost per token is O(window),
   independent of the output length.
2. Stop layer. Text that could still turn into a stop string is held back; a stop string ends the
   output at its first occurrence, without the stop string itself (with it when
   `include_stop` is set, vLLM's `include_stop_str_in_output`). Stop regexes (SGLang's
   `stop_regex`) work the same way: the text from where a match could still begin (the `regex`
   package's partial matching) is held back, and the first match ends the output.

The deltas returned by `add` and `finish` concatenate to `text`, which equals
`tokenizer.decode(output_ids)` cut at the first occurrence of any stop string or regex match.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import regex

REPLACEMENT_CHAR = "\ufffd"

# Prompt tokens decoded in front of the first output tokens. Byte-level BPE needs no context, but a
# tokenizer whose decoder drops a leading space (SentencePiece-style) would render the first
# output token differently without it.
PROMPT_CONTEXT_TOKENS = 4

# A trailing U+FFFD is normally settled by the next token or two (a UTF-8 character is at most 4
# bytes). A stream that keeps ending in U+FFFD (the model emitting the "\ufffd" token itself, or
# byte garbage) would otherwise grow the decode window without bound; past this many unsettled
# tokens we look for a clean split point inside the window instead.
MAX_UNSETTLED_TOKENS = 8
# How many split points that search tries, newest first; bounds its cost per token.
SPLIT_SEARCH_TOKENS = 8
# Emitted text a stop regex sees in front of the held-back text, for lookbehinds and \b.
REGEX_CONTEXT_CHARS = 256


def compile_stop_regex(pattern: str, field: str = "stop_regex") -> regex.Pattern:
    """``pattern`` compiled, or a ValueError naming ``field``: it must not match the empty
    string (it would end every output before its first character)."""
    try:
        compiled = regex.compile(pattern)
    except regex.error as error:
        raise ValueError(f"{field} {pattern!r} is not a valid regular expression: {error}") from None
    if compiled.fullmatch(""):
        raise ValueError(f"{field} {pattern!r} matches the empty string; it would stop every output "
                         "before it begins")
    return compiled


class TokenDecoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Text for one request as its tokens arrive.

    `add(token_ids)` returns the new text that is safe to show now; `finish()` returns what was
    held back when the request ends for a reason other than a stop string (EOS, length, abort).
    Once a stop string is found `stopped` is True, `matched_stop` names it, and further calls
    return "".
    """

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        stop_regex: Sequence[str] = (),
        include_stop: bool = False,
    ):
        if isinstance(stop, str):
            raise ValueError(f"stop must be a sequence of strings, got the string {stop!r}")
        for index, stop_string in enumerate(stop):
            if not isinstance(stop_string, str) or not stop_string:
                raise ValueError(f"stop[{index}] must be a non-empty string, got {stop_string!r}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stops = tuple(dict.fromkeys(stop))
        self._include_stop = include_stop
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        if isinstance(stop_regex, str):
            raise ValueError(f"stop_regex must be a sequence of strings, got the string {stop_regex!r}")
        self._regexes = [(p, compile_stop_regex(p)) for p in dict.fromkeys(stop_regex)]
        self._tail = ""  # the last REGEX_CONTEXT_CHARS emitted characters (with stop regexes)

        # UTF-8 layer. `_window` holds the tokens from the last-but-one clean split point on; its
        # decode starts at a character boundary, so it is a suffix of the decode of all tokens.
        # `_read_offset` is the last clean split point (an index into `_window`) and `_read_chars`
        # the length of decode(_window[:_read_offset]). `_window_emitted` counts the characters of
        # decode(_window) already passed on to the stop layer.
        context = [int(i) for i in prompt_ids[max(0, len(prompt_ids) - PROMPT_CONTEXT_TOKENS) :]]
        context_text = self._decode(context)
        if context_text.endswith(REPLACEMENT_CHAR):
            # The prompt may end mid-character; its tail would then merge with the first output
            # bytes and the output would no longer decode on its own.
            context, context_text = [], ""
        self._window: list[int] = context
        self._read_offset = len(context)
        self._read_chars = len(context_text)
        self._window_emitted = len(context_text)

        # Stop layer. `_pending` is settled text not yet emitted: it starts at the earliest
        # position where a stop string could still begin.
        self._pending = ""
        self._emitted: list[str] = []
        self._matched_stop: str | None = None
        self._finished = False

    @property
    def text(self) -> str:
        """All text emitted so far; the final text once finished or stopped."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    @property
    def matched_stop(self) -> str | None:
        return self._matched_stop

    @property
    def stopped(self) -> bool:
        """A stop string was found; the request should finish with reason "stop"."""
        return self._matched_stop is not None

    def add(self, token_ids: Sequence[int]) -> str:
        """Append newly generated tokens; return the text that became safe to emit (may be "")."""
        if self._finished:
            raise RuntimeError("add() called after finish()")
        if self._matched_stop is not None:
            return ""
        self._window.extend(int(i) for i in token_ids)
        return self._release(self._settle(final=False), final=False)

    def finish(self) -> str:
        """End of the request: return everything still held back. Calling it again returns ""."""
        if self._finished:
            return ""
        self._finished = True
        if self._matched_stop is not None:
            return ""
        # A stop string already in the text is decided only now if an earlier-starting stop
        # string was still possible; then `stopped` turns True here, and the caller may report
        # reason "stop" instead of EOS/length.
        return self._release(self._settle(final=True), final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    # --- UTF-8 layer -----------------------------------------------------------------------------

    def _settle(self, *, final: bool) -> str:
        """New text of the window that later tokens can no longer change."""
        window_text = self._decode(self._window)
        if final or not window_text.endswith(REPLACEMENT_CHAR):
            new_text = window_text[self._window_emitted :]
            self._window_emitted = len(window_text)
            self._slide(len(self._window), len(window_text))
            return new_text
        # Only the last U+FFFD can be an unfinished character: UTF-8 decoding replaces each
        # maximal invalid byte run by one U+FFFD, and bytes before it are decided for good.
        settled = len(window_text) - 1
        new_text = window_text[self._window_emitted : settled]
        self._window_emitted = max(self._window_emitted, settled)
        if len(self._window) - self._read_offset > MAX_UNSETTLED_TOKENS:
            self._split_inside(window_text)
        return new_text

    def _split_inside(self, window_text: str) -> None:
        """Move the read offset to the newest token boundary that splits the text cleanly.

        A boundary is clean for good when the tokens after it already decode to some text and
        decoding the two sides apart gives the same text as decoding them together: the first
        byte after the boundary has then decided how the bytes before it decode.
        """
        stop = max(self._read_offset, len(self._window) - SPLIT_SEARCH_TOKENS)
        for boundary in range(len(self._window) - 1, stop, -1):
            right = self._decode(self._window[boundary:])
            if not right:
                continue
            left = self._decode(self._window[:boundary])
            if left + right == window_text:
                self._slide(boundary, len(left))
                return

    def _slide(self, boundary: int, boundary_chars: int) -> None:
        """Make `boundary` (clean, decoding to `boundary_chars` characters) the new read offset;
        the old read offset becomes the window start, keeping one step of context."""
        drop_tokens, drop_chars = self._read_offset, self._read_chars
        del self._window[:drop_tokens]
        self._read_offset = boundary - drop_tokens
        self._read_chars = boundary_chars - drop_chars
        self._window_emitted -= drop_chars

    # --- stop layer ------------------------------------------------------------------------------

    def _release(self, new_text: str, *, final: bool) -> str:
        pending = self._pending + new_text
        if not self._stops and not self._regexes:
            return self._emit(pending, "")
        match_at, match_len, match = self._earliest_match(pending)
        # Earliest position whose tail could still grow into a stop string. A complete match is
        # final only when no stop string can still begin before it.
        live_at = len(pending) if final else self._earliest_live(pending, match_at)
        if self._regexes:
            regex_at, regex_len, regex_live, pattern = self._earliest_regex(pending, final)
            if regex_at < match_at:
                match_at, match_len, match = regex_at, regex_len, pattern
            live_at = min(live_at, regex_live)
        if match is not None and live_at >= match_at:
            self._matched_stop = match
            return self._emit(pending[:match_at + (match_len if self._include_stop else 0)], "")
        return self._emit(pending[:live_at], pending[live_at:])

    def _earliest_regex(self, pending: str, final: bool) -> tuple[int, int, int, str | None]:
        """(start, length, pattern) of the first stop regex match in `pending` ((len, 0, None)
        without one), and the earliest position where a match could still begin (len: none)."""
        context = self._tail
        subject, base = context + pending, len(context)
        best = (len(pending), 0, None)
        live = len(pending)
        for pattern, compiled in self._regexes:
            found = compiled.search(subject, base)
            if found is not None and (found.start() - base, found.end() - found.start()) < best[:2]:
                best = (found.start() - base, found.end() - found.start(), pattern)
            if not final:
                # A partial match ends at the text's end: the text might still become a match.
                partial = compiled.search(subject, base, partial=True)
                if partial is not None and partial.partial:
                    live = min(live, partial.start() - base)
        return (*best[:2], live, best[2])

    def _emit(self, delta: str, pending: str) -> str:
        self._pending = pending
        if delta:
            self._emitted.append(delta)
            if self._regexes:
                self._tail = (self._tail + delta)[-REGEX_CONTEXT_CHARS:]
        return delta

    def _earliest_match(self, pending: str) -> tuple[int, int, str | None]:
        """(start, length, stop string) of the first stop occurrence in `pending`, or (len, 0, None).

        At equal starts the shorter stop wins: the cut is the same and it completed first.
        """
        best_at, best = len(pending), None
        for stop_string in self._stops:
            at = pending.find(stop_string, 0, best_at + len(stop_string))
            if at == -1:
                continue
            if best is None or (at, len(stop_string)) < (best_at, len(best)):
                best_at, best = at, stop_string
        return best_at, len(best or ""), best

    def _earliest_live(self, pending: str, limit: int) -> int:
        """Smallest position before `limit` where the rest of `pending` is a proper prefix of a
        stop string, or `limit` if none: the text from there on must be held back."""
        # A proper prefix is shorter than the longest stop, so only the last max_len-1 positions
        # can qualify; this bounds the work per call by the stop lengths, not the output length.
        for position in range(max(0, len(pending) - self._max_stop_len + 1), limit):
            tail = pending[position:]
            for stop_string in self._stops:
                if len(stop_string) > len(tail) and stop_string.startswith(tail):
                    return position
        return limit
