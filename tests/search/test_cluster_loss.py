"""A lost cluster reaches Ray Tune's thread even while Tune waits on the GCS.

Ray Tune refreshes the cluster's resources with ``ray.cluster_resources()``, a blocking call
into the GCS; when the GCS dies during it, the call blocks for about a minute, and the
ClusterLost that ClusterWatch raises in Tune's thread could not land before it returned (the
lost-GCS fault test, tests/reliability/test_faults.py, then saw a driver still running 60 s after
the kill, in about half of its runs on the loaded 2-core machine). A stand-in GCS call that
blocks in C (time.sleep) here, with the real Tune method around it.
"""

from __future__ import annotations

import threading
import time

import pytest

from archsearch.search.runner import ClusterLost, ClusterWatch, _interruptible_resource_updates

BLOCK_S = 20.0


class _BlockedGcs:
    """What resource_updater sees as ``ray``: initialised, and a resource query that blocks."""

    def is_initialized(self) -> bool:
        return True

    def cluster_resources(self) -> dict:
        time.sleep(BLOCK_S)  # one C call: an async exception waits for it to return
        return {"CPU": 1.0}


def _due_updater():
    from ray.tune.utils import resource_updater

    updater = object.__new__(resource_updater._ResourceUpdater)  # no __init__: it would query the cluster
    updater._last_resource_refresh = float("-inf")  # a refresh is due
    updater._refresh_period = 10.0
    return updater


def test_cluster_lost_reaches_tunes_thread_while_it_waits_for_the_clusters_resources(monkeypatch):
    from ray.tune.utils import resource_updater

    monkeypatch.setattr(resource_updater, "ray", _BlockedGcs())
    updater = _due_updater()
    watch = ClusterWatch(ray=None, bridge=None, local=True)
    watch._target = threading.get_ident()  # this thread plays Tune's
    threading.Timer(0.5, watch._raise_in_target).start()
    t = time.monotonic()
    with pytest.raises(ClusterLost):
        with _interruptible_resource_updates():
            updater.update_avail_resources()
            time.sleep(0.01)  # (without the change: the exception lands here, after BLOCK_S)
    assert time.monotonic() - t < BLOCK_S / 2  # it came in at the next step, not after the blocked call


def test_a_refresh_that_is_not_due_and_one_that_is_give_tunes_own_results(monkeypatch):
    from ray.tune.utils import resource_updater

    class Gcs(_BlockedGcs):
        def cluster_resources(self) -> dict:
            return {"CPU": 3.0, "GPU": 1.0}

    monkeypatch.setattr(resource_updater, "ray", Gcs())
    updater = _due_updater()
    with _interruptible_resource_updates():
        updater.update_avail_resources()  # due: through the helper thread
        assert updater._avail_resources.cpu == 3.0 and updater._avail_resources.gpu == 1.0
        before = updater._last_resource_refresh
        updater.update_avail_resources()  # not due: Tune's early return, in this thread
        assert updater._last_resource_refresh == before
    assert resource_updater._ResourceUpdater.update_avail_resources.__name__ == "update_avail_resources"  # restored
