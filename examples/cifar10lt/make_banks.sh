#!/usr/bin/env bash
# Regenerate the CIFAR-10-LT (IR50) demo banks train.h5 / val.h5 / test.h5 beside this script with the
# `disalign extract`, from the shared model and lists. The CIFAR JPEGs are unpacked to a temporary
# directory (or taken from $DISALIGN_CIFAR_DIR) and never copied into the repository.
#   usage: examples/cifar10lt/make_banks.sh [extra extract flags, e.g. --workers 2]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
cd "$repo"
shared=${DISALIGN_SHARED_DIR:-../shared}  # relative, so the banks record ../shared/... as their source
rel=examples/cifar10lt
cp "$shared/models/cifar10lt-ir50-resnet32.ts" "$shared/models/cifar10lt-ir50-resnet32.json" "$rel/"
chmod u+w "$rel"/cifar10lt-ir50-resnet32.*
cifar=${DISALIGN_CIFAR_DIR:-}
if [ -z "$cifar" ]; then
  cifar=$(mktemp -d)
  trap 'rm -rf "$cifar"' EXIT
  tar xzf "$shared/data/cifar10-jpeg.tar.gz" -C "$cifar"
fi
for split in train val test; do
  counts=()
  [ "$split" = train ] || counts=(--class-counts-from "$rel/train.h5")
  "$python" -m disalign extract \
    --model "$rel/cifar10lt-ir50-resnet32.ts" --card "$rel/cifar10lt-ir50-resnet32.json" \
    --root "$cifar" --list "$shared/data/cifar10lt-ir50/$split.txt" \
    --out "$rel/$split.h5" --overwrite --quiet "${counts[@]}" "$@"
  echo "wrote $rel/$split.h5"
done
