#!/usr/bin/env sh
# Builds the example C program against kiln's static library with the system C compiler.
#
#   capi/examples/c/build.sh [LIB] [OUT]
#
# LIB: the static library (default target/debug/libkiln_capi.a, made by
#      `cargo build -p kiln-capi`; use target/release/... after `cargo build -p kiln-capi --release`).
# OUT: the program to write (default target/kiln_example).
# Extra compiler flags (a sanitizer, say) can be given in CFLAGS.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
lib=${1:-$root/target/debug/libkiln_capi.a}
out=${2:-$root/target/kiln_example}
if [ ! -f "$lib" ]; then
  echo "$lib not found: run 'cargo build -p kiln-capi' first" >&2
  exit 1
fi
# The system libraries Rust's standard library needs (`--print native-static-libs`).
# shellcheck disable=SC2086
${CC:-cc} -std=c11 -Wall -Wextra -Werror -pedantic ${CFLAGS:-} -I "$root/capi/include" "$here/main.c" "$lib" \
  -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o "$out"
echo "$out"
