#!/usr/bin/env bash
# The demo: build the default image, boot a machine, run a command in it, clean up,
# with the time each step took.
set -euo pipefail
name=pinnace-demo
step() {
    local what=$1; shift
    local t0=$EPOCHREALTIME
    "$@"
    awk -v a="$t0" -v b="$EPOCHREALTIME" -v w="$what" \
        'BEGIN { printf "  -> %s took %.2f s\n", w, b - a }' >&2
}
pinnace delete --force "$name" >/dev/null 2>&1 || true
echo "== building the default image (cached after the first time)" >&2
echo "   The first build on a host also compiles pinnace's guest kernel from Debian's" >&2
echo "   linux-source: once per host (every store shares it), 14-28 minutes on 2 cores." >&2
step "image build" pinnace image build >/dev/null
echo "== creating and starting $name" >&2
step "create" pinnace create "$name" --net restricted >/dev/null
step "start (boot to agent ready)" pinnace start "$name"
echo "== uname -a in the guest" >&2
step "exec" pinnace exec "$name" -- uname -a
echo "== stopping and deleting $name" >&2
step "stop" pinnace stop "$name"
step "delete" pinnace delete "$name"
