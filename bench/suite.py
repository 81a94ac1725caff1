"""The suite: every post-hoc method on every shared stage-1 model — the yardstick for every default.

    .venv/bin/python bench/suite.py [--work DIR] [--models NAME,...] [--seed 0] [--json FILE]

For each model of ``../shared/models/README.md`` (the models and the training list of each are read from
its table and checked against the model cards), the README recipe, through the command line:

    disalign extract --model NAME.ts --card NAME.json --root CIFAR --list LIST --out BANK --quiet
                     [--class-counts-from TRAIN.h5 for val and test]        (once; cached, see below)
    disalign fit TRAIN.h5 --val VAL.h5 --rho auto --out CAL --quiet [--seed S]
    disalign eval TEST.h5 --calibration CAL --train TRAIN.h5 --val VAL.h5 --json REPORT --quiet

Training list: the model's own (``cifar10lt-ir{10,50,100}/train.txt``); validation and test: the balanced
lists ``cifar10lt-ir50/val.txt`` (200 images) and ``test.txt`` (9,800 images) for every model. Banks are
cached under ``--work`` (default: ``$XDG_CACHE_HOME/disalign/suite``, else ``~/.cache/disalign/suite``: outside
the repository, so no CIFAR image or bank ever lands in the project tree): ``banks/NAME/{train,val,test}.h5`` with ``banks.json`` beside them (the sha256
of the model, card and list each bank was made from, and of the bank itself); a bank is re-extracted only
when one of these changed. The CIFAR-10 JPEGs are unpacked once into ``WORK/cifar10-jpeg`` (or taken
from ``$DISALIGN_CIFAR_DIR``). Fit and eval run every time, into ``WORK/runs/NAME/seed-S/``.
``--fit-args '--selection accuracy'`` adds flags to every fit (a candidate default, tried without editing
code; its runs go to ``seed-S-<hash of the flags>``); ``--workers`` / ``--threads`` change only the speed.

What the numbers mean (all in percent points, from the eval report):

- ``test mean-cls``: mean-class accuracy on the balanced test bank, with its 95 % interval (stratified
  percentile bootstrap of the test rows, 1,000 resamples, computed by ``disalign eval``).
- ``vs best on val``: method − the method best on the validation bank (``*``), with the paired
  interval (the same resamples for every method): an interval that holds 0 is within this test bank's
  noise.
- ``DisAlign − best baseline``: against the baseline (any method but disalign) best on the validation
  bank — the one a user would pick without the test bank — with the paired interval; and, as a point
  only, against the baseline best on the test bank itself (a choice made on the test bank, so it
  flatters the baselines).
- ``mean``: the plain mean over models; ``±≈`` combines the per-model half-widths in quadrature
  (models independent, intervals roughly normal) — a guide, not a bootstrap of its own.

The rule: a default changes only when the suite mean improves and no model drops by more than its
interval. Run the suite before and after the change (the same ``--seed``), and compare.

``--limit N`` (for testing this script) extracts only the head of each list: its first rows of each
class, in proportion to the class's share of the list, N rows in all (a plain first N rows would hold
one class only, as the lists are sorted by class); its banks and runs carry ``-limitN`` in their names.
The script prints numbers and never asserts: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VAL_TEST_DIR = "data/cifar10lt-ir50"  # the balanced val/test lists of every model (shared/models/README.md)
SPLITS = ("train", "val", "test")
TAIL_LINES = 5  # of a failed command's stderr, in the error (when no line of it says "error")


class SuiteError(Exception):
    """Bad input or a failed step: one sentence, exit status ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Model:
    name: str
    torchscript: Path
    card: Path
    train_list: Path
    card_counts: tuple[int, ...] | None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_list(path: Path) -> list[tuple[str, int]]:
    """Rows ``relative/path label`` of a list file → [(line, label)]."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise SuiteError(f"list file {path} line {number} should be 'relative/path label', found {line!r}.")
        rows.append((line, int(parts[1])))
    if not rows:
        raise SuiteError(f"list file {path} holds no rows.")
    return rows


def list_head(rows: list[tuple[str, int]], limit: int) -> list[str]:
    """The first rows of each class, in proportion to its share of ``rows`` (at least one), ``limit`` in all, in list order."""
    counts = Counter(label for _, label in rows)
    if limit >= len(rows):
        return [line for line, _ in rows]
    share = {c: limit * n / len(rows) for c, n in counts.items()}
    take = {c: max(1, math.floor(s)) for c, s in share.items()}
    for c in sorted(share, key=lambda c: share[c] - math.floor(share[c]), reverse=True):  # largest remainders
        if sum(take.values()) >= limit:
            break
        if take[c] < counts[c]:
            take[c] += 1
    seen: Counter = Counter()
    out = []
    for line, label in rows:
        if seen[label] < take[label]:
            seen[label] += 1
            out.append(line)
    return out


def discover_models(shared: Path) -> dict[str, Model]:
    """The models of the shared README's table, with their training lists, checked against the cards."""
    models_dir = shared / "models"
    readme = models_dir / "README.md"
    if not readme.is_file():
        raise SuiteError(f"the shared models README {readme} is missing; set DISALIGN_SHARED_DIR to the shared folder.")
    models = {}
    for line in readme.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`([^`]+)`", cells[0]) if line.lstrip().startswith("|") else None
        lists = [m for c in cells for m in re.findall(r"`([^`]*train\.txt)`", c)]
        if not name or not lists:
            continue
        if len(lists) != 1:
            raise SuiteError(f"{readme} names {len(lists)} training lists for model {name[1]}; expected one.")
        models[name[1]] = (models_dir / lists[0]).resolve()
    if not models:
        raise SuiteError(f"{readme} has no table row naming a model and its training list (| `NAME` | … | `…/train.txt` |).")
    return {name: check_model(shared, name, train) for name, train in models.items()}


def extra_model(shared: Path, torchscript: Path) -> Model:
    """A model outside the shared table (``--extra-model``, e.g. the memorised stand-in of bench/make_memorised.py):
    NAME.ts with its card NAME.json beside it; the training list is the card's train_split (under the shared folder)."""
    card_path = torchscript.with_suffix(".json")
    if not card_path.is_file():
        raise SuiteError(f"--extra-model {torchscript}: its card {card_path} is missing (NAME.json beside NAME.ts).")
    try:
        split = str(json.loads(card_path.read_text()).get("train_split", "")).split(" ")[0]
    except (OSError, ValueError) as exc:
        raise SuiteError(f"--extra-model {torchscript}: its card {card_path} is not readable JSON ({exc}).") from None
    if not split:
        raise SuiteError(f"--extra-model {torchscript}: its card {card_path} has no train_split (the training list under {shared}).")
    return check_model(shared, torchscript.stem, (shared / split).resolve(), models_dir=torchscript.parent)


def check_model(shared: Path, name: str, train_list: Path, *, models_dir: Path | None = None) -> Model:
    models_dir = models_dir or shared / "models"
    card_path = models_dir / f"{name}.json"
    if not card_path.is_file():
        raise SuiteError(f"the model card {card_path} of model {name} is missing.")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise SuiteError(f"the model card {card_path} is not readable JSON ({exc}).") from None
    if card.get("name", name) != name:
        raise SuiteError(f"the model card {card_path} names model {card['name']!r}, expected {name!r}.")
    ts = models_dir / card.get("torchscript", {}).get("file", f"{name}.ts")
    if not ts.is_file():
        raise SuiteError(f"the TorchScript file {ts} of model {name} is missing.")
    split = str(card.get("train_split", "")).split(" ")[0]
    if split and (shared / split).resolve() != train_list:
        raise SuiteError(f"model {name}: the README's training list {train_list} differs from its card's train_split {split}.")
    if not train_list.is_file():
        raise SuiteError(f"the training list {train_list} of model {name} is missing.")
    counts = card.get("class_counts")
    return Model(name, ts, card_path, train_list, tuple(int(c) for c in counts) if counts else None)


class Suite:
    def __init__(self, args: argparse.Namespace, shared: Path):
        self.args, self.shared, self.work = args, shared, args.work
        self.suffix = f"-limit{args.limit}" if args.limit else ""
        self.log = sys.stderr if args.json == "-" else sys.stdout
        self.env = dict(os.environ)
        if args.threads:
            self.env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        self.cifar: Path | None = None

    def say(self, text: str) -> None:
        print(text, file=self.log, flush=True)

    def disalign(self, what: str, *argv: str) -> float:
        """Run ``disalign ARGV`` → seconds; a failure is a SuiteError with the tail of its stderr."""
        cmd = [sys.executable, "-m", "disalign", *argv]
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=REPO)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            errors = [line.strip() for line in lines if "error" in line.lower()]
            tail = errors[-1] if errors else " | ".join(lines[-TAIL_LINES:]) or "(no output)"
            raise SuiteError(f"{what} failed (exit {result.returncode}): {tail} — command: {shlex.join(cmd)}",
                             2 if result.returncode == 2 else 1)
        return seconds

    def cifar_root(self) -> Path:
        """The unpacked CIFAR-10 JPEGs: $DISALIGN_CIFAR_DIR, or WORK/cifar10-jpeg (unpacked on first need)."""
        if self.cifar is not None:
            return self.cifar
        given = os.environ.get("DISALIGN_CIFAR_DIR")
        root = Path(given) if given else self.work / "cifar10-jpeg"
        if not given and not (root / ".complete").exists():
            tar = self.shared / "data" / "cifar10-jpeg.tar.gz"
            if not tar.is_file():
                raise SuiteError(f"the CIFAR-10 JPEG archive {tar} is missing (or set DISALIGN_CIFAR_DIR).")
            start = time.perf_counter()
            partial = root.with_name(root.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
            partial.mkdir(parents=True)
            subprocess.run(["tar", "xzf", str(tar), "-C", str(partial)], check=True)
            (partial / ".complete").write_text(sha256(tar) + "\n")
            os.replace(partial, root)
            self.say(f"unpacked {tar} into {root} in {time.perf_counter() - start:.1f} s")
        self.cifar = root
        return root

    def list_file(self, source: Path) -> Path:
        """The list to extract: ``source``, or with --limit its head, written into WORK/lists/."""
        rows = read_list(source)
        if not self.args.limit:
            return source
        out = self.work / "lists" / f"limit{self.args.limit}" / f"{source.parent.name}-{source.name}"
        text = "\n".join(list_head(rows, self.args.limit)) + "\n"
        if not out.is_file() or out.read_text() != text:
            write_atomic(out, text)
        return out

    def banks(self, model: Model, timing: dict) -> dict[str, Path]:
        """Train/val/test banks of ``model``, reused when banks.json says they match their inputs."""
        folder = self.work / "banks" / f"{model.name}{self.suffix}"
        manifest_path = folder / "banks.json"
        try:
            manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        except ValueError:
            manifest = {}
        sources = {"train": model.train_list, "val": self.shared / VAL_TEST_DIR / "val.txt",
                   "test": self.shared / VAL_TEST_DIR / "test.txt"}
        model_sha, card_sha = sha256(model.torchscript), sha256(model.card)
        paths = {}
        for split in SPLITS:
            lst = self.list_file(sources[split])
            bank = folder / f"{split}.h5"
            wanted = {"model": str(model.torchscript), "model_sha256": model_sha, "card_sha256": card_sha,
                      "list": str(lst), "list_sha256": sha256(lst), "rows": len(read_list(lst)),
                      "class_counts_from_sha256": manifest["train"]["bank_sha256"] if split != "train" else None}
            entry = manifest.get(split, {})
            if bank.is_file() and entry.get("inputs") == wanted and entry.get("bank_sha256") == sha256(bank):
                self.say(f"  extract {split:5s}: cached {bank} ({wanted['rows']} rows)")
                timing[f"extract_{split}"] = 0.0
                paths[split] = bank
                continue
            root = self.cifar_root()
            pending = {**wanted, "root": str(root.resolve())}
            parts = bank.with_name(bank.name + ".parts")
            if entry.get("pending") != pending:  # parts of another configuration cannot be resumed
                shutil.rmtree(parts, ignore_errors=True)
            manifest[split] = {"pending": pending}
            write_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
            argv = ["extract", "--model", str(model.torchscript), "--card", str(model.card), "--root", str(root),
                    "--list", str(lst), "--out", str(bank), "--overwrite", "--quiet"]
            if split != "train":
                argv += ["--class-counts-from", str(paths["train"])]
            if self.args.workers is not None:
                argv += ["--workers", str(self.args.workers)]
            if self.args.threads:
                argv += ["--threads", str(self.args.threads)]
            seconds = self.disalign(f"disalign extract of the {split} bank of {model.name}", *argv)
            manifest[split] = {"inputs": wanted, "bank_sha256": sha256(bank), "seconds": round(seconds, 2)}
            if split == "train":  # val/test copy the train bank's counts: made again with it
                manifest.pop("val", None)
                manifest.pop("test", None)
            write_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
            self.say(f"  extract {split:5s}: {wanted['rows']} rows in {seconds:.1f} s → {bank}")
            timing[f"extract_{split}"] = seconds
            paths[split] = bank
        return paths

    def run_model(self, model: Model) -> dict:
        """Banks, fit and eval of one model → its numbers (module docstring)."""
        self.say(f"\n== {model.name}")
        if model.card_counts and not self.args.limit:
            counts = Counter(label for _, label in read_list(model.train_list))
            found = tuple(counts.get(c, 0) for c in range(len(model.card_counts)))
            if found != model.card_counts:
                raise SuiteError(f"model {model.name}: its training list {model.train_list} has class counts {list(found)}, "
                                 f"its card {list(model.card_counts)}.")
        timing: dict[str, float] = {}
        banks = self.banks(model, timing)
        tag = f"seed-{self.args.seed}" + (f"-{hashlib.sha256(self.args.fit_args.encode()).hexdigest()[:8]}" if self.args.fit_args else "")
        run = self.work / "runs" / f"{model.name}{self.suffix}" / tag
        calibration, report_path = run / "calibration", run / "report.json"
        shutil.rmtree(calibration, ignore_errors=True)
        report_path.unlink(missing_ok=True)
        run.mkdir(parents=True, exist_ok=True)
        fit = ["fit", str(banks["train"]), "--val", str(banks["val"]), "--rho", "auto", "--out", str(calibration), "--quiet",
               "--seed", str(self.args.seed), *shlex.split(self.args.fit_args or "")]
        timing["fit"] = self.disalign(f"disalign fit on {model.name}", *fit)
        self.say(f"  fit          : {timing['fit']:.1f} s")
        timing["eval"] = self.disalign(f"disalign eval on {model.name}", "eval", str(banks["test"]), "--calibration", str(calibration),
                                       "--train", str(banks["train"]), "--val", str(banks["val"]), "--json", str(report_path), "--quiet")
        self.say(f"  eval         : {timing['eval']:.1f} s (every method; report {report_path})")
        result = summarise(json.loads(report_path.read_text()), report_path)
        result.update(report=str(report_path), calibration=str(calibration), train_list=str(model.train_list),
                      banks={split: str(path) for split, path in banks.items()}, seconds={k: round(v, 2) for k, v in timing.items()})
        return result


def pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def summarise(report: dict, path: Path) -> dict:
    """The suite's numbers of one eval report (percent points)."""
    try:
        tests = {m: pct(v["mean_class_accuracy"]) for m, v in report["methods"].items()}
    except (KeyError, TypeError):
        raise SuiteError(f"the eval report {path} has no methods.*.mean_class_accuracy; has its layout changed?") from None
    val = report.get("validation", {})
    boot = report.get("bootstrap", {})
    intervals = boot.get("mean_class_accuracy", {})
    paired = boot.get("difference_to_best", {})
    best = val.get("best")
    methods = {m: {"test_mean_class_accuracy": tests[m],
                   "test_interval": [pct(b) for b in intervals[m]] if m in intervals else None,
                   "val_mean_class_accuracy": pct(val.get("mean_class_accuracy", {}).get(m)),
                   "minus_best_on_val": None if best is None else tests[m] - tests[best],
                   "minus_best_on_val_interval": [pct(b) for b in paired[m]] if m in paired else None}
               for m in tests}
    out = {"num_test_rows": report.get("num_rows"), "best_on_val": best, "methods": methods, "disalign_minus_best_baseline": None}
    baselines = [m for m in tests if m != "disalign"]
    if "disalign" not in tests or not baselines:
        return out
    on_test = max(baselines, key=lambda m: tests[m])
    entry: dict = {"on_test": {"baseline": on_test, "difference": tests["disalign"] - tests[on_test]}, "on_val": None}
    if best is not None:
        if best != "disalign":
            base, interval = best, methods["disalign"]["minus_best_on_val_interval"]
        else:  # the report's order and tie-break (higher val mean-cls, then lower val NLL, then order)
            order = list(tests)
            base = max(baselines, key=lambda m: (val["mean_class_accuracy"][m], -val["nll"][m], -order.index(m)))
            other = methods[base]["minus_best_on_val_interval"]  # base − disalign
            interval = [-other[1], -other[0]] if other else None
        entry["on_val"] = {"baseline": base, "difference": tests["disalign"] - tests[base], "interval": interval}
    out["disalign_minus_best_baseline"] = entry
    return out


def fmt(value: float | None, signed: bool = False) -> str:
    return "–" if value is None else (f"{value:+.2f}" if signed else f"{value:.2f}")


def fmt_interval(bounds: list[float] | None, signed: bool = False) -> str:
    return "–" if not bounds else f"[{fmt(bounds[0], signed)}, {fmt(bounds[1], signed)}]"


def model_table(name: str, result: dict) -> str:
    best = result["best_on_val"]
    lines = [f"\n{name} (test rows {result['num_test_rows']}; * best on the validation bank)",
             f"| method | val mean-cls | test mean-cls | 95 % CI | vs best on val ({best}) | paired 95 % CI |", "|---|---|---|---|---|---|"]
    for m, v in result["methods"].items():
        lines.append(f"| {m}{' *' if m == best else ''} | {fmt(v['val_mean_class_accuracy'])} | {fmt(v['test_mean_class_accuracy'])} | "
                     f"{fmt_interval(v['test_interval'])} | {fmt(v['minus_best_on_val'], True)} | "
                     f"{fmt_interval(v['minus_best_on_val_interval'], True)} |")
    lines.append(f"DisAlign − best baseline: {gap_text(result['disalign_minus_best_baseline'])}")
    return "\n".join(lines)


def gap_text(gap: dict | None) -> str:
    if gap is None:
        return "– (no disalign row or no baseline in the report)"
    text = ""
    if gap["on_val"]:
        v = gap["on_val"]
        text = f"{fmt(v['difference'], True)} {fmt_interval(v['interval'], True)} vs {v['baseline']} (best baseline on val, paired); "
    t = gap["on_test"]
    return text + f"{fmt(t['difference'], True)} vs {t['baseline']} (best baseline on test, point only)"


def mean_over_models(results: dict[str, dict]) -> dict:
    """Per method: the mean test mean-class accuracy over models and its ≈ half-width; the mean DisAlign gap."""
    names = list(dict.fromkeys(m for r in results.values() for m in r["methods"]))
    methods = {}
    for m in names:
        rows = [r["methods"][m] for r in results.values() if m in r["methods"]]
        widths = [(v["test_interval"][1] - v["test_interval"][0]) / 2 for v in rows if v["test_interval"]]
        methods[m] = {"models": len(rows), "test_mean_class_accuracy": sum(v["test_mean_class_accuracy"] for v in rows) / len(rows),
                      "half_width_approx": math.sqrt(sum(w * w for w in widths)) / len(rows) if len(widths) == len(rows) else None}
    gaps = [r["disalign_minus_best_baseline"] for r in results.values() if r["disalign_minus_best_baseline"]]
    on_val = [g["on_val"]["difference"] for g in gaps if g["on_val"]]
    return {"methods": methods, "disalign_minus_best_baseline": {
        "on_val": sum(on_val) / len(on_val) if on_val and len(on_val) == len(results) else None,
        "on_test": sum(g["on_test"]["difference"] for g in gaps) / len(gaps) if gaps and len(gaps) == len(results) else None}}


def summary_tables(results: dict[str, dict], mean: dict) -> str:
    names = list(results)
    lines = ["\nTest mean-class accuracy per model and the mean over models (±≈: per-model half-widths in quadrature / n)",
             "| method | " + " | ".join(names) + " | mean | ±≈ |", "|---|" + "---|" * (len(names) + 2)]
    for m, v in mean["methods"].items():
        cells = [fmt(results[n]["methods"].get(m, {}).get("test_mean_class_accuracy")) for n in names]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {fmt(v['test_mean_class_accuracy'])} | {fmt(v['half_width_approx'])} |")
    lines += ["\nDisAlign − best baseline per model",
              "| model | best baseline on val | DisAlign − it | paired 95 % CI | best baseline on test | DisAlign − it |",
              "|---|---|---|---|---|---|"]
    for n, r in results.items():
        gap = r["disalign_minus_best_baseline"] or {}
        v, t = gap.get("on_val") or {}, gap.get("on_test") or {}
        lines.append(f"| {n} | {v.get('baseline', '–')} | {fmt(v.get('difference'), True)} | {fmt_interval(v.get('interval'), True)} | "
                     f"{t.get('baseline', '–')} | {fmt(t.get('difference'), True)} |")
    g = mean["disalign_minus_best_baseline"]
    lines.append(f"| mean | | {fmt(g['on_val'], True)} | | | {fmt(g['on_test'], True)} |")
    return "\n".join(lines)


def timing_table(results: dict[str, dict], unpack_and_total: dict) -> str:
    steps = ["extract_train", "extract_val", "extract_test", "fit", "eval"]
    lines = ["\nSeconds per step (0.00: cached bank)", "| model | " + " | ".join(steps) + " | total |", "|---|" + "---|" * (len(steps) + 1)]
    for n, r in results.items():
        s = r["seconds"]
        lines.append(f"| {n} | " + " | ".join(f"{s.get(k, 0.0):.1f}" for k in steps) + f" | {sum(s.values()):.1f} |")
    lines.append(f"whole suite: {unpack_and_total['total']:.1f} s")
    return "\n".join(lines)


def default_work_dir() -> Path:
    """$XDG_CACHE_HOME/disalign/suite, else ~/.cache/disalign/suite: a cache outside the repository."""
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path.home() / ".cache") / "disalign" / "suite"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None,
                        help="work dir: cached banks, JPEGs, calibrations, reports (default: $XDG_CACHE_HOME/disalign/suite or ~/.cache/disalign/suite)")
    parser.add_argument("--models", help="comma-separated subset of the shared models and the --extra-model ones (default: all)")
    parser.add_argument("--extra-model", type=Path, action="append", default=[], metavar="NAME.ts",
                        help="also run this TorchScript model (its card NAME.json beside it names the training list), "
                             "e.g. the memorised stand-in of bench/make_memorised.py; repeatable")
    parser.add_argument("--seed", type=int, default=0, help="passed to disalign fit (default 0; eval fits its baselines with seed 0)")
    parser.add_argument("--fit-args", default="", help="extra flags for disalign fit, e.g. '--selection accuracy' (a candidate default)")
    parser.add_argument("--json", metavar="FILE|-", help="write every number as JSON here; '-': stdout (the tables go to stderr)")
    parser.add_argument("--workers", type=int, help="disalign extract --workers (default: extract's)")
    parser.add_argument("--threads", type=int, help="torch threads of every step (extract --threads, OMP_NUM_THREADS)")
    parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[Path, dict[str, Model]]:
    if args.work is None:
        args.work = default_work_dir()
    if args.work.resolve().is_relative_to(REPO):
        raise SuiteError(f"--work {args.work} is inside the repository {REPO}; the suite unpacks CIFAR images and writes banks "
                         "there, so give a folder outside it (default: ~/.cache/disalign/suite).")
    if args.limit < 0:
        raise SuiteError(f"--limit should be a positive number of rows, found {args.limit}.")
    for flag, value in (("--workers", args.workers), ("--threads", args.threads)):
        if value is not None and value < (0 if flag == "--workers" else 1):
            raise SuiteError(f"{flag} should be {'>= 0' if flag == '--workers' else '>= 1'}, found {value}.")
    try:
        shlex.split(args.fit_args)
    except ValueError as exc:
        raise SuiteError(f"--fit-args should be shell words, found {args.fit_args!r} ({exc}).") from None
    if args.work.exists() and not args.work.is_dir():
        raise SuiteError(f"--work {args.work} exists and is not a directory.")
    if args.json not in (None, "-"):
        target = Path(args.json).resolve()
        existing = next(p for p in target.parents if p.exists())  # the folders below it are made at the end
        if target.is_dir() or not (existing.is_dir() and os.access(existing, os.W_OK)):
            raise SuiteError(f"--json {args.json} should be a file path under a writable directory.")
    cifar = os.environ.get("DISALIGN_CIFAR_DIR")
    if cifar and not ((Path(cifar) / "train").is_dir() and (Path(cifar) / "test").is_dir()):
        raise SuiteError(f"DISALIGN_CIFAR_DIR={cifar} should hold the unpacked CIFAR-10 JPEGs (train/ and test/).")
    shared = Path(os.environ.get("DISALIGN_SHARED_DIR", REPO.parent / "shared")).resolve()
    if not shared.is_dir():
        raise SuiteError(f"the shared folder {shared} is missing; set DISALIGN_SHARED_DIR to it.")
    for name in ("val.txt", "test.txt"):
        if not (shared / VAL_TEST_DIR / name).is_file():
            raise SuiteError(f"the balanced list {shared / VAL_TEST_DIR / name} is missing.")
    models = discover_models(shared)
    for path in args.extra_model:
        model = extra_model(shared, path.resolve())
        if model.name in models:
            raise SuiteError(f"--extra-model {path}: a model named {model.name} is already in the suite.")
        models[model.name] = model
    if args.models:
        chosen = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in models]
        if unknown or not chosen:
            raise SuiteError(f"--models should be a subset of {','.join(models)}, found {args.models!r}.")
        models = {m: models[m] for m in dict.fromkeys(chosen)}
    return shared, models


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        shared, models = check_args(args)
        args.work.mkdir(parents=True, exist_ok=True)
        args.work = args.work.resolve()
        suite = Suite(args, shared)
        version = subprocess.run([sys.executable, "-m", "disalign", "--version"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        suite.say(f"{version or 'disalign (version unknown)'}; models: {', '.join(models)}; seed {args.seed}"
                  + (f"; fit args {args.fit_args!r}" if args.fit_args else "") + (f"; --limit {args.limit}" if args.limit else "")
                  + f"; work dir {args.work}")
        results = {}
        for name, model in models.items():
            results[name] = suite.run_model(model)
            suite.say(model_table(name, results[name]))
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    mean = mean_over_models(results)
    total = {"total": time.perf_counter() - start}
    suite.say(summary_tables(results, mean))
    suite.say(timing_table(results, total))
    if args.json:
        out = {"suite": {"tool_version": version, "command": shlex.join([sys.executable, *sys.argv]), "shared": str(shared),
                         "work": str(args.work), "models": list(models), "seed": args.seed, "fit_args": args.fit_args,
                         "limit": args.limit or None, "units": "percent points", "seconds": round(total["total"], 2)},
               "models": results, "mean": mean}
        text = json.dumps(out, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            Path(args.json).resolve().parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=Path(args.json).resolve().parent, delete=False, suffix=".tmp") as f:
                f.write(text)
            os.replace(f.name, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
