#!/usr/bin/env bash
# Decode ms per token of two kiln binaries on the same model, prompt and machine, alternating
# runs: what keeping the KV cache in place (persistent state, `write_slice`) saves against
# copying it in and out of every decode step.
# Usage: scripts/bench_decode_state.sh <kiln-before> <kiln-after> [layers] [prompt] [new] [rounds]
# The model is Gemma 2 2B's layer geometry (2304 wide, 8/4 heads of 256, so the same cache
# bytes per layer) with `layers` layers and a 32000-token vocabulary, random f32 weights made
# with the Python venv of scripts/requirements-fixtures.txt (KILN_VENV, default /opt/kiln-venv).
set -euo pipefail
before=$1
after=$2
layers=${3:-4}
prompt=${4:-1024}
new=${5:-9}
rounds=${6:-3}
venv=${KILN_VENV:-/opt/kiln-venv}
dir=${KILN_BENCH_DIR:-/tmp/kiln-bench}/gemma2-2b-geometry-${layers}l
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
mkdir -p "$dir"
"$venv/bin/python" - "$dir" "$layers" "$prompt" <<'PY'
import json, os, sys, torch
from safetensors.torch import save_file
out, layers, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
d, f, h, kv, hd, v = 2304, 9216, 8, 4, 256, 32000
cfg = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attention_bias": False,
       "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "bos_token_id": 2, "eos_token_id": 1,
       "pad_token_id": 0, "head_dim": hd, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": d,
       "intermediate_size": f, "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
       "max_position_embeddings": 8192, "num_attention_heads": h, "num_hidden_layers": layers,
       "num_key_value_heads": kv, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
       "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "sliding_window": 4096,
       "tie_word_embeddings": True, "vocab_size": v, "dtype": "float32"}
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
if not os.path.exists(os.path.join(out, "model.safetensors")):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) / s[-1] ** 0.5
    t = {"model.embed_tokens.weight": r(v, d), "model.norm.weight": torch.randn(d, generator=g) * 0.05}
    for i in range(layers):
        p = f"model.layers.{i}"
        for n in ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]:
            t[f"{p}.{n}.weight"] = torch.randn(d, generator=g) * 0.05
        t[f"{p}.self_attn.q_proj.weight"] = r(h * hd, d)
        t[f"{p}.self_attn.k_proj.weight"] = r(kv * hd, d)
        t[f"{p}.self_attn.v_proj.weight"] = r(kv * hd, d)
        t[f"{p}.self_attn.o_proj.weight"] = r(d, h * hd)
        t[f"{p}.mlp.gate_proj.weight"] = r(f, d)
        t[f"{p}.mlp.up_proj.weight"] = r(f, d)
        t[f"{p}.mlp.down_proj.weight"] = r(d, f)
    save_file(t, os.path.join(out, "model.safetensors"))
g = torch.Generator().manual_seed(1)
save_file({"input_ids": torch.randint(3, v, (1, prompt), generator=g, dtype=torch.int64)}, os.path.join(out, "inputs.safetensors"))
PY
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$rounds"); do
  for which in before after; do
    bin=${!which}
    json=$("$bin" generate "$dir" --inputs "$dir/inputs.safetensors" --max-new-tokens "$new" --out "$dir/out_$which.safetensors" | grep '^{')
    echo "round $r $which: $json load $(cut -d' ' -f1 /proc/loadavg)"
  done
  cmp -s <("$venv/bin/python" -c "import sys; from safetensors.torch import load_file; print(load_file(sys.argv[1])['sequences'].tolist())" "$dir/out_before.safetensors") \
         <("$venv/bin/python" -c "import sys; from safetensors.torch import load_file; print(load_file(sys.argv[1])['sequences'].tolist())" "$dir/out_after.safetensors") \
    && echo "round $r: same sequences" || echo "round $r: SEQUENCES DIFFER"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
