#!/bin/sh
# Overhead of libvgpu.so per hooked call: the same program against the fake driver, once
# directly and once with the limiter preloaded (memory limit set, no SM cap). Prints JSON.
set -eu
cd "$(dirname "$0")"
F=build/fake
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export LD_LIBRARY_PATH="$PWD/$F${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Alternate the two runs and keep each column's best: the CPUs are shared, and noise only
# ever adds time.
runs=""
for i in 1 2 3; do
  base=$("$F/bench")
  hooked=$(env LD_PRELOAD="$PWD/build/libvgpu.so" HAMI_REAL_LIBCUDA="$PWD/$F/libcuda.so.1" \
      HAMI_REAL_LIBNVML="$PWD/$F/libnvidia-ml.so.1" HAMI_SLICE_FILE= \
      CUDA_DEVICE_MEMORY_SHARED_CACHE="$tmp/region" CUDA_DEVICE_MEMORY_LIMIT=8g "$F/bench")
  runs="$runs$base $hooked
"
done
printf '%s' "$runs" | awk '
  NR == 1 { for (i = 1; i <= 6; i++) m[i] = $i }
  { for (i = 1; i <= 6; i++) if ($i < m[i]) m[i] = $i }
  END {
  $1 = m[1]; $2 = m[2]; $3 = m[3]; $4 = m[4]; $5 = m[5]; $6 = m[6];
  d1 = $4 - $1; d2 = $5 - $2; d3 = $6 - $3;
  printf "{\"launch_no_cap_ns\": %.1f, \"alloc_free_ns\": %.1f, \"mem_get_info_ns\": %.1f, ", d1, d2, d3;
  printf "\"baseline_ns\": {\"launch\": %.1f, \"alloc_free\": %.1f, \"mem_get_info\": %.1f}, ", $1, $2, $3;
  printf "\"targets_ns\": {\"launch_no_cap\": 50, \"alloc_free\": 200}, ";
  printf "\"within_targets\": %s}\n", (d1 <= 50 && d2 <= 200) ? "true" : "false" }'
