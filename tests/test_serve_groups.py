"""serve/groups.py on its own: which sequences share a forward pass, and the RouteSpecs that pass runs under."""

from __future__ import annotations

from loralag.routing.routers import RouteSpec
from loralag.serve.groups import Routing, group_specs

BASE = {"task": RouteSpec("lag", k=20, temperature=0.5, nprobe=4), "know": RouteSpec("lag", k=20)}


def routed(router="lag", k=20, know=("route", "lag", 20)):
    return Routing((("task", ("route", router, k)), ("know", know)))


def test_keys_group_equal_routing_and_any_fixed_adapters():
    assert routed().key == routed().key
    assert routed(k=5).key != routed().key and routed("arrow", 1).key != routed().key
    a, b = routed(know=("fixed", "doc1")), routed(know=("fixed", "doc2"))
    none = routed(know=("fixed", None))
    assert a.key == b.key == none.key != routed().key  # fixed rows, whatever their adapter, share one pass


def test_group_specs_keep_the_servers_other_settings():
    rows = [routed(know=("fixed", "doc1")), routed(know=("fixed", None)), routed(know=("fixed", "doc2"))]
    specs = group_specs(rows[0].key, rows, BASE)
    assert specs["task"] == RouteSpec("lag", k=20, temperature=0.5, nprobe=4)
    assert specs["know"] == RouteSpec("fixed", k=20, fixed=("doc1", None, "doc2"))
    only_none = [routed(know=("fixed", None))] * 2
    assert group_specs(only_none[0].key, only_none, BASE)["know"] == RouteSpec("none", k=20)
    arrow = routed("arrow", 1)
    assert group_specs(arrow.key, [arrow], BASE)["task"] == RouteSpec("arrow", k=1, temperature=0.5, nprobe=4)


def test_describe_names_what_each_library_did():
    r = Routing(
        (
            ("task", ("route", "lag", 8)),
            ("know", ("fixed", "doc1")),
            ("x", ("fixed", None)),
            ("y", ("route", "lag-prefix", 3)),
        )
    )
    assert r.describe() == {
        "task": {"router": "lag", "k": 8},
        "y": {"router": "lag-prefix", "k": 3},
        "know": {"router": "fixed", "adapter": "doc1"},
        "x": {"router": "none"},
    }
    assert r.fixed("know") == "doc1" and r.fixed("task") is None
