"""Rollout evaluation in process, on real databases (SQLite file and PostgreSQL server):
several evaluators (several provider processes' worth) take each step once; a phase
waits out its soak time; the health analysis's halt (the third signal) stops a rollout;
a revoked release halts its rollout. The HTTP side is in test_updates.py."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.errors import BadRequestError
from sgw.provider.db import schema
from sgw.provider.db.models import Account, Gateway, Release, UpdatePolicy, utcnow
from sgw.provider.updates.rollouts import Rollouts
from sgw.provider.updates.service import Report, Updates


@dataclass
class World:
    sessions: sessionmaker[Session]
    updates: Updates
    canaries: list[str]


@pytest.fixture
def world(db_url: str) -> Iterator[World]:
    schema.upgrade(db_url)
    engine = schema.make_engine(db_url)
    sessions = schema.session_factory(engine)
    canaries = [str(uuid.uuid4()) for _ in range(3)]
    with sessions.begin() as s:
        s.add(Account(id="acct", name="acct"))
        s.flush()
        for i, gid in enumerate(canaries):
            s.add(Gateway(id=gid, account_id="acct", name=f"gw{i}"))
        s.flush()
        for gid in canaries:
            s.add(
                UpdatePolicy(
                    gateway_id=gid,
                    channel="canary",
                    window_kind="weekly",
                    window_day=6,
                    window_hour=3,
                    window_minute=0,
                    window_minutes=60,
                    automatic="all",
                )
            )
        s.add(
            Release(
                version="2.0",
                channel="stable",
                target="releases/2.0/sgw-2.0.tar.zst",
                length=1,
                sha256="0" * 64,
                manifest="{}",
            )
        )
    yield World(sessions, Updates(sessions, Rollouts(sessions)), canaries)
    engine.dispose()


def done(world: World, gateway_id: str, at: datetime | None = None) -> None:
    world.updates.record(
        gateway_id, Report("2.0", "1.0", "done", None, 0.1, at or datetime.now(UTC))
    )


def test_several_evaluators_take_each_step_once(world: World) -> None:
    first = Rollouts(world.sessions)
    first.start("2.0", soak_s=0)
    for gid in world.canaries:
        done(world, gid)
    evaluators = [Rollouts(world.sessions) for _ in range(4)]
    steps: list[list[str]] = [[] for _ in evaluators]
    barrier = threading.Barrier(len(evaluators))

    def evaluate(i: int) -> None:
        barrier.wait()
        steps[i] = evaluators[i].evaluate()

    threads = [threading.Thread(target=evaluate, args=(i,)) for i in range(len(evaluators))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    taken = sorted(step for each in steps for step in each)
    # Phases 2 and 3 have no gateways here, so the rollout runs to its end: each step by
    # exactly one of the evaluators.
    assert taken == ["completed", "phase 2", "phase 3"]
    (info,) = first.recent()
    assert (info.state, info.phase) == ("completed", 3)


def test_a_phase_waits_out_its_soak(world: World) -> None:
    rollouts = world.updates.rollouts
    # A soak shorter than the heartbeat timeout (10 minutes): these gateways send none.
    rollouts.start("2.0", soak_s=300)
    for gid in world.canaries[:-1]:
        done(world, gid)
    # Not all its gateways are done: no soak counts yet.
    assert rollouts.evaluate(utcnow() + timedelta(minutes=8)) == []
    done(world, world.canaries[-1])
    last = utcnow()
    assert rollouts.evaluate(last + timedelta(seconds=290)) == []
    assert rollouts.recent()[0].phase == 1
    assert rollouts.evaluate(last + timedelta(seconds=310)) == ["phase 2"]
    # An empty phase soaks too, from when it began: the earlier phases are watched longer.
    assert rollouts.evaluate(last + timedelta(seconds=590)) == []
    # The canaries were heard from meanwhile (the control channel keeps last_seen).
    with world.sessions.begin() as s:
        s.execute(
            update(Gateway)
            .where(Gateway.id.in_(world.canaries))
            .values(last_seen=last + timedelta(seconds=500))
        )
    assert rollouts.evaluate(last + timedelta(seconds=620)) == ["phase 3"]


def test_the_health_analysis_halts_the_running_rollout(world: World) -> None:
    rollouts = world.updates.rollouts
    assert rollouts.halt("cohort alert") == []  # nothing runs: nothing halted
    started = rollouts.start("2.0", soak_s=600)
    (halted,) = rollouts.halt("cohort alert: 3 gateways on 2.0 report disk errors")
    assert (halted.id, halted.state) == (started.id, "halted")
    assert halted.halt_reason == "cohort alert: 3 gateways on 2.0 report disk errors"
    # Halted: the canaries are told to stay where they are.
    assert {world.updates.plan(g).version for g in world.canaries} == {None}
    assert rollouts.evaluate() == []


def test_a_revoked_release_halts_its_rollout(world: World) -> None:
    rollouts = world.updates.rollouts
    rollouts.start("2.0", soak_s=600)
    assert {world.updates.plan(g).version for g in world.canaries} == {"2.0"}
    with world.sessions.begin() as s:
        s.execute(update(Release).where(Release.version == "2.0").values(revoked=utcnow()))
    assert rollouts.evaluate() == ["halted: release 2.0 was revoked"]
    assert {world.updates.plan(g).version for g in world.canaries} == {None}


def test_update_now_never_hands_out_the_release_of_a_halted_rollout(world: World) -> None:
    rollouts = world.updates.rollouts
    gateway = world.canaries[0]
    rollouts.start("2.0", soak_s=600)
    rollouts.halt("cohort alert")
    with pytest.raises(BadRequestError, match="rollout is halted"):
        world.updates.mark_now("acct", gateway)
    with world.sessions.begin() as s:
        s.add(
            Release(
                version="1.5",
                channel="stable",
                target="releases/1.5/sgw-1.5.tar.zst",
                length=1,
                sha256="0" * 64,
                manifest="{}",
            )
        )
    assert world.updates.mark_now("acct", gateway) == "1.5"
    plan = world.updates.plan(gateway)
    assert (plan.version, plan.now) == ("1.5", True)
    # Resumed, the rollout's release is the gateway's plan again once `now` is done.
    world.updates.record(gateway, Report("1.5", "1.0", "done", None, 0.1, datetime.now(UTC)))
    rollouts.resume()
    assert world.updates.plan(gateway).version == "2.0"
