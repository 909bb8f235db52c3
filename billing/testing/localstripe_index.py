"""Keep localstripe's listings of one kind of object from scanning its whole store, in the
localstripe server process only (``billing.testing.localstripe_server`` imports this module
before it starts the server; importing it patches, idempotently).

localstripe 1.15 keeps every object in one dict keyed ``"<object>:<id>"`` and lists a kind by
scanning all of it (``StripeObject._api_list_all``). A charge's ``refunds``,
``amount_refunded`` and ``refunded`` are such listings, so every charge it shows (the answer
to each PaymentIntent create or confirm, and the events it writes) scans the whole store
several times: a run's cost grows with the square of what it stored. In a simulated year of
100 subscriptions (1,200 charges) that was the largest share of localstripe's CPU, and a
scale run of 10,000 customers pays it on every charge.

Here the store also keeps, for each kind, its keys in the store's own order, so a listing
reads just that kind. It returns the same objects in the same order as the scan (a dict keeps
a key's first position when it is set again and drops it when deleted, and so does the
index), so every answer is unchanged: only the time it takes.
"""

from __future__ import annotations

from typing import Any

from localstripe import resources
from localstripe.errors import UserError

_PATCHED = "_billing_kind_index"


def _kind(key: object) -> str | None:
    # localstripe's own test is key.startswith(object + ":"); no object name holds ":", so
    # that is the text before the first ":".
    if isinstance(key, str) and ":" in key:
        return key.split(":", 1)[0]
    return None


def _index(store: Any) -> dict[str, dict[str, None]]:
    """The store's kind index, rebuilt from the store when a bulk change dropped it."""
    index: dict[str, dict[str, None]] | None = store.__dict__.get("_kinds")
    if index is None:
        index = {}
        for key in dict.keys(store):
            kind = _kind(key)
            if kind is not None:
                index.setdefault(kind, {})[key] = None
        store.__dict__["_kinds"] = index
    return index


def objects_of(kind: str) -> list[Any]:
    """Every stored object of ``kind`` (e.g. ``"refund"``), in the store's order: what
    ``[v for k, v in store.items() if k.startswith(kind + ":")]`` gives, without the scan."""
    store = resources.store
    keys = _index(store).get(kind, {})
    return [dict.__getitem__(store, key) for key in keys]


def _install() -> None:
    store_class = resources.Store
    if getattr(store_class, _PATCHED, False):
        return
    set_item = store_class.__setitem__
    del_item = store_class.__delitem__

    def __setitem__(self: Any, key: Any, value: Any) -> None:
        set_item(self, key, value)
        kind = _kind(key)
        if kind is not None:
            _index(self).setdefault(kind, {})[key] = None

    def __delitem__(self: Any, key: Any) -> None:
        del_item(self, key)
        kind = _kind(key)
        if kind is not None:
            _index(self).get(kind, {}).pop(key, None)

    def bulk(name: str) -> Any:
        # update, clear, pop and the rest bypass __setitem__/__delitem__: the index is dropped
        # and rebuilt from the store at the next listing (they are rare: a load, a flush).
        original = getattr(dict, name)

        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            self.__dict__.pop("_kinds", None)
            return original(self, *args, **kwargs)

        return method

    store_class.__setitem__ = __setitem__
    store_class.__delitem__ = __delitem__
    for name in ("update", "clear", "pop", "popitem", "setdefault"):
        setattr(store_class, name, bulk(name))

    def _api_list_all(
        cls: Any, /, url: Any, limit: Any = None, starting_after: Any = None, **kwargs: Any
    ) -> Any:
        # localstripe's StripeObject._api_list_all, reading the index instead of the store.
        if kwargs:
            raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
        listing = resources.List(url, limit=limit, starting_after=starting_after)
        listing._list = objects_of(cls.object)
        return listing

    resources.StripeObject._api_list_all = classmethod(_api_list_all)
    setattr(store_class, _PATCHED, True)


_install()
