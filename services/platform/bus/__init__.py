"""The bus: connections, stream provisioning, publishing and the one consumer policy."""
