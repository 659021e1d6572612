"""config.Limits, grouped by who must agree on each limit: every name is in
exactly one group, Limits.of routes each name to its group and refuses one
it does not know (as `anbao serve --limit` does), the wire limits' defaults
are the SDK's, and the defaults live in config.py only: no component the
worker wires takes a limit as a separate argument with a default."""

import dataclasses
import importlib
import inspect
import pkgutil

import pytest

import anbao
from anbao import config
from anbao.cli.server import _limits
from anbao.config import Limits
from anbao_client import protocol

pytestmark = pytest.mark.fast

GROUPS = {f.name: f.default for f in dataclasses.fields(Limits)}


def test_every_name_is_in_exactly_one_group():
    names = [f.name for group in GROUPS.values() for f in dataclasses.fields(group)]
    assert len(names) == len(set(names)), "a name in two groups would make --limit ambiguous"
    assert Limits.names() == names
    assert not set(names) & set(GROUPS), "a limit is not named like a group"


def changed_value(name: str, default: int) -> tuple[Limits, int]:
    """A Limits with this one limit changed; one step up unless the checks
    refuse it (a value at its ceiling), then one step down."""
    for value in (default + 1, default - 1):
        try:
            return Limits.of(**{name: value}), value
        except AssertionError:
            continue
    raise AssertionError(f"{name} can be moved neither up nor down from {default}")


@pytest.mark.parametrize("name", Limits.names())
def test_of_routes_each_name_to_its_group(name):
    default = dict(Limits().items())
    changed, value = changed_value(name, default[name])
    group = next(g for g, d in GROUPS.items() if name in {f.name for f in dataclasses.fields(d)})
    assert getattr(getattr(changed, group), name) == value
    assert dict(changed.items()) == {**default, name: value}, "every other limit keeps its default"


def test_of_checks_across_groups():
    with pytest.raises(AssertionError):
        Limits.of(max_members=20_000)  # a member list past one frame (WireLimits) and past a group (ProductRules)
    with pytest.raises(AssertionError):
        Limits.of(max_frame_bytes=100_000, max_write_buffer_bytes=150_000)  # the buffer holds two frames


def test_an_unknown_name_is_refused_by_of_and_by_the_cli(capsys):
    with pytest.raises(TypeError, match="no limit named 'max_rollup_backlog'"):
        Limits.of(max_rollup_backlog=1)  # the engine's old name for max_rollup_backlog_grabs
    with pytest.raises(SystemExit) as exit_:
        _limits(["max_rollup_backlog=1"])
    assert exit_.value.code == 2
    assert "NAME one `anbao limits` lists, not 'max_rollup_backlog=1'" in capsys.readouterr().err
    assert _limits(["batch_max_grabs=10", "db_probe_interval_ms=100"]) == Limits.of(
        batch_max_grabs=10, db_probe_interval_ms=100
    )


def test_the_wire_limits_defaults_are_the_sdks():
    wire = Limits().wire
    assert wire.max_frame_bytes == protocol.DEFAULT_MAX_FRAME_BYTES
    assert wire.events_max_page == protocol.MAX_EVENTS_PAGE
    assert wire.max_page_rows == protocol.MAX_PAGE_ROWS


def _classes_of_anbao():
    for info in pkgutil.walk_packages(anbao.__path__, "anbao."):
        if info.name.startswith(("anbao.cli", "anbao.demo")):
            continue  # commands, not components
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            # A dataclass is a record (a packet's stored max_share_cents, an
            # audit report's grace), not a component given limits.
            if cls.__module__ == info.name != "anbao.config" and not dataclasses.is_dataclass(cls):
                yield cls


def test_no_component_repeats_a_default_or_renames_a_limit():
    """A constructor parameter named as a limit, or as a limit was once
    renamed on its way in (worker.py passed max_rollup_backlog_grabs as
    max_rollup_backlog, and so on), is a limit passed field by field: a
    component takes its group instead, and only config.py says a default."""
    names = set(Limits.names())
    renamed = {"max_rollup_backlog", "relay_unadmitted_above", "max_known_users", "overlap_min_grabs"}
    renamed |= {"slots", "resolve_timeout_ms", "batches_per_pass", "idle_poll_ms", "max_waiters", "slack"}
    offenders = []
    for cls in _classes_of_anbao():
        init = cls.__dict__.get("__init__")
        if init is None or not inspect.isfunction(init):
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name in renamed or (p.name in names and p.default is not inspect.Parameter.empty):
                offenders.append(f"{cls.__module__}.{cls.__qualname__}({p.name})")
    assert not offenders, offenders


def test_each_wired_component_takes_its_own_group():
    from anbao.admission import MemcachedPermits
    from anbao.engine.cooldown import Cooldown
    from anbao.engine.expiry import ExpirySweeper
    from anbao.engine.feed import EventFeed
    from anbao.engine.grabs import GrabEngine
    from anbao.server.peers import PeerLink
    from anbao.server.ratelimit import RateLimits
    from anbao.server.router import Router
    from anbao.server.sets import SetPeers, SetWatch
    from anbao.storage.commit import GrabCommitter, Roller

    takes = {
        GrabCommitter: "CommitTuning",
        GrabEngine: "CommitTuning",
        Roller: "RollupTuning",
        Cooldown: "ProductRules",
        RateLimits: "ProductRules",
        EventFeed: "EventTuning",
        ExpirySweeper: "ExpiryTuning",
        Router: "AdmissionTuning",
        MemcachedPermits: "AdmissionTuning",
        PeerLink: "RelayTuning",
        SetPeers: "PeerSetTuning",
        SetWatch: "PeerSetTuning",
    }
    for cls, group in takes.items():
        annotations = [p.annotation for p in inspect.signature(cls.__init__).parameters.values()]
        assert group in annotations, f"{cls.__name__} takes {group}"
        assert hasattr(config, group)
