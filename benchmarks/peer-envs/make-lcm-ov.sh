#!/usr/bin/env bash
# Make {work}/peers/sd15-lcm-ov, the `optimum-ov-lcm` peer of benchmarks/cpu-sd15-512-fast.yaml (README.md here):
#
#   bash benchmarks/peer-envs/make-lcm-ov.sh WORK [OPTIMUM_VENV]     # OPTIMUM_VENV default: WORK/peers/optimum-intel
#
# 1. the suite's LCM-LoRA is fused into a copy of WORK/sd15 by diffusers' own loader (load_lora_weights, fuse_lora,
#    unload_lora_weights; sdedge's venv, which has peft): WORK/peers/sd15-lcm (only the UNet is new; the rest are
#    hard links to the base's files);
# 2. optimum-intel exports that copy with its own tool, as for the 256² suite's optimum-ov-fp32 (its default for a
#    UNet under 1e9 parameters: no weight compression); OpenVINO then picks its inference precision for the CPU.
# optimum's export takes the base's AutoencoderKL only: its vae_decoder wrapper calls vae.decode(z=...), which
# AutoencoderTiny.decode(x, ...) does not take, so this peer decodes with the full VAE decoder (its own stage time).
set -euo pipefail
work=${1:?usage: make-lcm-ov.sh WORK [OPTIMUM_VENV]}
venv=${2:-$work/peers/optimum-intel}
here=$(cd "$(dirname "$0")" && pwd)
py=${SDEDGE_PYTHON:-$here/../../.venv/bin/python}
mkdir -p "$work/peers"
[ -f "$work/peers/sd15-lcm/sdedge_peer_fused.json" ] || "$py" -m sdedge.benchmarks.peer_build fuse-lora \
    --base "$work/sd15" --lora "$work/lcm-lora-sd15-random.safetensors:1.0" --out "$work/peers/sd15-lcm"
"$venv/bin/optimum-cli" export openvino --model "$work/peers/sd15-lcm" --task text-to-image --weight-format fp32 \
    "$work/peers/sd15-lcm-ov.tmp"
rm -rf "$work/peers/sd15-lcm-ov" && mv "$work/peers/sd15-lcm-ov.tmp" "$work/peers/sd15-lcm-ov"
echo "peer model ready: $work/peers/sd15-lcm-ov"
