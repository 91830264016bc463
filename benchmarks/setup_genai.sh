#!/usr/bin/env bash
# Build the onnxruntime-genai baselines (INT4 / FP32 CPU) in a separate venv.
#
# onnxruntime-genai 0.18's model builder needs transformers 5, which conflicts
# with the project's transformers 4.57, so it lives in its own venv outside the
# repo. Idempotent: an existing venv / an existing build folder is reused.
#
# Usage: benchmarks/setup_genai.sh [NAME=HF_FOLDER[:PRECISIONS] ...]
#   default: smollm2 (int4,fp32) and gemma3-270m (int4) from the compressor cache.
# Env: GENAI_VENV (default /work/genai-venv), GENAI_BUILDS (default /work/genai-builds)
# Note: the builder's --help crashes in 0.18 (a '%' in a help string); the flags
# are read from builder.py's get_args(): -i hf_folder -o out -p precision -e ep.
set -euo pipefail

VENV="${GENAI_VENV:-/work/genai-venv}"
BUILDS="${GENAI_BUILDS:-/work/genai-builds}"
MODELS="/root/.cache/compressor/models"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# Pin torch so nothing pulls a CUDA build (the CPU wheel is local).
echo "torch==2.13.0" > "$VENV/constraints.txt"
PIP=("$VENV/bin/pip" install -q -c "$VENV/constraints.txt")
if ! "$VENV/bin/python" -c "import onnxruntime_genai, onnx_ir, transformers, torch" 2>/dev/null; then
    "${PIP[@]}" torch==2.13.0
    "${PIP[@]}" onnxruntime-genai==0.18.0 "transformers>=5,<6" onnx onnx-ir onnxruntime \
        numpy sentencepiece protobuf
fi

if [ "$#" -eq 0 ]; then
    set -- "smollm2=$MODELS/smollm2:int4,fp32" "gemma3-270m=$MODELS/gemma3-270m:int4"
fi

mkdir -p "$BUILDS"
for spec in "$@"; do
    name="${spec%%=*}"; rest="${spec#*=}"
    folder="${rest%%:*}"; precs="int4"
    [ "$rest" != "$folder" ] && precs="${rest#*:}"
    for p in ${precs//,/ }; do
        out="$BUILDS/$name-$p"
        if [ -f "$out/genai_config.json" ] && [ -f "$out/model.onnx" ]; then
            echo "[setup_genai] $out exists, skipping"; continue
        fi
        echo "[setup_genai] building $out from $folder ($p, cpu)"
        # Builder defaults for int4/cpu: block_size=32, accuracy_level=4,
        # is_symmetric=true (see the report / genai_config.json).
        HF_HUB_OFFLINE=1 "$VENV/bin/python" - \
            -i "$folder" -o "$out" -p "$p" -e cpu -c "$BUILDS/.cache" \
            --extra_options hf_token=false <<'PY' 2>&1 | tr '\r' '\n' | grep -v '^Saving \|it/s\]$\|\[INFO\]'
# = python -m onnxruntime_genai.models.builder ARGS, plus one shim: with
# transformers 5, Gemma 3's config holds RoPE per layer type
# ({"full_attention": {rope_theta: 1e6}, "sliding_attention": {rope_theta: 1e4}})
# and no rope_theta / rope_local_base_freq, which the 0.18 Gemma3 builder
# reads (KeyError 'rope_type'). Flatten it back to the 4.x attributes.
import runpy, sys
import onnxruntime_genai.models  # puts models/ on sys.path; builder.py imports "builders"
from builders import gemma
orig = gemma.Gemma3Model.make_config_init
def make_config_init(self, config):
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "full_attention" in rp and "sliding_attention" in rp:
        assert rp["full_attention"].get("rope_type", "default") == "default", rp
        config.rope_theta = rp["full_attention"]["rope_theta"]
        config.rope_local_base_freq = rp["sliding_attention"]["rope_theta"]
        config.rope_parameters = dict(rp["full_attention"])
    orig(self, config)
gemma.Gemma3Model.make_config_init = make_config_init
sys.argv = ["builder"] + sys.argv[1:]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
PY
    done
done
echo "[setup_genai] done: $(ls "$BUILDS")"
