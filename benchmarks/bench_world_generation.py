"""How long the evolving synthetic world takes to generate, against the one-date world of the
same scenes (its peer: the same ground, drawn once per scene instead of once per date).

    python benchmarks/bench_world_generation.py [--sites 4] [--dates 3] [--size 512] [--rounds 3] [--workers 1]

Each round generates both worlds into fresh folders (rows alternate); the figures are
medians: seconds per world and per written scene (one site at one date, or one scene).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from rts_thaw.data.synthetic import WorldParams, generate_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--dates", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    worlds = {"one date per scene": WorldParams(scenes=args.sites, size=args.size),
              f"{args.dates} dates per site": WorldParams(scenes=args.sites, size=args.size, dates=args.dates)}
    seconds = {name: [] for name in worlds}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, params in worlds.items():
                start = time.perf_counter()
                generate_world(Path(tmp) / f"{r}-{params.dates}", params, workers=args.workers)
                seconds[name].append(time.perf_counter() - start)
    print(f"{args.sites} sites of {args.size} px, {args.workers} worker(s), median of {args.rounds}")
    for name, params in worlds.items():
        total = statistics.median(seconds[name])
        print(f"  {name:<20} {total:6.1f} s   {total / (args.sites * params.dates):5.2f} s per scene")


if __name__ == "__main__":
    main()
