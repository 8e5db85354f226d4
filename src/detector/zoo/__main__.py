"""``python -m detector.zoo OUT``: build the zoo of small local generators (docs/zoo.md)."""

from __future__ import annotations

import argparse
import sys
import time

from detector.errors import DetectorError
from detector.zoo.build import MODES, REAL_DIR, ZooSettings, build_zoo, list_real
from detector.zoo.nets import MEMBERS
from detector.zoo.rest import REST, write_rest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ZooSettings()
    members = "\n".join(f"  {m.name:<13} {m.about} ({m.steps} steps)" for m in MEMBERS)
    samples_only = [m for m in MEMBERS if not m.reconstructs]
    parser = argparse.ArgumentParser(
        prog="python -m detector.zoo",
        description="Train small local generators on real images (stand-ins for real "
        "generators) and write\nOUT/<member>/{train,test}/{FAKE,REAL}/*.jpg (32 px, JPEG q75 in "
        "both classes) and OUT/<member>/member.json.",
        epilog=f"members, in order:\n{members}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", help="the zoo's folder (e.g. data/zoo)")
    parser.add_argument("--members", default="", help="comma-separated (default: all)")
    parser.add_argument("--real-dir", default=REAL_DIR, help=f"default: {REAL_DIR}")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--train-images",
        type=int,
        default=defaults.train_images,
        help=f"real images each member trains on (default: {defaults.train_images})",
    )
    parser.add_argument("--steps", type=int, default=None, help="default: each member's own")
    parser.add_argument(
        "--per-class",
        type=int,
        default=defaults.per_class,
        help=f"train/ images per class and member (default: {defaults.per_class})",
    )
    parser.add_argument(
        "--test-per-class",
        type=int,
        default=defaults.test_per_class,
        help=f"test/ images per class and member (default: {defaults.test_per_class})",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=defaults.mode,
        help="FAKE: mixed = half samples, half reconstructions of held-out real images (samples "
        f"only for the members without an encoder: {', '.join(m.name for m in samples_only)})",
    )
    parser.add_argument(
        "--no-rest",
        action="store_true",
        help=f"do not link OUT/{REST}: the real folder's images no member used, with as many "
        "of its FAKE sibling's (the leak-free CIFAKE source for leave-one-out)",
    )
    parser.add_argument(
        "--rest-test-per-class",
        type=int,
        default=1000,
        help=f"test/ images per class in OUT/{REST} (default: 1000)",
    )
    return parser.parse_args(argv)


def log(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = ZooSettings(
        real_dir=args.real_dir,
        seed=args.seed,
        train_images=args.train_images,
        steps=args.steps,
        per_class=args.per_class,
        test_per_class=args.test_per_class,
        mode=args.mode,
    )
    if args.rest_test_per_class < 1:
        print("error: --rest-test-per-class must be at least 1", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        built = build_zoo(args.out, args.members, settings, log=log)
        if not args.no_rest:
            write_rest(
                args.out, list_real(settings.real_dir), settings, args.rest_test_per_class, log
            )
    except DetectorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"zoo: {len(built)} members in {args.out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
