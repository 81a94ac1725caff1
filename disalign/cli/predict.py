"""``disalign predict``: calibrated top-k predictions for every row of a bank, as CSV, JSON Lines or HDF5.

    disalign predict test.h5 --calibration calib/ --out predictions.csv [--top-k 5] [--stage1] [--list test.txt]

The argparse layer; the file formats and the path column are in :mod:`disalign.calib.data.predictions`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from disalign.calib.errors import InputError
from disalign.cli.common import HelpFormatter, add_quiet_argument, check_writable_file, note


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="write calibrated top-k predictions for every row of a bank",
                              description="Write calibrated top-k predictions for every row of a bank (CSV, JSON Lines or HDF5).",
                              formatter_class=HelpFormatter)
    p.add_argument("bank", type=Path, help="feature bank (HDF5) to predict")
    p.add_argument("--calibration", type=Path, required=True, help="calibration directory from 'disalign fit'")
    p.add_argument("--out", type=Path, required=True, help="predictions file: .csv, .jsonl or .h5 (the format follows the extension)")
    p.add_argument("--top-k", type=int, default=5, help="classes per row, best first (at most K)")
    p.add_argument("--stage1", action="store_true", help="also write the top-k of the raw stage-1 logits")
    p.add_argument("--list", dest="list_file", type=Path,
                   help="list file (or COCO JSON) the bank was extracted from, for the path column (the bank's 'source' attribute is never opened)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_quiet_argument(p)
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from disalign.calib.data.bank import BankReader
    from disalign.calib.data.predictions import FORMATS, WRITERS, Predictions, source_paths
    from disalign.calib.estimators.methods import load_calibration
    from disalign.calib.progress import progress_bar

    fmt = FORMATS.get(args.out.suffix.lower())
    if fmt is None:
        raise InputError(f"--out should end in one of {', '.join(FORMATS)}, found {args.out.name!r}.")
    check_writable_file(args.out, "--out", overwrite=args.overwrite)
    if args.top_k < 1:
        raise InputError(f"--top-k should be >= 1, found {args.top_k}.")
    calibration = load_calibration(args.calibration)
    with BankReader(args.bank) as reader:
        info = reader.info
        calibration.check_compatible(num_classes=info.num_classes, feature_dim=info.feature_dim,
                                     model_fingerprint=info.model_fingerprint, source=f"bank {args.bank}")
        k = min(args.top_k, info.num_classes)
        paths, no_paths = source_paths(args.bank, reader.column("sample_index"), args.list_file)
        names = np.asarray(info.class_names, dtype=object)
        writer = WRITERS[fmt](args.out, k=k, stage1=args.stage1, with_paths=paths is not None, class_names=list(info.class_names),
                              attrs={"bank": str(args.bank), "calibration": str(args.calibration), "method": calibration.method})
        try:
            with progress_bar(total=info.num_rows, enabled=not args.quiet, desc="predict", unit="row") as bar:
                for start, block in reader.iter_blocks():
                    logits = torch.from_numpy(block["logits"])
                    probabilities = calibration.predict_proba(torch.from_numpy(block["features"]), logits)
                    top_p, top_i = probabilities.topk(k, dim=1)
                    stage1 = torch.softmax(logits, dim=1).topk(k, dim=1) if args.stage1 else None
                    n = logits.shape[0]
                    sample_index = block["sample_index"]
                    writer.write(Predictions(
                        row=np.arange(start, start + n), sample_index=sample_index, view=block["view"], true_index=block["labels"],
                        top_indices=top_i.numpy(), top_probabilities=top_p.numpy(),
                        stage1_indices=stage1.indices.numpy() if stage1 else None,
                        stage1_probabilities=stage1.values.numpy() if stage1 else None,
                        paths=[paths[i] for i in sample_index] if paths is not None else None), names)
                    bar.update(n)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
    if no_paths:  # said after the work, so that a bad input still gives exactly one error line
        note(no_paths, quiet=args.quiet)
    note(f"wrote {info.num_rows} rows of {calibration.method} predictions (top {k}) to {args.out}", quiet=args.quiet)
    return 0
