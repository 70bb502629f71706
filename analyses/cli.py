"""`hooked-av` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hooked-av", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo on the embedded default model")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("hooks", help="list the uniform hook names of the tiny demo model")
    args = parser.parse_args(argv)
    from analyses import demo as demo_mod

    if args.command == "demo":
        return demo_mod.run(out=args.out, seed=args.seed)
    if args.command == "hooks":
        return demo_mod.list_hooks()
    return 1


if __name__ == "__main__":
    sys.exit(main())
