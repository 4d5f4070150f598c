"""`python -m services.tools.cli`: how the supervisor starts each service and the endpoint."""

from services.tools.cli import main

main()
