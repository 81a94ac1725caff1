"""Poisoning the adaptive prior: what an unauthenticated client, and a trusted source capped at its share, do to
honest accuracy; and how soon three replicas serve a newly published prior. Prints numbers; not a test.

    .venv/bin/python bench/prior_poisoning.py [--shares 0.05,0.1,0.25] [--rows-per-request 50] [--no-replicas]

Calibration: logit adjustment (τ = 1) of the shared CIFAR-10-LT IR50 ResNet-32 with its probability calibration
(BCTS) fitted on the committed val bank — the setting the attack of issue 21 was measured in (honest accuracy
76.2 % before, 36.5 % after 100 requests of synthetic rows). Every server runs ``DISALIGN_PRIOR=adaptive`` with
the defaults but ``DISALIGN_PRIOR_UPDATE_EVERY=10`` (an estimate every 10 trusted requests: the attack gets
many chances) and one trusted source, ``gateway`` (max_share 1), whose token the honest traffic carries.

Rows come from the committed test bank (980 per class), disjoint between roles: honest traffic = 200 rows
per class in random order; the attacker = real class-0 rows, one attacker request after every honest one, so
the attacker sends 50 % of all rows; the evaluation set = 300 other rows per class, sent afterwards without a
token (so that scoring does not move what it scores) and scored as served. Scenarios, each on a fresh server
and prior directory:

- ``none``: honest traffic only (the baseline);
- ``unauthenticated``: the attacker sends no token; ``wrong token``: a made-up one;
- ``capped c``: the attacker holds a real token, of source ``partner`` with max_share c. Its share allows:
  the accuracy of the same evaluation set served the prior (1 − c)·π_honest + c·π_attack, with π_honest the
  baseline's served prior and π_attack one-hot on class 0 — where an honestly counted source holding c of the
  rows moves a prior.

Replicas: three ``disalign serve`` processes on loopback share one calibration directory (adaptive, watch
interval 1 s). ``disalign adapt --publish`` on a forward IR10 bank, then ``POST /admin/prior set`` on one
replica: the seconds from the publish until all three answer ``/calibrate`` with the new ``prior_version``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from disalign.calib.core import label_shift as ls
from disalign.calib.data.bank import Bank, load_bank, write_bank
from disalign.calib.estimators.baselines.prior import LogitAdjustment
from disalign.calib.estimators.methods import load_calibration
from disalign.cli.adapt import probability_calibration

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "cifar10lt"
SHARED = Path(os.environ.get("DISALIGN_SHARED_DIR", REPO.parent / "shared"))
MODEL = SHARED / "models" / "cifar10lt-ir50-resnet32.ts"
CARD = SHARED / "models" / "cifar10lt-ir50-resnet32.json"
ADMIN_TOKEN = "bench-prior-poisoning-admin-token"
GATEWAY_TOKEN = "bench-gateway-traffic-token-0001"
PARTNER_TOKEN = "bench-partner-traffic-token-0002"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def split_rows(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(honest traffic: 200 per class, evaluation: 300 per class, attacker pool: the other class-0 rows)."""
    rng = np.random.default_rng(seed)
    honest, evaluation, attack = [], [], None
    for c in range(int(labels.max()) + 1):
        rows = rng.permutation(np.flatnonzero(labels == c))
        honest.append(rows[:200])
        evaluation.append(rows[200:500])
        if c == 0:
            attack = rows[500:]
    return rng.permutation(np.concatenate(honest)), rng.permutation(np.concatenate(evaluation)), attack


def body(bank: Bank, rows: np.ndarray) -> dict:
    return {"rows": [{"features": bank.features[i].float().tolist(), "logits": bank.logits[i].tolist()} for i in rows.tolist()],
            "top_k": 1}


def run_scenario(calibration: Path, bank: Bank, honest: np.ndarray, evaluation: np.ndarray, attack: np.ndarray,
                 attacker_headers: dict | None, share: float, rows_per_request: int, work: Path) -> dict:
    """One fresh in-process server: the traffic, then the evaluation set → accuracy, served prior, estimate."""
    from fastapi.testclient import TestClient

    from disalign.service.main import create_app
    from disalign.service.settings import Settings

    sources = {"gateway": {"token": GATEWAY_TOKEN}, "partner": {"token": PARTNER_TOKEN, "max_share": share}}
    settings = Settings(model=str(MODEL), card=CARD, calibration=calibration, admin_token=ADMIN_TOKEN, torch_threads=1,
                        watch_interval_s=0, prior="adaptive", prior_update_every=10, prior_sources=sources,
                        prior_dir=work / "prior")
    with TestClient(create_app(settings)) as client:
        tracker = client.app.state.runtime.prior
        cycle = 0
        for start in range(0, honest.size, rows_per_request):
            r = client.post("/calibrate", json=body(bank, honest[start:start + rows_per_request]),
                            headers={"Disalign-Traffic-Token": GATEWAY_TOKEN})
            assert r.status_code == 200, r.text
            if attacker_headers is not None:
                part = np.resize(attack[cycle:], rows_per_request)  # real class-0 rows, cycled
                cycle = (cycle + rows_per_request) % attack.size
                assert client.post("/calibrate", json=body(bank, part), headers=attacker_headers).status_code == 200
            tracker.wait_for_estimate()
        correct = 0
        for start in range(0, evaluation.size, 500):
            part = evaluation[start:start + 500]
            results = client.post("/calibrate", json=body(bank, part)).json()["results"]
            correct += int((np.array([r["top_k"][0]["index"] for r in results]) == bank.labels[part].numpy()).sum())
        status = client.get("/admin/prior", headers=AUTH).json()
    return {"accuracy": 100.0 * correct / evaluation.size, "status": status}


def allowed_accuracy(calibration: Path, bank: Bank, evaluation: np.ndarray, honest_prior: np.ndarray, share: float) -> float:
    """Accuracy of the evaluation set served (1 − c)·π_honest + c·one-hot(class 0) (module docstring)."""
    calibrator = load_calibration(calibration)
    k = calibrator.meta_.num_classes
    attack = np.zeros(k)
    attack[0] = 1.0
    mixture = (1.0 - share) * honest_prior + share * attack
    z = calibrator.predict_logits(bank.features[evaluation].float(), bank.logits[evaluation])
    aligned = ls.adjust_to_prior(z, torch.from_numpy(mixture), probability_calibration(calibrator))
    return 100.0 * float((aligned.argmax(1) == bank.labels[evaluation]).double().mean())


# -- three replicas ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_replica(calibration: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "DISALIGN_ADMIN_TOKEN": ADMIN_TOKEN, "DISALIGN_TORCH_THREADS": "1", "DISALIGN_PRIOR": "adaptive",
           "DISALIGN_WATCH_INTERVAL_S": "1"}
    process = subprocess.Popen([sys.executable, "-m", "disalign", "serve", "--model", str(MODEL), "--card", str(CARD),
                                "--calibration", str(calibration), "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(url: str, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"replica {url} did not become ready")


def served_versions(urls: list[str]) -> list[str]:
    row = {"rows": [{"features": [0.5] * 64, "logits": [float(i) for i in range(10)]}]}
    return [httpx.post(f"{url}/calibrate", json=row, timeout=10).json()["prior_version"] for url in urls]


def seconds_until_all_serve(urls: list[str], before: str, store: Path, limit: float = 30.0) -> tuple[float, str]:
    """Seconds from the publish (the version's ``created`` time, written just before ``current`` switches) until
    all replicas answer with one new prior version."""
    from datetime import datetime

    from disalign.calib.artifact import priors

    start = time.monotonic()
    while time.monotonic() - start < limit:
        versions = served_versions(urls)
        now = time.time()
        if len(set(versions)) == 1 and versions[0] != before:
            return now - datetime.fromisoformat(priors.read_current(store)[1].created).timestamp(), versions[0]
        time.sleep(0.05)
    return float("inf"), ",".join(served_versions(urls))


def replicas(calibration: Path, bank: Bank, work: Path) -> None:
    directory = work / "replicas" / "calibration"
    shutil.copytree(calibration, directory, symlinks=True)
    labels = bank.labels.numpy()
    forward = np.round(980 * 10 ** (-np.arange(10) / 9)).astype(int)
    rng = np.random.default_rng(7)
    rows = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in enumerate(forward)])
    shifted = write_bank(work / "replicas" / "forward10.h5", bank.features[rows].numpy(), bank.logits[rows].numpy(), labels[rows],
                         class_names=bank.info.class_names, model_fingerprint=bank.info.model_fingerprint)
    started = [start_replica(directory, work / "replicas" / f"replica{i}.log") for i in range(3)]
    try:
        for process, url in started:
            wait_ready(url, process)
        urls = [url for _, url in started]
        before = served_versions(urls)[0]
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "disalign", "adapt", str(shifted), "--calibration", str(directory),
                                 "--publish", "--bootstrap", "0", "--quiet"], capture_output=True, text=True, cwd=REPO)
        published = time.monotonic()
        if result.returncode != 0:
            raise SystemExit(result.stderr)
        seconds, version = seconds_until_all_serve(urls, before, directory / "prior")
        print(f"disalign adapt --publish: {result.stdout.strip().splitlines()[-1]}")
        print(f"  all 3 replicas serve {version} {seconds:.2f} s after the publish (adapt itself took {published - start:.1f} s)")
        prior = np.linspace(2.0, 1.0, 10)
        start = time.monotonic()
        assert httpx.post(f"{urls[0]}/admin/prior", headers=AUTH, json={"action": "set", "prior": prior.tolist()}, timeout=30).status_code == 200
        seconds, version = seconds_until_all_serve(urls, version, directory / "prior")
        print(f"POST /admin/prior set on replica 0: all 3 replicas serve {version} {seconds:.2f} s after the publish")
    finally:
        for process, _ in started:
            process.terminate()
        for process, _ in started:
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", default="0.05,0.1,0.25", help="max_share of the authenticated attacker, comma-separated")
    parser.add_argument("--rows-per-request", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-replicas", action="store_true", help="skip the three-replica measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="prior-poisoning-"))
    try:
        calibration = LogitAdjustment(tau=1.0).fit(EXAMPLES / "train.h5", val=EXAMPLES / "val.h5").save(work / "calibration")
        bank = load_bank(EXAMPLES / "test.h5")
        honest, evaluation, attack = split_rows(bank.labels.numpy(), args.seed)
        print(f"honest traffic {honest.size} rows (balanced, trusted source 'gateway'), attacker {honest.size} rows of class 0 "
              f"interleaved (50 % of all rows), {args.rows_per_request} rows per request; evaluation {evaluation.size} balanced rows")

        def scenario(name: str, headers: dict | None, share: float = 1.0) -> dict:
            out = run_scenario(calibration, bank, honest, evaluation, attack, headers, share, args.rows_per_request, work / name)
            status = out["status"]
            prior = status["prior"]
            published = status["published"]
            shares = published["rows_by_source"] if published else {}
            print(f"{name:>18}: honest accuracy {out['accuracy']:.2f} %; served {status['version']}"
                  + (f", prior of class 0 {prior[0]:.3f}" if prior else "") + (f"; rows of the last published estimate {shares}" if shares else ""))
            return out

        base = scenario("none", None)
        k = len(load_calibration(calibration).meta_.class_names)
        honest_prior = np.asarray(base["status"]["prior"]) if base["status"]["prior"] else np.full(k, 1.0 / k)
        rows = []
        for name, headers in (("unauthenticated", {}), ("wrong token", {"Disalign-Traffic-Token": "guessed-" + "x" * 24})):
            out = scenario(name, headers)
            rows.append((name, out["accuracy"], base["accuracy"] - out["accuracy"], None))
        for share in (float(s) for s in args.shares.split(",")):
            out = scenario(f"capped {share:g}", {"Disalign-Traffic-Token": PARTNER_TOKEN}, share)
            allowed = allowed_accuracy(calibration, bank, evaluation, honest_prior, share)
            rows.append((f"capped {share:g}", out["accuracy"], base["accuracy"] - out["accuracy"], base["accuracy"] - allowed))
        print(f"\n| scenario | honest accuracy % | drop (points) | drop its share allows (points) |\n|---|---|---|---|\n"
              f"| none | {base['accuracy']:.2f} | — | — |")
        for name, accuracy, drop, allowed in rows:
            print(f"| {name} | {accuracy:.2f} | {drop:.2f} | {'—' if allowed is None else f'{allowed:.2f}'} |")
        if not args.no_replicas:
            print()
            replicas(calibration, bank, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
