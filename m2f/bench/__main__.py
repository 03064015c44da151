import sys

from m2f.bench.cli import run

sys.exit(run())
