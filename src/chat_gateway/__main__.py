import sys

from chat_gateway.server.cli import main

sys.exit(main())
