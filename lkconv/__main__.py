"""``python -m lkconv {info,bench,verify,suite,static,train}`` -- see ``python -m lkconv --help``."""
import sys

from lkconv.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
