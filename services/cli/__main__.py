"""`python -m services.cli`: how the supervisor starts each service and the endpoint."""

from services.cli import main

main()
