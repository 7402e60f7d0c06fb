"""``python -m lkconv {info,bench,verify,static,train}`` -- see ``python -m lkconv --help``."""
import sys

from lkconv.cli import main

if __name__ == "__main__":
    sys.exit(main())
