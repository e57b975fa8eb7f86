import sys

from sdedge.cli import main

sys.exit(main())
