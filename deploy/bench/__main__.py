"""Run the benchmarks: ``python -m deploy.bench [--only NAME] [--quick] [--out DIR]``."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import sys
import time
from pathlib import Path

import deploy.bench as pkg

# experiment-table generators: minutes to tens of minutes; run with --tables or --only NAME
TABLES = {"attacks", "analytic_table"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.bench", description=__doc__)
    ap.add_argument("--only", action="append", default=[], help="run only these benchmarks (repeatable)")
    ap.add_argument("--quick", action="store_true", help="smaller inputs (smoke run)")
    ap.add_argument("--out", default="runs/bench", help="where the JSON results go")
    ap.add_argument("--tables", action="store_true",
                    help="also run the experiment-table generators (long: they rewrite docs/attacks-*.md)")
    args = ap.parse_args(argv)
    names = sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules(pkg.__path__)
                   if m.name.startswith("bench_"))
    if not args.tables and not args.only:
        names = [n for n in names if n not in TABLES]
    if args.only:
        unknown = set(args.only) - set(names)
        if unknown:
            print(f"error: unknown benchmark(s) {', '.join(sorted(unknown))}; have {', '.join(names)}",
                  file=sys.stderr)
            return 2
        names = [n for n in names if n in args.only]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in names:
        mod = importlib.import_module(f"deploy.bench.bench_{name}")
        t0 = time.perf_counter()
        res = mod.run(quick=args.quick)
        res.setdefault("name", name)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        res["machine"] = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
        (out / f"{name}.json").write_text(json.dumps(res, indent=2, default=float))
        ok = res.get("pass")
        failed += ok is False
        print(f"{'PASS' if ok else 'FAIL' if ok is False else 'INFO'}  {name}: {res.get('summary', '')}")
    print(f"results in {out}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
