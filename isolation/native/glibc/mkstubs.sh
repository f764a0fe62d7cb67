#!/bin/sh
# Build link-time stand-ins for glibc's libraries from a symbol list (glibc/<arch>.syms):
# one tiny shared object per library, with that library's soname and exactly the listed
# symbols under the listed (old) versions. Linking libvgpu.so against these instead of the
# build machine's glibc makes every reference name the version, and the file, that glibc
# 2.17 had; the stubs are never installed or loaded. Usage: mkstubs.sh LIST OUTDIR CC
set -eu
list=$1 out=$2 cc=$3
rm -rf "$out" && mkdir -p "$out"
# A line: library version kind(func|data) symbol...
libs=$(grep -v '^[[:space:]]*#' "$list" | awk 'NF { print $1 }' | sort -u)
[ -n "$libs" ] || { echo "mkstubs: no symbols in $list" >&2; exit 1; }
for lib in $libs; do
    grep -v '^[[:space:]]*#' "$list" | awk -v lib="$lib" -v c="$out/$lib.c" -v m="$out/$lib.map" '
        $1 != lib { next }
        {
            if ($3 != "func" && $3 != "data") { print "mkstubs: bad kind " $3 > "/dev/stderr"; exit 1 }
            if (!($2 in seen)) { seen[$2] = 1; order[++n] = $2 }
            for (i = 4; i <= NF; i++) {
                body[$2] = body[$2] " " $i ";"
                if ($3 == "func") print "void " $i "(void) {}" > c
                else print "char " $i "[8];" > c
            }
        }
        END {
            for (i = 1; i <= n; i++)
                printf "%s {\n  global:%s\n%s};\n", order[i], body[order[i]], (i == 1 ? "  local: *;\n" : "") > m
        }'
    # -fno-builtin -w: the stubs redefine library functions with dummy signatures.
    $cc -shared -fPIC -nostdlib -fno-builtin -w -Wl,-soname,"$lib" \
        -Wl,--version-script="$out/$lib.map" -o "$out/$lib" "$out/$lib.c"
done
