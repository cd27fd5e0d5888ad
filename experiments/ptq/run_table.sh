#!/usr/bin/env bash
# The PTQ recipe table on the digits ViT: one Hydra multirun per recipe row over five bit
# configurations, then the table. Usage: experiments/ptq/run_table.sh [python]
set -euo pipefail
PY=${1:-.venv/bin/python}
OUT=multirun/ptq-table
COLS="quant=w8a8,w4a8,w3a8,w4a4,w2a8"
COMMON=(export.enabled=false progress=false tracking.experiment=ptq-table)
VIT=(quant.vit.attn_matmul=true quant.vit.softmax_quantizer=log2 quant.vit.post_ln=reparam)

row() {  # row NAME OVERRIDES...
  local name=$1; shift
  "$PY" -m qsweep -m "$COLS" "${COMMON[@]}" "hydra.sweep.dir=$OUT/$name" "$@" >/dev/null
}

row minmax     quant.weight.observer=minmax quant.act.observer=minmax
row percentile quant.weight.observer=percentile quant.act.observer=percentile
row mse        quant.weight.observer=mse quant.act.observer=mse
row mse+adaround_layer quant.weight.observer=mse quant.act.observer=mse adaround=layer
row mse+adaround_block quant.weight.observer=mse quant.act.observer=mse adaround=block
row mse+lsq    quant.weight.observer=mse quant.act.observer=mse lsq=both
row mse+reparam quant.weight.observer=mse quant.act.observer=mse quant.vit.post_ln=reparam
row mse+vit    quant.weight.observer=mse quant.act.observer=mse "${VIT[@]}"
row mse+vit+intops quant.weight.observer=mse quant.act.observer=mse "${VIT[@]}" quant.intops=ivit
"$PY" experiments/ptq/table.py "$OUT"
