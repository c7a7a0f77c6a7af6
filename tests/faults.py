"""Fault injection for tests: a step that raises, and logits that turn NaN for chosen requests.

Both wrap one ModelRunner instance from the outside (its ``dispatch`` and the compiled step
it picks with ``_program``), so production code carries no hook and pays nothing. A
``select(request)`` predicate picks the requests to hit, which lets a test (or the soak's
server process) mark faulty requests by their prompt alone.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from qwenjax.engine.runner import bucket_for

# The soak marks faulty requests by the first prompt token (ids a random prompt never starts with).
RAISE_MARK = 151_000
NAN_MARK = 151_001
# NaN-marked requests stream this many tokens before their logits turn NaN.
NAN_AFTER_TOKENS = 2


class InjectedFault(RuntimeError):
    pass


def raise_in_steps(runner, select: Callable[[object], bool]) -> list:
    """Every step holding a selected request raises before it runs; returns the failed steps."""
    real_dispatch = runner.dispatch
    failed = []

    def dispatch(out):
        if any(select(c.request) for c in out.chunks):
            failed.append(out)
            raise InjectedFault("injected step failure")
        return real_dispatch(out)

    runner.dispatch = dispatch
    return failed


def nan_logits(runner, select: Callable[[object], bool]) -> list:
    """The logits rows of selected requests that sample this step become NaN (as a numerical
    fault in the model would leave them); returns the ids of the requests hit."""
    real_dispatch, real_program = runner.dispatch, runner._program
    rows: list[int] = []
    hit: list[str] = []

    def dispatch(out):
        decode_rows = bucket_for(len(out.decode), runner.decode_buckets)
        placed = [*enumerate(out.decode), *((decode_rows + j, c) for j, c in enumerate(out.prefill))]
        rows[:] = [i for i, c in placed if c.completes and select(c.request)]
        hit.extend(c.request.request_id for _, c in placed if c.completes and select(c.request))
        return real_dispatch(out)

    def program(decode_rows: int, prefill_tokens: int):
        compiled = real_program(decode_rows, prefill_tokens)
        if not rows:
            return compiled
        poison = jnp.asarray(rows, jnp.int32)

        def run(*args):
            logits, *rest = compiled(*args)  # (logits, hidden states, cache)
            return jax.device_put(logits.at[poison].set(jnp.nan), logits.sharding), *rest

        return run

    runner.dispatch, runner._program = dispatch, program
    return hit


def marked(mark: int, min_output: int = 0) -> Callable[[object], bool]:
    return lambda request: request.prompt_ids[0] == mark and request.num_output_tokens >= min_output


def install_marked_faults(runner) -> None:
    """What the soak's server runs with: RAISE_MARK prompts fail their step, NAN_MARK prompts
    get NaN logits after NAN_AFTER_TOKENS tokens."""
    raise_in_steps(runner, marked(RAISE_MARK))
    nan_logits(runner, marked(NAN_MARK, NAN_AFTER_TOKENS))


def remove(runner) -> None:
    """Undo ``raise_in_steps`` / ``nan_logits``: the class's own methods again."""
    for name in ("dispatch", "_program"):
        runner.__dict__.pop(name, None)
