"""The tools above the services: the `cairn` command line, the client that follows runs, the
supervisor that starts the services, provisioning, replay, the demo and garbage collection."""
