#!/bin/bash
# A lent-GPU session's checks in short device calls (docs/results/cuda.md, "The next GPU session").
#
# Here (the dev host, once):   bash bench/cuda_session.sh prepare
#   Downloads onnxruntime-gpu 1.31.1 and onnxruntime-genai 0.18 (CUDA 13 / cp312 wheels) when missing and fills
#   .gpu/c1 .. .gpu/c6 (git-ignored through .git/info/exclude) so that no device call carries more than 64 MiB
#   with the tree: c1-c5 the onnxruntime-gpu wheel in parts (c1 also the genai wheel, stories260k and
#   mix-llama-14m's tokenizer), c6 mix-llama-14m's weights.
# There (the device tool), one call per stage, back to back (a machine idle for 30 s is given back, and with it
# every artifact and part), each with carry [".gpu/cN"] for stage N = 1..6:
#   bash bench/cuda_session.sh N
#   1 (~110 s) setup, the 0.5B random model, the builder's int4, our W4
#   2 (~35 s)  our W4-sym32                    3 (~55 s)  our W2-planes and W3-planes
#   4 (~35 s)  our W2                          5 (~190 s) onnxruntime-gpu; ort step (2 rounds), cuda_profile.py,
#                                                        the ort step again with ORT_FPA_INTB_GEMM=1
#   6 (~480 s) kernel_speed.py --gemv-sweep; parity on the CUDA EP (stories260k, mix-llama-14m: W2/W3 planes,
#              folded W4; the mix-llama-14m fold alone takes minutes). About 900 s of device time in all with
#              the machine's start: stage 6 is last because what it cuts short is the least valuable, and
#              every row is saved as it is measured.
# Every stage copies /tmp/res (JSON, Markdown) to $OUT, so each reply brings back everything measured so far.
set -u
stage=${1:?usage: bash bench/cuda_session.sh prepare|1..6}
case $stage in prepare | [1-6]) ;; *) echo "unknown stage $stage: prepare or 1..6" >&2; exit 2 ;; esac
REPO=$(cd "$(dirname "$0")/.." && pwd)
ORT_WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
GENAI_WHEEL=onnxruntime_genai-0.18.0-cp312-cp312-manylinux_2_28_x86_64.whl

if [ "$stage" = prepare ]; then
  SHARED=$REPO/../shared/models
  W=${WHEELS:-/tmp/w}
  mkdir -p "$W"
  for spec in onnxruntime-gpu==1.31.1 onnxruntime-genai==0.18.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d "$W" "$spec" || exit 1
  done
  rm -rf "$REPO/.gpu" && mkdir -p "$REPO"/.gpu/c{1,2,3,4,5,6}
  grep -qx '/.gpu/' "$REPO/.git/info/exclude" || echo '/.gpu/' >> "$REPO/.git/info/exclude"
  python3 - "$W/$ORT_WHEEL" "$REPO/.gpu" <<'EOF'
import sys
sizes = [44_000_000, 54_000_000, 54_000_000, 54_000_000, None]  # c1 also holds genai (11 MB) and the models
with open(sys.argv[1], "rb") as f:
    for i, size in enumerate(sizes):
        open(f"{sys.argv[2]}/c{i + 1}/part{i}", "wb").write(f.read() if size is None else f.read(size))
EOF
  cp "$W/$GENAI_WHEEL" "$REPO/.gpu/c1/"
  mkdir -p "$REPO/.gpu/c1/models/mix-llama-14m" "$REPO/.gpu/c6/models/mix-llama-14m"
  cp -r "$SHARED/stories260k" "$REPO/.gpu/c1/models/"
  cp "$SHARED"/mix-llama-14m/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} \
    "$REPO/.gpu/c1/models/mix-llama-14m/"
  cp "$SHARED/mix-llama-14m/model.safetensors" "$REPO/.gpu/c6/models/mix-llama-14m/"
  chmod -R u+w "$REPO/.gpu"
  du -sb "$REPO"/.gpu/c* && echo "each must stay under 59 MB (64 MiB less the tree)"
  exit 0
fi

OUT=${OUT:-/tmp/out}
mkdir -p /tmp/w /tmp/res /tmp/models "$OUT"
export PYTHONPATH=/tmp/ep:/tmp/genai EDGEPACK_BENCH_CACHE=/tmp/cache
[ -d /tmp/ortgpu ] && export PYTHONPATH=/tmp/ortgpu:$PYTHONPATH
PY=${PY:-python3}  # the device image's python3 has torch, triton, transformers, onnx
CR="$PY $REPO/bench/cuda_runtime.py --cache /tmp/cache/cuda --tokenizer /tmp/models/mix-llama-14m"
RES=/tmp/res/cuda_runtime.json
Q=/tmp/cache/cuda/qwen2.5-0.5b-random
start=$(date +%s)
cp "$REPO"/.gpu/c"$stage"/part* /tmp/w/ 2>/dev/null
case $stage in
1)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -m pip install -q --no-deps --no-build-isolation --target /tmp/ep "$REPO" 2>&1 | grep -v WARN | tail -2
  $PY -m pip install -q --no-index --no-deps --target /tmp/genai "$REPO"/.gpu/c1/$GENAI_WHEEL 2>&1 | tail -2
  cp -r "$REPO"/.gpu/c1/models/* /tmp/models/
  $CR --steps model,builder,export --widths W4 --out $RES 2>&1 | grep -v "^|" | tail -8
  ;;
2) $CR --steps export --widths W4-sym32 --out $RES 2>&1 | grep -v "^|" | tail -4 ;;
3) $CR --steps export --widths W2-planes,W3-planes --out $RES 2>&1 | grep -v "^|" | tail -4 ;;
4) $CR --steps export --widths W2 --out $RES 2>&1 | grep -v "^|" | tail -4 ;;
5)
  (cd /tmp/w && cat part0 part1 part2 part3 part4 > $ORT_WHEEL && \
    $PY -m pip install -q --no-index --no-deps --target /tmp/ortgpu $ORT_WHEEL 2>&1 | tail -2)
  export PYTHONPATH=/tmp/ortgpu:$PYTHONPATH
  widths=W4,W4-sym32,W2,W2-planes,W3-planes
  $CR --steps ort --rounds 2 --widths $widths --timeout 120 --out $RES 2>&1 | grep -v "^round" | tail -40
  cp /tmp/res/* "$OUT"/
  (cd /tmp && timeout 120 $PY "$REPO/bench/cuda_profile.py" $Q/builder-int4 $Q/edgepack-W4 $Q/edgepack-W4-sym32 \
    --json /tmp/res/cuda_profile.json 2>&1 | grep -v "^USDT\|^STAGE" | tail -60)
  cp $RES /tmp/res/cuda_runtime_fpa.json
  ORT_FPA_INTB_GEMM=1 $CR --steps ort --rounds 1 --widths W4,W4-sym32 --timeout 60 \
    --out /tmp/res/cuda_runtime_fpa.json 2>&1 | grep -v "^round" | tail -20
  # which contrib fusions (SwiGLU, MatMulNBitsMlp/Qkv) the CUDA EP runs: none has a CPU kernel in 1.32 (~5 s)
  (cd /tmp && timeout 60 $PY "$REPO/bench/fused_ops.py" --json /tmp/res/fused_ops_cuda.json 2>&1 | tail -12)
  cp /tmp/res/* "$OUT"/
  # compressed KV caches' parity on the CUDA EP (float16-kv bounds measured on the CPU EP only; ~30 s)
  $CR --steps parity --widths W4-kv4,W4-minicache-kv8 --no-fold --model /tmp/models/stories260k \
    --parity-model /tmp/models/stories260k --parity-model-fused /nonexistent --timeout 120 \
    --out /tmp/res/cuda_parity_kv.json 2>&1 | grep -v "^|" | tail -6
  # edgepack generate on the CUDA EP vs the CPU EP, one compressed-KV artifact: greedy ids in the JSONs (~10 s)
  G=/tmp/cache/cuda/parity/stories260k/edgepack-W4-minicache-kv8
  for d in cuda cpu; do
    (cd /tmp && PYTHONPATH=/tmp/ep:$PYTHONPATH timeout 60 $PY -m edgepack generate $G --device $d \
      --prompt "Once upon a time" --max-new-tokens 32 --json /tmp/res/cuda_generate_$d.json 2>&1 | tail -2)
  done
  ;;
6)
  cp "$REPO"/.gpu/c6/models/mix-llama-14m/model.safetensors /tmp/models/mix-llama-14m/
  (cd /tmp && timeout 200 $PY "$REPO/bench/kernel_speed.py" --out /tmp/res/kernels.json --gemv-sweep 2>&1 | tail -60)
  cp /tmp/res/* "$OUT"/
  # the folded W4 of mix-llama-14m cures for about 4.5 minutes on a 2-core dev host (its three cure phases)
  $CR --steps parity --widths W2-planes,W3-planes --model /tmp/models/stories260k \
    --parity-model /tmp/models/stories260k --parity-model-fused /tmp/models/mix-llama-14m --timeout 300 \
    --out /tmp/res/cuda_parity.json 2>&1 | grep -v "^|" | tail -10
  ;;
esac
cp /tmp/res/* "$OUT"/ 2>/dev/null
cp /tmp/cache/cuda/*.log "$OUT"/ 2>/dev/null
echo "stage $stage done in $(( $(date +%s) - start )) s"
