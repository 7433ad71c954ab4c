"""The command line: `python -m minivlm COMMAND` (also installed as `minivlm`)."""

from __future__ import annotations

import argparse

from . import bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="minivlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_parser(sub)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
