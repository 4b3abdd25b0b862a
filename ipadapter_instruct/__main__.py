"""`python -m ipadapter_instruct ...` is `ipai ...`."""
import sys

from ipadapter_instruct.cli import main

sys.exit(main())
