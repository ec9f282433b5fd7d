import sys

from canary_server.cli import main

sys.exit(main())
