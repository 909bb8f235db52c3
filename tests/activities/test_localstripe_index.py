"""``billing.testing.localstripe_index``: localstripe lists one kind of object without scanning
its whole store, and lists exactly what the scan listed, in the same order.

It patches localstripe, which only its server process may import: the checks run in a process
of their own, as the server does."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHECK = textwrap.dedent(
    """
    from localstripe import resources
    import billing.testing.localstripe_conformance
    import billing.testing.localstripe_index
    import billing.testing.localstripe_settlement
    from billing.testing.localstripe_index import objects_of

    resources.Store.dump_to_disk = lambda self: None
    store = resources.store

    def scan(kind):
        return [v for k, v in dict.items(store) if k.startswith(kind + ":")]

    def same(step):
        for kind in ("customer", "charge", "refund", "dispute", "balance"):
            assert objects_of(kind) == scan(kind), (step, kind, objects_of(kind), scan(kind))

    for i in range(5):
        store[f"customer:cus_{i}"] = f"c{i}"
        store[f"charge:ch_{i}"] = f"h{i}"
    store["balance"] = "singleton"  # a key without a kind, as localstripe's balance
    same("set")
    del store["customer:cus_2"]
    store["customer:cus_0"] = "c0 again"  # keeps its place, as a dict does
    store["customer:cus_2"] = "c2 back"  # goes to the end
    same("delete and set again")
    store.update({"refund:re_1": "r1", "customer:cus_9": "c9"})
    same("update")
    store.pop("charge:ch_3")
    same("pop")
    store.clear()
    same("clear")
    store["dispute:dp_1"] = "d1"
    same("after clear")

    # A listing reads the index, never the whole store.
    store.clear()
    store["customer:cus_a"] = resources.Customer._api_retrieve  # any object will do
    scans = []
    original_items = resources.Store.items
    resources.Store.items = lambda self: scans.append(1) or original_items(self)
    listed = resources.Customer._api_list_all("/v1/customers", limit=10)._list
    assert listed == [resources.Customer._api_retrieve], listed
    assert scans == [], f"the listing scanned the store {len(scans)} times"
    print("ok")
    """
)


def test_listings_read_their_kind_only_and_list_what_the_scan_listed() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
