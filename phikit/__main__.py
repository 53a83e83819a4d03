import sys

from phikit.cli import main

sys.exit(main())
