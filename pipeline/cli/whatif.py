"""Handler of ``curriculum whatif`` (wired into ``pipeline.cli``)."""

from __future__ import annotations

import argparse

from pipeline.train.fut import SECOND_ORDER


def add_parsers(sub: argparse._SubParsersAction) -> None:
    whatif = sub.add_parser("whatif", help="estimate the held-out loss of other training orders from a run trained "
                            "with record: {fut: ...}, without retraining; rank them, and retrain a few to check")
    whatif.add_argument("train_dir", help="a training folder written with train.record.fut")
    whatif.add_argument("--order", dest="orders", action="append", default=[], metavar="[NAME=]SPEC",
                        help="a candidate order (repeatable): 'reference', a file of row ids (one per line or a JSON "
                        "list), a method name, or order-stage params such as '{method: quality_descending, key: quality}'")
    whatif.add_argument("--verify", type=int, default=0, metavar="K",
                        help="retrain the K best estimated orders and the worst one, and report estimate against truth")
    whatif.add_argument("--estimator", choices=("projected", "anchored"), default="projected",
                        help="projected (default): FUT's, through the random projection (its noise shrinks with "
                        "record.fut.dim); anchored: exact inner products with the held-out gradients at the anchors")
    whatif.add_argument("--second-order", nargs="?", const="trajectory", choices=SECOND_ORDER, default=None,
                        metavar="CURVATURE",
                        help="add a second-order term from the held-out loss's curvature measured along the run's "
                        "own trajectory (secant of consecutive checkpoints): 'trajectory' (the default when the "
                        "flag is given bare) or 'bfgs'; ranks by it and prints the first-order estimate beside it")
    whatif.add_argument("--metric", help="rank by this eval set (default: the mean over the run's eval sets)")
    whatif.add_argument("--out", help="results folder (default: TRAIN_DIR/whatif)")
    whatif.add_argument("--ray-address", help="Ray cluster for order-stage methods (default: RAY_ADDRESS, or local)")


def cmd_whatif(args: argparse.Namespace) -> int:
    from pipeline.engine.whatif import run_whatif

    summary = run_whatif(args.train_dir, args.orders, args.out, args.verify, args.metric, args.ray_address,
                         estimator=args.estimator, second_order=args.second_order)
    sets = summary["orders"][0]["estimate"]["final"].keys()
    second = summary["second_order"]
    print(f"whatif: {len(summary['orders'])} order(s), best first (estimated held-out loss, "
          f"{f'second order, {second} curvature [first order]' if second else 'first order'}, {summary['estimator']})")
    for r in summary["orders"]:
        est = " ".join(f"{s} {r['estimate']['final'][s]:.4f}" for s in sets)
        if second:
            ratio = max((d[f"second_order_{s}"]["ratio"][summary["estimator"]] for d in r["estimate"]["diagnostics"]
                         for s in sets), default=0.0)
            est += " [" + " ".join(f"{s} {r['estimate']['first_order_final'][s]:.4f}" for s in sets) + "]"
            est += f" (|2nd|/|1st| up to {ratio:.2f})"
        real = r.get("real")
        truth = "" if real is None else "  real " + " ".join(f"{s} {real['final'][s]:.4f}" for s in sets)
        worst = max((d["relative_shift"] for d in r["estimate"]["diagnostics"]), default=0.0)
        print(f"  {r['rank']:>2}. {r['name']}: {est}{truth}  (rows moved {r['estimate']['rows_moved']}, "
              f"shift {worst:.3f})")
    if summary["verified"]:
        rho = summary["spearman"]
        print(f"  verified {summary['verified']}: Spearman {'undefined' if rho is None else f'{rho:+.3f}'}, mean "
              f"|error| {summary['mean_abs_error']:.4f}; whatif {summary['estimate_seconds']:.2f} s, retraining "
              f"{summary['retrain_seconds']:.1f} s")
        if second:
            first = summary["first_order"]
            rho = first["spearman"]
            print(f"  first order: Spearman {'undefined' if rho is None else f'{rho:+.3f}'}, mean |error| "
                  f"{first['mean_abs_error']:.4f}")
    print(f"  results: {summary['out']}/results.md")
    return 0
