"""The features step computes on its own threads whatever Dask client the process holds.

Dask picks a dataframe shuffle by what it finds: "disk" without a distributed client, "p2p" when one
is the process's default. p2p runs only on a distributed worker, so `features.build` on its threads
failed ("P2P ... failed during transfer phase") in any process where a client had been made, as a
full suite run on three workers showed. The method is now fixed, and the bytes do not move.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from distributed import Client

from contracts import DataArrived, ModelFamily, SearchStrategy, TuningSpec
from services.features import logic as features
from services.ingestion.app import ingest
from services.platform.artifacts import ArtifactStore
from services.platform.settings import CairnSettings


def test_features_are_the_same_bytes_with_and_without_a_default_distributed_client(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = "\n".join(
        f"{a:.4f},{b:.4f},{'xyz'[i % 3]},{a - b:.4f}" for i, (a, b) in enumerate(rng.normal(size=(300, 2)))
    )
    csv = tmp_path / "data" / "table.csv"
    csv.parent.mkdir()
    csv.write_text("a,b,c,y\n" + rows + "\n")
    settings = CairnSettings(home=tmp_path / "home", allowed_roots=[str(csv.parent)])
    store = ArtifactStore(settings.artifacts)
    spec = TuningSpec(trials=1, families=[ModelFamily.linear], strategy=SearchStrategy.random)
    ingested = ingest(DataArrived(uri=csv.as_uri(), target="y", tuning=spec), store, settings)

    alone = features.build(ingested, store)
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None):
        beside_a_client = features.build(ingested, store)
    assert beside_a_client.featureset.sha256 == alone.featureset.sha256
    assert beside_a_client.transform.sha256 == alone.transform.sha256
