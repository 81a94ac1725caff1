"""Label-shift adaptation on a balanced test bank: balanced vs oracle vs estimated prior.

    disalign fit examples/cifar10lt/train.h5 --val examples/cifar10lt/val.h5 --rho auto --out runs/prior/calibration
    python bench/label_shift.py --calibration runs/prior/calibration [--seeds 5] [--json runs/prior/label_shift.json]
    # another model of the suite (bench/suite.py's banks and run): its test bank, and the model and card the server loads
    python bench/label_shift.py --calibration WORK/runs/NAME/seed-0/calibration --test WORK/banks/NAME/test.h5 \
        --model ../shared/models/NAME.ts --card ../shared/models/NAME.json

The defaults are the committed CIFAR-10-LT IR50 test bank and its model.

Test sets drawn from the balanced test bank (980 rows per class) without replacement, 5 seeds each:
"forward" keeps n_c = 980 · r^(−c/9) rows of class c (the training order: class 0 is the head), "backward"
reverses it, at imbalance r = 10 and 50; "uniform" keeps 500 rows per class. For each set: plain accuracy
of the balanced calibration, of the oracle (aligned to the set's true class frequencies), of the offline
estimate (what ``disalign adapt`` computes: MAP-EM on the BCTS probabilities, applied only when the test
rejects the balanced reference; "EM, no test" applies it always), and of the server in adaptive mode fed
the set as traffic in random order (/calibrate requests of ``--rows-per-request`` rows, in process,
every answer scored as served: the first rows are served balanced while the window fills). Gap closed
= (estimate − balanced) / (oracle − balanced). Then the L1 error of the estimated prior against the
number of rows seen (rows drawn i.i.d. from the set's prior, with replacement).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from disalign.calib.core import label_shift as ls
from disalign.calib.data.bank import Bank, load_bank
from disalign.calib.estimators.methods import load_calibration
from disalign.calib.evaluation.evaluate import predict_in_blocks
from disalign.cli.adapt import probability_calibration, reference_probabilities

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "cifar10lt"
SETS = (("forward", 10.0), ("forward", 50.0), ("backward", 10.0), ("backward", 50.0), ("uniform", 1.0))
SAMPLE_SIZES = (100, 1000, 5000)
ADMIN_TOKEN = "bench-label-shift-admin-token"  # the in-process server's, to reset its prior between sets
TRAFFIC_TOKEN = "bench-label-shift-traffic-token"  # the traffic is the trusted source 'bench' (disalign.service.traffic)


def class_profile(kind: str, imbalance: float, num_classes: int) -> np.ndarray:
    """Relative class frequencies (K,), max 1: r^(−c/(K−1)) forward, reversed backward, ones uniform."""
    if kind == "uniform":
        return np.ones(num_classes)
    profile = imbalance ** (-np.arange(num_classes) / (num_classes - 1))
    return profile if kind == "forward" else profile[::-1].copy()


def draw_set(labels: np.ndarray, kind: str, imbalance: float, seed: int) -> np.ndarray:
    """Row indices of one test set (module docstring), in random order."""
    k = int(labels.max()) + 1
    per_class = np.bincount(labels, minlength=k).min()
    counts = np.full(k, 500) if kind == "uniform" else np.round(per_class * class_profile(kind, imbalance, k)).astype(int)
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in enumerate(counts)])
    return rng.permutation(rows)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).double().mean())


def served_accuracy(client, bank: Bank, rows: np.ndarray, rows_per_request: int) -> tuple[float, dict]:
    """Feed ``rows`` to a running adaptive server as traffic; → (accuracy of the answers, final /admin/prior status)."""
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert client.post("/admin/prior", headers=auth, json={"action": "reset"}).status_code == 200
    correct = 0
    for start in range(0, rows.size, rows_per_request):
        part = rows[start:start + rows_per_request]
        body = {"rows": [{"features": bank.features[i].float().tolist(), "logits": bank.logits[i].tolist()} for i in part.tolist()],
                "top_k": 1}
        results = client.post("/calibrate", json=body, headers={"Disalign-Traffic-Token": TRAFFIC_TOKEN}).json()["results"]
        predicted = np.array([r["top_k"][0]["index"] for r in results])
        correct += int((predicted == bank.labels[part].numpy()).sum())
    client.app.state.runtime.prior.wait_for_estimate()
    return 100.0 * correct / rows.size, client.get("/admin/prior", headers=auth).json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--calibration", type=Path, required=True, help="from disalign fit … --val (BCTS in the artifact)")
    parser.add_argument("--test", type=Path, default=EXAMPLES / "test.h5")
    parser.add_argument("--model", type=Path, default=EXAMPLES / "cifar10lt-ir50-resnet32.ts",
                        help="the stage-1 TorchScript model the server loads (the one the banks came from)")
    parser.add_argument("--card", type=Path, default=EXAMPLES / "cifar10lt-ir50-resnet32.json", help="its model card")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--no-server", action="store_true", help="skip the adaptive-server column")
    parser.add_argument("--rows-per-request", type=int, default=10)
    parser.add_argument("--window", type=int, default=5000, help="DISALIGN_PRIOR_WINDOW of the server")
    parser.add_argument("--update-every", type=int, default=10, help="DISALIGN_PRIOR_UPDATE_EVERY (requests; 10 x 10 rows = every 100 rows, the default cadence for one image per request)")
    parser.add_argument("--min-rows", type=int, default=200, help="DISALIGN_PRIOR_MIN_ROWS")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    calibrator = load_calibration(args.calibration)
    fitted = probability_calibration(calibrator)
    print(f"probability calibration: {fitted}")
    bank = load_bank(args.test)
    keep = bank.view == 0
    features, logits, labels = bank.features[keep], bank.logits[keep], bank.labels[keep]
    z = predict_in_blocks(calibrator, features, logits)  # (N, K) balanced calibrated logits
    p_ref = reference_probabilities(calibrator, features, logits)  # (N, K) softmax(z / T + b)
    k = z.shape[1]

    client = None
    if not args.no_server:
        from fastapi.testclient import TestClient

        from disalign.service.main import create_app
        from disalign.service.settings import Settings

        settings = Settings(model=str(args.model), card=args.card,
                            calibration=args.calibration, admin_token=ADMIN_TOKEN, torch_threads=1, prior="adaptive",
                            prior_window=args.window, prior_update_every=args.update_every, prior_min_rows=args.min_rows,
                            prior_sources={"bench": TRAFFIC_TOKEN}, prior_dir=Path(tempfile.mkdtemp(prefix="label-shift-prior-")))
        client = TestClient(create_app(settings)).__enter__()
        print(f"server: adaptive, window {settings.prior_window} rows, estimate every {settings.prior_update_every} requests "
              f"of {args.rows_per_request} rows once {settings.prior_min_rows} rows are in")

    whole = ls.estimate_prior(p_ref)
    cost = accuracy(z, labels) - accuracy(ls.adjust_to_prior(z, whole.prior, fitted), labels)
    print(f"whole balanced test bank ({labels.numel()} rows): statistic/row {whole.statistic / whole.num_samples:.4f}, "
          f"p = {whole.p_value:.3g} → {'adapt' if whole.adapt else 'keep the reference'}; L1 from uniform "
          f"{ls.l1_distance(whole.prior, ls.uniform_prior(k)):.3f}; applying it anyway would cost {cost:.2f} points")

    records = []
    for kind, imbalance in SETS:
        for seed in range(args.seeds):
            rows = torch.from_numpy(draw_set(labels.numpy(), kind, imbalance, seed))
            y = labels[rows]
            true = torch.bincount(y, minlength=k).double() / y.numel()
            estimate = ls.estimate_prior(p_ref[rows])
            record = {"set": f"{kind} {imbalance:g}", "seed": seed, "rows": int(rows.numel()),
                      "balanced": accuracy(z[rows], y), "oracle": accuracy(ls.adjust_to_prior(z[rows], true, fitted), y),
                      "offline": accuracy(ls.adjust_to_prior(z[rows], estimate.prior, fitted), y) if estimate.adapt else accuracy(z[rows], y),
                      "em_no_test": accuracy(ls.adjust_to_prior(z[rows], estimate.prior, fitted), y),
                      "offline_adapted": estimate.adapt, "offline_l1": ls.l1_distance(estimate.prior, true),
                      "statistic_per_row": estimate.statistic / estimate.num_samples}
            if client is not None:
                record["server"], status = served_accuracy(client, bank, np.flatnonzero(keep.numpy())[rows.numpy()], args.rows_per_request)
                record["server_l1"] = ls.l1_distance(torch.tensor(status["estimate"]["prior"]), true) if status["estimate"] else None
                record["server_final_version"] = status["version"]
            records.append(record)
            print(json.dumps(record))

    print("\n| set | rows | balanced | oracle | adapt (offline) | gap closed | EM, no test | server (adaptive) | gap closed | L1 offline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, imbalance in SETS:
        group = [r for r in records if r["set"] == f"{kind} {imbalance:g}"]

        def mean(key: str, group=group) -> float:
            return float(np.mean([r[key] for r in group]))

        def closed(key: str, group=group, kind=kind) -> str:
            gaps = [(r[key] - r["balanced"]) / (r["oracle"] - r["balanced"]) for r in group if r["oracle"] - r["balanced"] > 1e-9]
            if kind == "uniform" or not gaps:
                return f"cost {mean('balanced') - mean(key):+.2f} pt"
            return f"{100 * (mean(key) - mean('balanced')) / (mean('oracle') - mean('balanced')):.0f} % (min {100 * min(gaps):.0f} %)"

        server = (f"{mean('server'):.2f} | {closed('server')}" if client is not None else "– | –")
        adapted = sum(r["offline_adapted"] for r in group)
        print(f"| {kind} {imbalance:g} | {group[0]['rows']} | {mean('balanced'):.2f} | {mean('oracle'):.2f} | {mean('offline'):.2f} "
              f"({adapted}/{len(group)} adapted) | {closed('offline')} | {mean('em_no_test'):.2f} | {server} | {mean('offline_l1'):.3f} |")

    print("\nL1 error of the estimated prior vs rows seen (i.i.d. draws from the set's prior; mean ± sd over seeds; adapted = test rejected uniform)")
    print("| set | " + " | ".join(f"{n} rows" for n in SAMPLE_SIZES) + " |")
    print("|---|" + "---|" * len(SAMPLE_SIZES))
    by_class = [torch.nonzero(labels == c).squeeze(1) for c in range(k)]
    curve = {}
    for kind, imbalance in SETS:
        prior = class_profile(kind, imbalance, k)
        prior = prior / prior.sum()
        cells = []
        for n in SAMPLE_SIZES:
            errors, adapted = [], 0
            for seed in range(args.seeds):
                rng = np.random.default_rng(1000 + seed)
                classes = rng.choice(k, size=n, p=prior)
                rows = torch.stack([by_class[c][rng.integers(by_class[c].numel())] for c in classes])
                estimate = ls.estimate_prior(p_ref[rows])
                errors.append(ls.l1_distance(estimate.prior, torch.from_numpy(prior)))
                adapted += estimate.adapt
            curve[f"{kind} {imbalance:g} {n}"] = errors
            cells.append(f"{np.mean(errors):.3f} ± {np.std(errors):.3f} ({adapted}/{args.seeds})")
        print(f"| {kind} {imbalance:g} | " + " | ".join(cells) + " |")

    if client is not None:
        client.__exit__(None, None, None)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"sets": records, "l1_curve": curve}, indent=2) + "\n")


if __name__ == "__main__":
    main()
