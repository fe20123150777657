import sys

from angelmed.cli import main

sys.exit(main())
