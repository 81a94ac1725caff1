#!/usr/bin/env bash
# GPU checks of feature_extract, from the repository root of a CUDA machine with torchvision (a few minutes):
#   1. correctness: synthetic 300 px JPEGs through torchvision ResNet-50 (fixed random weights) on CUDA,
#      bf16 + channels-last, with Pillow and with device (nvJPEG) decoding, against float32 on the CPU;
#   2. throughput: bench/extract_throughput.py, Pillow decoding and --decode torchvision.
#   usage: bash bench/gpu_extract_check.sh [WORKERS]      env: PYTHON (python), WORK (/tmp/fx-gpu)
set -euo pipefail
py=${PYTHON:-python}
work=${WORK:-/tmp/fx-gpu}
workers=${1:-14}
mkdir -p "$work"

"$py" - "$work" <<'PY'
import sys, time
from pathlib import Path
import torch, torchvision
sys.path.insert(0, "bench"); sys.path.insert(0, ".")
from extract_throughput import make_synthetic
from disalign.calib.data.bank import load_bank
from disalign.feature_extract.extract import ExtractConfig, extract_bank

work = Path(sys.argv[1])
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.cuda.get_device_name()}, "
      f"{torch.get_num_threads()} CPU threads", flush=True)
torch.manual_seed(0)
torch.save(torchvision.models.resnet50().state_dict(), work / "r50.pt")
root = work / "check"
listing = make_synthetic(root, 1024, 300, 90, 1)
banks = {}
for name, device, decode, dtype in (("cpu", "cpu", "pil", "float32"), ("cuda-pil", "cuda", "pil", "float32"),
                                    ("cuda-nvjpeg", "cuda", "torchvision", "float32")):
    cfg = ExtractConfig(model="torchvision:resnet50", weights=work / "r50.pt", root=root, list_file=listing,
                        out=work / f"{name}.h5", device=device, decode=decode, feature_dtype=dtype, batch_size=128,
                        workers=8, overwrite=True, quiet=True)
    start = time.perf_counter()
    result = extract_bank(cfg)
    banks[name] = load_bank(result.path)
    print(f"{name:12s} {result.images} images in {time.perf_counter() - start:.1f} s, skipped {result.skipped}", flush=True)
ref = banks["cpu"]
ok = True
for name in ("cuda-pil", "cuda-nvjpeg"):
    b = banks[name]
    same_rows = torch.equal(b.sample_index, ref.sample_index)
    cos = torch.nn.functional.cosine_similarity(b.features.float(), ref.features.float(), dim=1)
    agree = (b.logits.argmax(1) == ref.logits.argmax(1)).float().mean().item()
    rel = ((b.logits - ref.logits).norm(dim=1) / ref.logits.norm(dim=1)).median().item()
    good = same_rows and cos.min().item() > 0.98 and agree > 0.9
    ok &= good
    print(f"{name:12s} vs cpu fp32: rows equal {same_rows}, feature cosine min {cos.min():.4f} mean {cos.mean():.4f}, "
          f"top-1 agreement {agree:.3f}, median logit rel. error {rel:.4f} -> {'OK' if good else 'CHECK'}", flush=True)
sys.exit(0 if ok else 1)
PY

# DataLoader batches travel through /dev/shm: workers x prefetch x 38.5 MB (256 x 224 x 224 x 3 uint8).
shm_mb=$(df -Pm /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
prefetch=4
if [ -n "$shm_mb" ] && [ "$shm_mb" -lt $((workers * 4 * 40 + 512)) ]; then prefetch=1; fi
echo "/dev/shm free: ${shm_mb:-unknown} MB -> --prefetch $prefetch"
for decode in pil torchvision; do
  "$py" bench/extract_throughput.py --synthetic-jpegs 50000 --repeat 4 --jpeg-size 256 --synthetic-dir "$work/jpegs" \
      --model torchvision:resnet50 --device cuda --batch-size 256 --workers "$workers" --prefetch "$prefetch" \
      --decode "$decode" --model-seconds 10 --tmp "$work"
done
