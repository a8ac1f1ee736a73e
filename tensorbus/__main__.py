import sys

from tensorbus.cli import main

sys.exit(main())
