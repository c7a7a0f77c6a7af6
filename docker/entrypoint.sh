#!/bin/sh
# `docker run IMAGE [serve args…]`: qwenjax serve on 0.0.0.0 with the model and mesh from the
# environment. `docker run IMAGE qwenjax …` (or any other command) runs that instead.
set -eu
case "${1:-}" in
    ""|-*) ;;
    *) exec "$@" ;;
esac
set -- --model "${QWENJAX_MODEL:-/models/model}" --host "${QWENJAX_HOST:-0.0.0.0}" "$@"
if [ -n "${QWENJAX_MESH:-}" ]; then
    set -- --mesh "$QWENJAX_MESH" "$@"
fi
exec qwenjax serve "$@"
