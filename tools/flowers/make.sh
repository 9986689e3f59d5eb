#!/usr/bin/env bash
# Reproduces the flower-world model from seeds: data → VAE → assembled folder → UNet →
# fp16 package (models/flowers-ip2p). Every stage resumes where it stopped; run it again after
# an interruption. Times for each stage on the machine it was measured on are in
# docs/closed-loop.md.
#
#   tools/flowers/make.sh [WORK_DIR]      (default: /var/tmp/flowers)
#
# Environment: VAE_STEPS, UNET_STEPS, TRAIN_EXAMPLES, UNET_LR, UNET_BATCH override the recipe.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="${1:-/var/tmp/flowers}"
fixtures="${IP2P_FIXTURES:-$root/../shared/fixtures}"
bin="$root/target/release"
mkdir -p "$work"

cargo build --release --locked --manifest-path "$root/Cargo.toml" --workspace

# 1. Data: world pairs at 256 × 192 (examples 0.. of seed 1).
"$bin/dataset-gen" --world flowers --world-examples "${TRAIN_EXAMPLES:-6000}" \
  --width 256 --height 192 --items-per-part 500 --seed 1 --out "$work/data"

# 2. The VAE (4× down) on crops of both pictures of every pair: 750 steps of 8 × 64², then
#    128² crops (GroupNorm's statistics of a 64² crop are far from a whole picture's: the
#    held-out PSNR went 19.1 → 23.5 dB in the first 50 steps of the second phase).
if [ ! -d "$work/vae/checkpoint-00000750" ]; then
  "$bin/ip2p" train-vae --config "$here/vae_config.json" --data "$work/data" \
    --out "$work/vae" --steps 750 --batch-size 8 --crop 64 --lr 1e-3 \
    --checkpoint-every 250 --resume
fi
"$bin/ip2p" train-vae --config "$here/vae_config.json" --data "$work/data" \
  --out "$work/vae" --steps "${VAE_STEPS:-1050}" --batch-size 4 --crop 128 --lr 5e-4 \
  --checkpoint-every 100 --resume --new-phase

# 3. The starting folder: the tiny CLIP of the fixtures, the VAE, a fresh 8-channel UNet.
if [ ! -d "$work/start" ]; then
  "$bin/ip2p" assemble --text-from "$fixtures/tiny-ip2p" --vae "$work/vae/final/vae" \
    --unet-config "$here/unet_config.json" --data "$work/data" --out "$work/start"
fi

# 4. The UNet, on cached encodings of the whole pictures.
"$bin/ip2p" train --model "$work/start" --data "$work/data" --out "$work/unet" \
  --cache-encodings --no-flip --batch-size "${UNET_BATCH:-8}" --lr "${UNET_LR:-5e-4}" \
  --ema 0.999 --steps "${UNET_STEPS:-4000}" --checkpoint-every 250 --resume

# 5. The shipped folder.
"$bin/ip2p" package "$work/unet/final" "$root/models/flowers-ip2p"
