"""The platform beneath the services: the bus, the service runner, settings, TLS, artifacts,
tracking, compute and the step cache. Nothing here imports a service or a tool."""
