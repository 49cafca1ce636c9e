#!/usr/bin/env bash
# The demo timed from a clean run directory, as bench/RESULTS.md records it: run it with nothing else running.
#   bash bench/demo_alone.sh RUN_DIR [OUT_DIR]
# RUN_DIR must not exist (it is made). The caches a first run on a fresh machine would not have (imported
# model, teacher chat, teacher GGUF and reference) are moved aside into ~/.cache/ollama-compress-aside-TIME,
# never deleted; move them back or delete that folder afterwards. OUT_DIR (default RUN_DIR.timing) gets:
# demo.err (stderr, each line stamped with the clock and seconds since the start), demo.out, demo.rc,
# load.txt (load average every 30 s), and ollama-answer.txt (the registered Q4_K_M asked one question).
set -uo pipefail
RUN=${1:?usage: bash bench/demo_alone.sh RUN_DIR [OUT_DIR]}
OUT=${2:-$RUN.timing}
if [ -e "$RUN" ]; then echo "demo_alone: $RUN exists; give a new folder" >&2; exit 2; fi
mkdir -p "$RUN" "$OUT"
RUN=$(realpath "$RUN"); OUT=$(realpath "$OUT")
CACHE=${OLLAMA_COMPRESS_CACHE:-$HOME/.cache/ollama-compress}
ASIDE=$CACHE/../ollama-compress-aside-$(date +%Y%m%d-%H%M%S)
mkdir -p "$ASIDE"
for d in imported teacher-chat teacher-gguf teacher-reference; do
  [ -e "$CACHE/$d" ] && mv "$CACHE/$d" "$ASIDE/"
done
(while sleep 30; do echo "$(date +%T) $(cut -d' ' -f1-3 /proc/loadavg)"; done) > "$OUT/load.txt" &
SAMPLER=$!
STAMP='import sys, time
t0 = time.time()
for line in sys.stdin:
    now = time.strftime("%H:%M:%S")
    sys.stdout.write(f"{now} +{time.time() - t0:7.1f} {line}")
    sys.stdout.flush()'
cd "$RUN"
/usr/bin/time -v ollama-compress run smollm2-135m-demo > "$OUT/demo.out" 2> >(python3 -u -c "$STAMP" > "$OUT/demo.err")
CODE=$?
echo $CODE > "$OUT/demo.rc"
kill $SAMPLER
if [ "$CODE" != 0 ]; then echo "demo_alone: the demo failed (exit $CODE); see $OUT/demo.err" >&2; exit 1; fi
OLLAMA=$(ls -d "$CACHE"/ollama-*/bin | head -1)/ollama
"$OLLAMA" serve > "$OUT/ollama-serve.log" 2>&1 &
SERVE=$!
sleep 5
"$OLLAMA" run smollm2-135m-demo:Q4_K_M "What is the capital of France? Answer in one sentence." > "$OUT/ollama-answer.txt" 2>&1
echo "ollama rc $?" >> "$OUT/ollama-answer.txt"
kill $SERVE
