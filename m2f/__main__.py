import sys

from m2f.cli import main

sys.exit(main())
