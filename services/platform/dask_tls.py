"""Mutual TLS for Dask: whoever can talk to the scheduler can run code in the workers.

Dask moves pickled functions: a scheduler runs whatever its clients submit on its workers. So
every Dask connection cairn makes or accepts is TLS with a certificate on both ends, signed by
the cluster's own CA (`distributed.security.Security`, `require_encryption=True`):

- `write_dask_tls(folder)` (behind `cairn dask-tls --out DIR`): a CA and one certificate for
  every member of the cluster, named as in a Kubernetes TLS Secret: `ca.crt`, `tls.crt`,
  `tls.key`, plus `ca.key`, which stays with whoever issues certificates. One certificate,
  because each Dask process both listens and connects (server and client usage); Dask checks
  the CA, not host names, so no names are needed.
- `client_security(settings)`: what a service presents to a remote scheduler
  (CAIRN_DASK_TLS_CA/_CERT/_KEY); `check_address` refuses a tcp:// scheduler with it, and a
  tls:// one without it, before anything connects.
- `local_security()`: a throwaway in-memory certificate for the LocalCluster, so even on a
  shared host the loopback ports take no one else's tasks.
"""

from __future__ import annotations

from pathlib import Path

from distributed.security import Security

from services.platform.settings import CairnSettings
from services.platform.tls import issue_cert, load_or_create_ca, write_file

CA, CA_KEY, CERT, KEY = "ca.crt", "ca.key", "tls.crt", "tls.key"
SCHEDULER_PORT = 8786


class DaskTLSError(ValueError):
    """Dask TLS settings that cannot work: said before anything connects."""


def write_dask_tls(folder: Path, days: int = 825) -> list[Path]:
    """A CA and one ECDSA P-256 certificate for scheduler, workers and clients; keys 0600.

    An existing CA is kept, so certificates it signed stay valid; the member certificate is
    reissued.
    """
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder.mkdir(parents=True, exist_ok=True)
    ca_path, ca_key_path = folder / CA, folder / CA_KEY
    ca = load_or_create_ca(ca_path, ca_key_path, "cairn Dask CA", days * 2)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert, key = issue_cert(ca, "cairn Dask member", usages, days, key_usage=True)
    return [ca_path, ca_key_path, write_file(folder / CERT, cert), write_file(folder / KEY, key, 0o600)]


def client_security(settings: CairnSettings) -> Security | None:
    """The TLS identity of a service towards a remote scheduler; None when none is configured."""
    files = {
        "CAIRN_DASK_TLS_CA": settings.dask_tls_ca,
        "CAIRN_DASK_TLS_CERT": settings.dask_tls_cert,
        "CAIRN_DASK_TLS_KEY": settings.dask_tls_key,
    }
    if not any(files.values()):
        return None
    unset = [name for name, path in files.items() if path is None]
    if unset:
        raise DaskTLSError(f"Dask TLS needs CAIRN_DASK_TLS_CA, _CERT and _KEY; unset: {', '.join(unset)}")
    missing = [f"{name}={path}" for name, path in files.items() if not path.expanduser().is_file()]
    if missing:
        raise DaskTLSError(f"Dask TLS files not found: {', '.join(missing)}")
    ca, cert, key = (str(p.expanduser()) for p in files.values())
    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)


def check_address(address: str, security: Security | None) -> str:
    """A tls:// scheduler with certificates, anything else without: a mismatch fails at start-up."""
    tls = address.startswith("tls://")
    if security is not None and not tls:
        raise DaskTLSError(f"CAIRN_DASK_TLS_* are set but the scheduler address {address} is not tls://")
    if security is None and tls:
        raise DaskTLSError(f"scheduler {address} speaks TLS: set CAIRN_DASK_TLS_CA, _CERT and _KEY")
    return address


def kube_scheduler_address(settings: CairnSettings) -> str:
    """The TLS address of the chart's DaskCluster scheduler Service (the operator's naming)."""
    host = f"{settings.dask_k8s_cluster}-scheduler"
    if settings.dask_k8s_namespace:
        host += f".{settings.dask_k8s_namespace}.svc"
    return f"tls://{host}:{SCHEDULER_PORT}"


def local_security() -> Security:
    """Self-signed and held in memory: only this process and its workers hold the key (Dask puts
    it in a private temporary directory only for the instant it loads it)."""
    return Security.temporary()
