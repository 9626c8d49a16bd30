"""`service-profiler model fit | predict`: fit the batch-latency model and query it.

    service-profiler model fit --input batch.csv --output-dir D [--loss huber] [--min-ms X] [--max-ms Y]
    service-profiler model predict --model D/latency_model.json --batch-size 16 32 --tokens 512 [--json]

`fit` reads the batch table written by `service-profiler analyze` (columns batch_size,
total_scheduled_tokens, model_run_ms) and writes latency_model.json plus two diagnostic plots.
`predict` prints the model-run time in ms for each (B, S) pair; one-element lists broadcast.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

from service_profiler.model.latency import SEED_MAX_MS, LatencyModel, fit_and_save
from service_profiler.outputs import OutputPathError, check_output_dir, describe_os_error

FIT_COLUMNS = ("batch_size", "total_scheduled_tokens", "model_run_ms")
_ALIASES = {"batch_size": "total_batch_size"}


class InputError(Exception):
    """A user-facing problem with an input file or argument; the message says how to fix it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Attach the `fit` and `predict` subcommands to the `model` parser."""
    sub = parser.add_subparsers(dest="model_command", metavar="{fit,predict}")
    sub.required = True

    fit = sub.add_parser("fit", help="fit the latency model to a batch table (batch.csv)")
    fit.add_argument("--input", required=True, type=Path, help="batch.csv written by `analyze`")
    fit.add_argument("--output-dir", required=True, type=Path, help="where latency_model.json goes")
    fit.add_argument("--loss", choices=("linear", "huber"), default="linear",
                     help="squared error (default) or Huber, which resists long-tail outliers")  # fmt: skip
    fit.add_argument("--min-ms", type=float, default=None,
                     help="drop steps faster than this (default 1 ms, relaxed to 0.05 ms "
                          "when fewer than 10 steps remain; an explicit value is never relaxed)")  # fmt: skip
    fit.add_argument("--max-ms", type=float, default=SEED_MAX_MS,
                     help=f"drop steps slower than this (default {SEED_MAX_MS:g} ms)")  # fmt: skip
    fit.add_argument("--test-fraction", type=float, default=0.2, help="held-out share (default 0.2)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default 0)")

    pred = sub.add_parser("predict", help="predict model-run time (ms) for batch sizes and token counts")
    pred.add_argument("--model", required=True, type=Path, help="latency_model.json")
    pred.add_argument("--batch-size", required=True, type=float, nargs="+", metavar="B",
                      help="batch size(s) B in requests")  # fmt: skip
    pred.add_argument("--tokens", required=True, type=float, nargs="+", metavar="S",
                      help="total scheduled token count(s) S")  # fmt: skip
    pred.add_argument("--json", action="store_true", help="print a JSON list instead of text")


def run(args: argparse.Namespace) -> int:
    """Entry point for `service-profiler model ...`; returns the process exit code."""
    try:
        if args.model_command == "fit":
            return _run_fit(args)
        return _run_predict(args)
    except (InputError, OutputPathError) as exc:
        print(f"service-profiler model: error: {exc}", file=sys.stderr)
        return 2


def read_fit_columns(path: Path) -> dict[str, np.ndarray]:
    """The three fit columns of a batch CSV as float arrays; empty cells become NaN."""
    try:
        handle = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        raise InputError(
            f"{path}: no such file; pass the batch.csv written by `service-profiler analyze`"
        ) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot open ({exc.strerror})") from None
    with handle:
        reader = csv.DictReader(handle)
        try:
            return _fit_columns(path, reader)
        except (UnicodeDecodeError, csv.Error) as exc:  # not text, or a field past the csv module's limit
            reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc)
            raise InputError(f"{path}:{reader.line_num + 1}: {reason}; pass the batch.csv written by "
                             "`service-profiler analyze`") from None


def _fit_columns(path: Path, reader: csv.DictReader[str]) -> dict[str, np.ndarray]:
    header = list(reader.fieldnames or [])
    # analyze's batch.csv names the batch size by msserviceprofiler's column (total_batch_size) only
    source = {c: c if c in header or c not in _ALIASES else _ALIASES[c] for c in FIT_COLUMNS}
    missing = [c for c in FIT_COLUMNS if source[c] not in header]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)}; expected a batch table with "
            f"{', '.join(FIT_COLUMNS)} (written by `service-profiler analyze`)"
        )
    cols: dict[str, list[float]] = {c: [] for c in FIT_COLUMNS}
    for row in reader:
        for c in FIT_COLUMNS:
            cols[c].append(_parse_cell(row.get(source[c]), path, reader.line_num, source[c]))
    return {c: np.asarray(v, dtype=float) for c, v in cols.items()}


def _parse_cell(text: str | None, path: Path, line: int, column: str) -> float:
    # Missing values (e.g. a step whose model run was not captured) are empty; they become NaN and
    # the fit's validity filter drops them.
    if text is None or text.strip() == "" or text.strip().lower() in ("nan", "none", "null"):
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{path}:{line}: column {column}: {text!r} is not a number") from None


def _run_fit(args: argparse.Namespace) -> int:
    if not 0.0 <= args.test_fraction < 1.0:
        raise InputError(f"--test-fraction must be in [0, 1), got {args.test_fraction}")
    cols = read_fit_columns(args.input)
    created = not args.output_dir.exists()
    check_output_dir(args.output_dir)
    try:
        model = fit_and_save(
            cols["batch_size"], cols["total_scheduled_tokens"], cols["model_run_ms"], args.output_dir,
            loss=args.loss, min_ms=args.min_ms, max_ms=args.max_ms,
            test_fraction=args.test_fraction, seed=args.seed,
        )  # fmt: skip
    except OSError as exc:  # e.g. the disk filled up, or the directory changed under us
        raise describe_os_error(args.output_dir, exc) from None
    if model is None:
        if created and not any(args.output_dir.iterdir()):
            args.output_dir.rmdir()  # nothing was written: leave no empty directory behind
        return 1
    print(_fit_summary(model, args.output_dir))
    return 0


def _fit_summary(model: LatencyModel, out_dir: Path) -> str:
    lines = [f"latency model ({model.loss} loss): {model.n_train} train / {model.n_test} held-out steps"]
    lines += [f"  {name:<6} = {value:.6g}" for name, value in model.params.items()]
    for split in ("train", "test"):
        m = model.metrics.get(split, {})
        if m.get("rmse_ms") is None:
            continue
        r2 = "n/a" if m.get("r2") is None else f"{m['r2']:.4f}"
        lines.append(
            f"  {split:<5}: R² {r2}  RMSE {m['rmse_ms']:.3f} ms  MAE {m['mae_ms']:.3f} ms  "
            f"MAPE {m['mape_pct']:.2f} %"
        )
    lines.append(f"wrote {out_dir / 'latency_model.json'}, latency_residuals.png, latency_contour.png")
    return "\n".join(lines)


def _run_predict(args: argparse.Namespace) -> int:
    try:
        model = LatencyModel.from_json(args.model)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    b, s = list(args.batch_size), list(args.tokens)
    if len(b) != len(s) and 1 not in (len(b), len(s)):
        raise InputError(
            f"--batch-size has {len(b)} values and --tokens {len(s)}; give equal counts or one of either"
        )
    n = max(len(b), len(s))
    b, s = b * n if len(b) == 1 else b, s * n if len(s) == 1 else s
    bad = [f"B={x:g}, S={y:g}" for x, y in zip(b, s, strict=True) if not (x > 0 and y > 0)]
    if bad:
        raise InputError(f"batch size and tokens must be > 0 (got {'; '.join(bad)})")
    t = np.atleast_1d(np.asarray(model.predict(np.array(b), np.array(s)), dtype=float))
    _warn_extrapolation(model, b, s)
    if args.json:
        rows = [
            {"batch_size": x, "total_tokens": y, "model_run_ms": float(v)}
            for x, y, v in zip(b, s, t, strict=True)
        ]
        print(json.dumps(rows))
    else:
        for x, y, v in zip(b, s, t, strict=True):
            print(f"B={x:g}\tS={y:g}\tT={v:.4f} ms")
    return 0


def _warn_extrapolation(model: LatencyModel, b: list[float], s: list[float]) -> None:
    # The saturation terms are least trustworthy outside the observed data; say so, on stderr.
    for name, values in (("batch_size", b), ("total_tokens", s)):
        lo_hi = model.data_ranges.get(name)
        if lo_hi and any(v < lo_hi[0] or v > lo_hi[1] for v in values):
            print(
                f"note: {name} outside the fitted range {lo_hi[0]:g}..{lo_hi[1]:g}; this is extrapolation",
                file=sys.stderr,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="service-profiler model", description="Fit or query the model")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
