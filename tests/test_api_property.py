"""Property: random small programs over hcrepo's public API never run a call as the wrong
clinic, never duplicate a committed write, never read older than their own write, and never
put a parameter value into an error.

A program is a list of steps (the dataclasses below): context blocks (nested, through
`db.context` or a `@contextmanager` helper), generators that enter a clinic and yield,
thread-pool tasks (bound with `bind_context` or not, some leaking a context), units of work
(with savepoints, nested transactions, autonomous writes), retried transactions (a SQL
function injects 40001 and 40P01 deterministically), plain and cached reads, writes, streams
and `read_after` tokens, across three clinics. Each step's `expect` asks the oracle (`Model`)
what must happen — the clinic and actor the call runs as, the error it must raise, the rows
it may return — and `run` does it for real against one Database: the primary, a replica
whose replay is paused (so a read routed past its caller's own write is visibly stale) and
Redis. As every block starts and ends the interpreter adds its own checks: the block's
`last_write_token()`, and reads (plain, tagged, untagged cache) of what it committed.

Steps name items relative to the clinic they run as (0 and 1 are its own, 2 to 5 another
clinic's); messages name them absolutely (item i belongs to clinic i // 2). Inside a unit of
work's block the unit's clinic and actor are ambient, as the README says.

Every program gets rows of its own (a batch of two items per clinic), a fresh contextvars
Context and a fresh one-thread pool, so programs are independent of each other and
hypothesis can shrink a failure to a minimal program. A failure names the property it broke
in brackets: [context], [wrong-clinic row], [stale read], [uncommitted read], [duplicate
write], [lost write], [unit of work], [retries], [token], [value in error] or [outcome]
(anything else the oracle did not predict).
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import os
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple
from uuid import UUID

import psycopg
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from hcrepo import (
    ActorRequired,
    Database,
    HcrepoError,
    InvalidContext,
    Repository,
    SerializationFailure,
    Settings,
    TenantContextMissing,
    UnitOfWork,
    WriteOutsideUnitOfWork,
    bind_context,
    cached,
    query,
)
from hcrepo.testing import PostgresServer, RedisServer
from hcrepo.testing.plugin import WaitReplayed
from tests.plugins.database import Database as ServerDatabase
from tests.support.errors import exception_chain
from tests.support.repos import Clinic, new_clinic

NORMAL_EXAMPLES = 2000
SOAK_EXAMPLES = 20000  # HCREPO_SOAK=<n> runs n instead
CHUNK = 250  # programs per hypothesis run (see explore)
CLINICS = 3
ITEMS = 2 * CLINICS  # item i belongs to clinic i // 2
BATCHES_PER_FILL = 2500
# Parameter values are long and distinctive, so finding one in an error message means it
# was copied there.
VALUE_BASE = 9_184_000_000_000
TOKEN_BASE = 7_300_000_000_000
SCHEMA = "hcrepo_prop"
KEEP = "keep"  # a db.context field not given: inherited from the enclosing block

_TENANT = "clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid)"
SCHEMA_SQL = f"""
DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
CREATE SCHEMA {SCHEMA};
CREATE TABLE {SCHEMA}.items (
    batch int NOT NULL,
    slot smallint NOT NULL,
    clinic_id uuid NOT NULL,
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    value bigint NOT NULL DEFAULT 0,
    writes int NOT NULL DEFAULT 0
);
CREATE INDEX ON {SCHEMA}.items (clinic_id, batch);
ALTER TABLE {SCHEMA}.items ENABLE ROW LEVEL SECURITY;
ALTER TABLE {SCHEMA}.items FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON {SCHEMA}.items FOR ALL TO hcrepo_app
    USING ({_TENANT}) WITH CHECK ({_TENANT});
-- nextval is never rolled back: the attempts of a rolled-back transaction stay counted.
CREATE SEQUENCE {SCHEMA}.attempts START WITH {TOKEN_BASE};
-- A caller reserves a token with nextval and then calls this with it: the first `times`
-- calls fail, with 40001 then 40P01 alternately (the token, a parameter value, goes into
-- DETAIL as PostgreSQL does with key values); later calls return 0. Calls must not
-- interleave with another reservation.
CREATE FUNCTION {SCHEMA}.fail_first(token bigint, times int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    failure bigint;
BEGIN
    IF (SELECT last_value FROM {SCHEMA}.attempts) < token + times THEN
        failure := nextval('{SCHEMA}.attempts') - token;
        RAISE EXCEPTION USING
            ERRCODE = CASE WHEN failure % 2 = 1 THEN '40001' ELSE '40P01' END,
            MESSAGE = 'injected serialization failure or deadlock',
            DETAIL = format('token %s', token);
    END IF;
    RETURN 0;
END $$;
GRANT USAGE ON SCHEMA {SCHEMA} TO hcrepo_app;
GRANT SELECT, UPDATE ON {SCHEMA}.items TO hcrepo_app;
GRANT USAGE, SELECT ON SEQUENCE {SCHEMA}.attempts TO hcrepo_app;
"""

# A library that runs a write it should refuse could wait for a row lock held by the
# program's own unit of work: the program would hang instead of failing.
LOCK_TIMEOUT = "options=-c%20lock_timeout%3D500"


class ItemRow(BaseModel):
    clinic_id: UUID
    id: UUID
    value: int
    writes: int


class SessionRow(BaseModel):
    clinic: str | None
    actor: str | None


class Items(Repository, sql="sql/property.sql"):
    @query("prop_item")
    def get(self, *, id: UUID) -> ItemRow | None: ...

    @query("prop_item_tagged", phi=True)
    @cached(ttl=60, tags=["item:{id}"])
    def tagged(self, *, id: UUID) -> ItemRow | None: ...

    @query("prop_item_untagged", phi=True)
    @cached(ttl=60)
    def untagged(self, *, id: UUID) -> ItemRow | None: ...

    @query("prop_items")
    def rows(self, *, batch: int) -> list[ItemRow]: ...

    @query("prop_items_stream")
    def stream(self, *, batch: int) -> Iterator[ItemRow]: ...

    @query("prop_set_value", invalidates=["item:{id}"])
    def set_value(self, *, id: UUID, value: int) -> int: ...

    @query("prop_session")
    def session(self) -> SessionRow: ...

    @query("prop_fail_first")
    def fail_first(self, *, token: int, times: int) -> int: ...


def owner(item: int) -> int:
    return item // 2


def own_items(clinic: int) -> list[int]:
    return [item for item in range(ITEMS) if owner(item) == clinic]


def shown(value: int) -> str:
    return f"v{value - VALUE_BASE}" if value else "initial"


# --- the servers ----------------------------------------------------------------------------


class Batches:
    """Rows for one program each: batch b has slots 0..5, slot i owned by clinic i // 2.

    Batches are made while the replica replays and handed out while its replay is paused;
    a refill resumes replay, inserts, waits until the replica has the rows, pauses again.
    """

    def __init__(self, world: World) -> None:
        self._world = world
        self._ready: dict[int, tuple[UUID, ...]] = {}
        self._next = 1

    def take(self) -> tuple[int, tuple[UUID, ...]]:
        if not self._ready:
            self._fill()
        batch = min(self._ready)
        return batch, self._ready.pop(batch)

    def _fill(self) -> None:
        world = self._world
        first, last = self._next, self._next + BATCHES_PER_FILL - 1
        world.replay(paused=False)
        rows = world.superuser.execute(
            f"INSERT INTO {SCHEMA}.items (batch, slot, clinic_id)"
            " SELECT b, s, (%s::uuid[])[s / 2 + 1]"
            " FROM generate_series(%s::int, %s::int) b, generate_series(0, 5) s"
            " RETURNING batch, slot, id",
            [[clinic.id for clinic in world.clinics], first, last],
        ).fetchall()
        slots: dict[int, dict[int, UUID]] = {}
        for batch, slot, item_id in rows:
            slots.setdefault(batch, {})[slot] = item_id
        self._ready = {b: tuple(ids[s] for s in range(ITEMS)) for b, ids in slots.items()}
        self._next = last + 1
        world.wait_replayed(world.replica)
        world.replay(paused=True)


@dataclass
class World:
    db: Database
    clinics: tuple[Clinic, ...]
    superuser: psycopg.Connection[Any]
    replica_superuser: psycopg.Connection[Any]
    replica: PostgresServer
    wait_replayed: WaitReplayed
    batches: Batches = field(init=False)
    programs: int = 0

    def __post_init__(self) -> None:
        self.batches = Batches(self)

    def replay(self, *, paused: bool) -> None:
        call = "pg_wal_replay_pause()" if paused else "pg_wal_replay_resume()"
        self.replica_superuser.execute(f"SELECT {call}")

    def reserve_token(self) -> int:
        row = self.superuser.execute(f"SELECT nextval('{SCHEMA}.attempts')").fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture(scope="module")
def world(
    migrated_db: ServerDatabase, pg_replica: PostgresServer, redis_server: RedisServer,
    wait_replayed: WaitReplayed,
) -> Iterator[World]:
    clinics = tuple(new_clinic(migrated_db.superuser_url, providers=0, patients=0)
                    for _ in range(CLINICS))
    superuser = psycopg.connect(migrated_db.superuser_url, autocommit=True)
    replica_superuser = psycopg.connect(migrated_db.replica_superuser_url(pg_replica),
                                        autocommit=True)
    superuser.execute(SCHEMA_SQL)
    options: dict[str, Any] = {
        "database_url": f"{migrated_db.app_url}?{LOCK_TIMEOUT}",
        "read_replica_urls": [migrated_db.replica_app_url(pg_replica)],
        "redis_url": redis_server.url,
        "cache_key_prefix": f"prop{uuid.uuid4().hex[:8]}",
        "cache_encryption_key": base64.b64encode(bytes(range(32))).decode(),
        "pool_min": 1,
        "pool_max": 4,
        # The paused replica stays routable: its lag must not take it out of routing,
        # and the monitor stays out of the way.
        "health_interval": 300.0,
        "max_lag_seconds": 600.0,
        "max_lag_bytes": 1 << 36,
    }
    made = World(Database(Settings(**options)), clinics, superuser, replica_superuser,
                 pg_replica, wait_replayed)
    try:
        with made.db:
            # The health monitor starts with the first read: started here, its jittered
            # sleep (the random module) stays out of hypothesis's draws.
            with made.db.context(clinic_id=clinics[0].id):
                Items(made.db).session()
            yield made
    finally:
        made.replay(paused=False)
        superuser.execute(f"DROP SCHEMA {SCHEMA} CASCADE")
        wait_replayed(pg_replica)
        superuser.close()
        replica_superuser.close()


# --- the oracle -----------------------------------------------------------------------------


class Violation(AssertionError):
    """A step did something the target semantics forbid; `prop` names the property."""

    def __init__(self, prop: str, message: str) -> None:
        super().__init__(f"[{prop}] {message}")
        self.prop, self.message = prop, message


class Ctx(NamedTuple):
    """A context as indices: clinic k, the actor of clinic k (None: not set)."""

    clinic: int | None = None
    actor: int | None = None


NO_CONTEXT = Ctx()


def resolve(ref: int, ctx: Ctx) -> int:
    """Steps name items relative to the clinic they run as: 0 and 1 are its own."""
    return (2 * (ctx.clinic or 0) + ref) % ITEMS


@dataclass(eq=False)
class Frame:
    """One block as the oracle sees it: its context, and `seen`, the lowest value a read in
    it must return per item. A `db.context` block holds a write position (`positions`): its
    commits, and those of the blocks in it, are its to see. A unit of work's block (whose
    context is ambient in it) and a `read_after` block (`awaits` a token) hold none."""

    ctx: Ctx
    seen: dict[int, int] = field(default_factory=dict)
    commits: int = 0
    awaits: bool = False
    positions: bool = True


@dataclass
class UnitModel:
    ctx: Ctx
    pending: dict[int, tuple[int, int]] = field(default_factory=dict)  # item: (value, writes)
    begun: bool = False  # a statement ran: its COMMIT records a position

    def begin(self, result: object = None) -> None:
        self.begun = True


@dataclass(frozen=True)
class Binding:
    """What a task runs as: the submitter's context, the blocks its writes belong to, and
    the unit of work open where it was bound (a plain write refuses to run beside it while
    it is open, since a retry of the unit would submit it again)."""

    ctx: Ctx
    required: dict[int, int]
    frames: tuple[Frame, ...]
    unit: UnitModel | None = None

    def unit_open(self, model: Model) -> bool:
        return self.unit is not None and self.unit is model.unit


UNBOUND = Binding(NO_CONTEXT, {}, ())


@dataclass(frozen=True)
class TokenModel:
    ctx: Ctx
    required: dict[int, int]
    given: bool


@dataclass(frozen=True)
class Names:
    """Index ↔ UUID for this program's clinics, actors and items."""

    clinics: tuple[UUID, ...]
    actors: tuple[UUID, ...]
    items: tuple[UUID, ...]

    def clinic(self, k: int | None) -> UUID | None:
        return None if k is None else self.clinics[k]

    def actor(self, k: int | None) -> UUID | None:
        return None if k is None else self.actors[k]

    def describe(self, clinic: str | None, actor: str | None) -> str:
        def name(value: str | None, ids: tuple[UUID, ...], what: str) -> str:
            if not value:
                return f"no {what}"
            known = [str(i) for i in ids]
            return f"{what} {known.index(value)}" if value in known else f"a foreign {what}"

        return f"{name(clinic, self.clinics, 'clinic')} / {name(actor, self.actors, 'actor')}"


@dataclass
class Model:
    """The oracle: committed state, the main thread's blocks, open generators, tokens."""

    names: Names
    committed: dict[int, tuple[int, int]] = field(
        default_factory=lambda: dict.fromkeys(range(ITEMS), (0, 0)))
    history: dict[int, set[tuple[int, int]]] = field(
        default_factory=lambda: {item: {(0, 0)} for item in range(ITEMS)})
    frames: list[Frame] = field(default_factory=list)
    unit: UnitModel | None = None
    generators: list[int] = field(default_factory=list)  # their clinics, oldest first
    tokens: list[TokenModel] = field(default_factory=list)
    bindings: list[tuple[Binding, Task]] = field(default_factory=list)
    outside_commits: int = 0  # commits on the main thread outside any block
    last_value: int = VALUE_BASE

    @property
    def ctx(self) -> Ctx:
        return self.frames[-1].ctx if self.frames else NO_CONTEXT

    def required(self) -> dict[int, int]:
        """The lowest value a read here must return, per item (the blocks open now)."""
        merged: dict[int, int] = {}
        for frame in self.frames:
            for item, value in frame.seen.items():
                merged[item] = max(merged.get(item, 0), value)
        return merged

    def binding(self) -> Binding:
        return Binding(self.ctx, self.required(), tuple(self.frames), self.unit)

    def allocate(self) -> int:
        self.last_value += 1
        return self.last_value

    def free_item(self, item: int) -> int:
        """`item`, or the next one the open unit of work has not locked by writing it."""
        locked = self.unit.pending if self.unit else {}
        return next(i % ITEMS for i in range(item, item + ITEMS) if i % ITEMS not in locked)

    def unit_view(self, item: int) -> tuple[int, int]:
        assert self.unit is not None
        return self.unit.pending.get(item, self.committed[item])

    def commit(self, values: dict[int, int], frames: Sequence[Frame] | None = None) -> None:
        """A COMMIT of one write to each item of `values` (its new value)."""
        self.commit_states(
            {item: (value, self.committed[item][1] + 1) for item, value in values.items()},
            frames)

    def commit_states(self, states: dict[int, tuple[int, int]],
                      frames: Sequence[Frame] | None = None) -> None:
        """A COMMIT leaving each item of `states` at (value, writes), made in `frames` (None:
        on the main thread, in its blocks open now); those holding a write position must
        see it from now on."""
        if frames is None:
            frames = self.frames
            if not any(frame.positions for frame in frames):
                self.outside_commits += 1
        for item, state in states.items():
            self.committed[item] = state
            self.history[item].add(state)
        for frame in frames:
            if not frame.positions:
                continue
            frame.commits += 1
            for item, (value, _) in states.items():
                frame.seen[item] = max(frame.seen.get(item, 0), value)



@dataclass
class Expect:
    """The oracle's prediction for one step: an error it must raise (any of `raises`), or
    what its result must satisfy (`check`) and what that changes (`effect`). `args` are the
    arguments the oracle chose (a free item, a fresh value) for `run` to use."""

    raises: tuple[type[BaseException], ...] = ()
    check: Callable[[Any], None] = lambda result: None
    effect: Callable[[Any], None] = lambda result: None
    args: dict[str, Any] = field(default_factory=dict)


def refusals(ctx: Ctx, *, write: bool = False, unit_open: bool = False
             ) -> tuple[type[BaseException], ...]:
    """What a repository call must raise before any round trip (any one of them)."""
    found: list[type[BaseException]] = []
    if ctx.clinic is None:
        found.append(TenantContextMissing)
    if write and ctx.actor is None:
        found.append(ActorRequired)
    if write and unit_open:
        found.append(WriteOutsideUnitOfWork)
    return tuple(found)


def session_check(model: Model, ctx: Ctx, what: str) -> Callable[[SessionRow], None]:
    names = model.names

    def check(got: SessionRow) -> None:
        wanted = (str(names.clinic(ctx.clinic) or ""), str(names.actor(ctx.actor) or ""))
        seen = (got.clinic or "", got.actor or "")
        if seen != wanted:
            raise Violation("context", f"{what} ran as {names.describe(*seen)}, expected "
                                       f"{names.describe(*wanted)}")

    return check


def check_item(model: Model, ctx: Ctx, item: int, row: ItemRow | None,
               required: dict[int, int], exact: tuple[int, int] | None = None) -> None:
    """One item as read by `ctx`: another clinic's item is invisible, an own item is a
    committed state (`exact`: this one) at least as new as `required` says."""
    names = model.names
    if row is not None and (row.clinic_id != names.clinic(ctx.clinic)
                            or owner(item) != ctx.clinic):
        raise Violation("wrong-clinic row", f"running as clinic {ctx.clinic}, read item {item} "
                                            f"of clinic {owner(item)}")
    if owner(item) != ctx.clinic:
        return
    if row is None:
        raise Violation("outcome", f"clinic {ctx.clinic} could not read its own item {item}")
    state = (row.value, row.writes)
    if exact is not None:
        if state != exact:
            prop = "stale read" if row.value < exact[0] else "outcome"
            raise Violation(prop, f"item {item} read {shown(row.value)} after {row.writes} "
                                  f"writes, expected {shown(exact[0])} after {exact[1]}")
        return
    if state not in model.history[item]:
        committed = dict(model.history[item])
        if row.value not in committed:
            prop = "uncommitted read"
        else:
            prop = "duplicate write" if row.writes > committed[row.value] else "lost write"
        raise Violation(prop, f"item {item} read {shown(row.value)} after {row.writes} "
                              f"writes, a state never committed")
    if row.value < required.get(item, 0):
        raise Violation("stale read", f"item {item} read {shown(row.value)}, older than "
                                      f"{shown(required[item])} this block must see")


def check_rows(model: Model, ctx: Ctx, rows: list[ItemRow], required: dict[int, int],
               exact: Callable[[int], tuple[int, int]] | None = None) -> None:
    by_id = {item_id: item for item, item_id in enumerate(model.names.items)}
    for row in rows:
        check_item(model, ctx, by_id[row.id], row, required,
                   exact(by_id[row.id]) if exact else None)
    found = sorted(by_id[row.id] for row in rows)
    if ctx.clinic is not None and found != own_items(ctx.clinic):
        raise Violation("outcome", f"clinic {ctx.clinic} listed items {found}")


def rowcount_check(own: bool) -> Callable[[int], None]:
    def check(count: int) -> None:
        if count != int(own):
            raise Violation("wrong-clinic row" if count else "outcome",
                            f"the write changed {count} rows, expected {int(own)}")

    return check


# --- steps ----------------------------------------------------------------------------------


class Step:
    """One instruction of a program: `expect` asks the oracle, `run` does it for real."""

    def expect(self, model: Model) -> Expect:
        return Expect()

    def run(self, env: Env, want: Expect) -> Any:
        raise NotImplementedError

    def label(self) -> str:
        fields = {k: v for k, v in vars(self).items() if k != "body"}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


@dataclass(frozen=True)
class WhoAmI(Step):
    """prop_session through db: the clinic and actor the call ran as."""

    def expect(self, model: Model) -> Expect:
        ctx = model.ctx
        return Expect(refusals(ctx), session_check(model, ctx, "a call"))

    def run(self, env: Env, want: Expect) -> Any:
        return Items(env.db).session()


@dataclass(frozen=True)
class Read(Step):
    """One item through db: plain (maybe a replica), tagged cache or untagged cache."""

    item: int
    via: str

    def expect(self, model: Model) -> Expect:
        ctx, required = model.ctx, model.required()
        item = resolve(self.item, ctx)
        return Expect(refusals(ctx), lambda row: check_item(model, ctx, item, row, required),
                      args={"item": item})

    def run(self, env: Env, want: Expect) -> Any:
        return getattr(Items(env.db), self.via)(id=env.names.items[want.args["item"]])


@dataclass(frozen=True)
class ReadBack(Read):
    """The interpreter's own read, as a block that committed ends, of what it wrote."""


def read_backs(frame: Frame) -> list[Step]:
    clinic = frame.ctx.clinic
    return [ReadBack((item - 2 * clinic) % ITEMS, via)
            for item in sorted(frame.seen) if clinic is not None and owner(item) == clinic
            for via in ("get", "tagged", "untagged")]


@dataclass(frozen=True)
class ReadAll(Step):
    """The batch through db, as a list or a server-side cursor stream."""

    stream: bool

    def expect(self, model: Model) -> Expect:
        ctx, required = model.ctx, model.required()
        return Expect(refusals(ctx), lambda rows: check_rows(model, ctx, rows, required))

    def run(self, env: Env, want: Expect) -> Any:
        items = Items(env.db)
        return list(items.stream(batch=env.batch) if self.stream else items.rows(batch=env.batch))


def write_expect(model: Model, ctx: Ctx, item: int, refused: tuple[type[BaseException], ...],
                 commit: Callable[[dict[int, int]], None]) -> Expect:
    value = model.allocate()
    own = owner(item) == ctx.clinic
    return Expect(refused, rowcount_check(own),
                  lambda _: commit({item: value} if own else {}),
                  {"item": item, "value": value})


@dataclass(frozen=True)
class Write(Step):
    """prop_set_value through db: refused while this thread has a unit of work open, unless
    inside `db.autonomous()`, where it commits on its own."""

    item: int
    autonomous: bool

    def expect(self, model: Model) -> Expect:
        ctx = model.ctx
        unit_open = model.unit is not None and not self.autonomous
        item = model.free_item(resolve(self.item, ctx))
        return write_expect(model, ctx, item, refusals(ctx, write=True, unit_open=unit_open),
                            model.commit)

    def run(self, env: Env, want: Expect) -> Any:
        with env.db.autonomous() if self.autonomous else contextlib.nullcontext():
            return env.set_value(Items(env.db), want)


def unit_write_expect(model: Model, item: int, **args: Any) -> Expect:
    unit = model.unit
    assert unit is not None

    def pend(values: dict[int, int]) -> None:
        unit.begun = True
        for written, value in values.items():
            unit.pending[written] = (value, model.unit_view(written)[1] + 1)

    want = write_expect(model, unit.ctx, item, refusals(unit.ctx, write=True), pend)
    want.args.update(args)
    return want


@dataclass(frozen=True)
class Transaction(Step):
    """`db.transaction(fn, retries=…)`: fn writes, then fails `failures` times (40001, 40P01).
    Inside a unit of work it joins it if its context is the unit's, else InvalidContext."""

    item: int
    retries: int
    failures: int
    clinic: int | None  # explicit clinic_id/actor_id, or the ambient context

    def expect(self, model: Model) -> Expect:
        ctx = model.ctx if self.clinic is None else Ctx(self.clinic, self.clinic)
        if model.unit is not None:
            if ctx != model.unit.ctx:
                return Expect((InvalidContext,), args={"item": 0, "value": 0, "failures": 0})
            return unit_write_expect(model, resolve(self.item, ctx), failures=0)
        want = write_expect(model, ctx, resolve(self.item, ctx), refusals(ctx, write=True),
                            model.commit)
        want.args["failures"] = self.failures
        if not want.raises and self.failures > self.retries:
            want.raises = (SerializationFailure,)
        return want

    def run(self, env: Env, want: Expect) -> Any:
        failures = want.args["failures"]
        token = env.reserve_token() if failures else 0

        def work(uow: UnitOfWork) -> int:
            items = Items(uow)
            count = env.set_value(items, want)
            items.fail_first(token=token, times=failures)
            return count

        return env.db.transaction(work, retries=self.retries, **env.explicit(self.clinic))


class _Enough(Exception):
    """Stops for_each_clinic after a few clinics (the database holds other tests' too)."""


@dataclass(frozen=True)
class ForEachClinic(Step):
    """`db.for_each_clinic(lambda c: db.transaction(...))`: each call runs as clinic c;
    inside a unit of work, InvalidContext."""

    def expect(self, model: Model) -> Expect:
        if model.unit is not None:
            return Expect((InvalidContext,))
        names, actor = model.names, model.ctx.actor

        def check(seen: list[tuple[UUID, SessionRow]]) -> None:
            for clinic_id, got in seen:
                wanted = (str(clinic_id), str(names.actor(actor) or ""))
                if (got.clinic, got.actor or "") != wanted:
                    raise Violation("context", "for_each_clinic ran a call as "
                                               f"{names.describe(got.clinic, got.actor)}")

        # Each call commits a transaction inside this block.
        return Expect(check=check, effect=lambda _: model.commit({}))

    def run(self, env: Env, want: Expect) -> Any:
        seen: list[tuple[UUID, SessionRow]] = []

        def visit(clinic_id: UUID) -> None:
            seen.append((clinic_id, env.db.transaction(lambda uow: Items(uow).session())))
            if len(seen) == CLINICS:
                raise _Enough

        try:
            with contextlib.suppress(_Enough):
                env.db.for_each_clinic(visit)
        except InvalidContext:
            # Inside a unit the first clinic visited may be the unit's own, whose transaction
            # joins (and so runs a statement in the unit) before the next one is refused;
            # which clinic comes first depends on the whole directory, so it is read here.
            if seen and env.model.unit is not None:
                env.model.unit.begin()
            raise
        return seen


@dataclass(frozen=True)
class TakeToken(Step):
    """`db.last_write_token()`: a token after a commit in this block, None in a fresh one."""

    record: ClassVar[bool] = True  # keep it for ReadAfter and HandoffTask

    def expect(self, model: Model) -> Expect:
        frames = [frame for frame in model.frames if frame.positions]
        committed = any(frame.commits for frame in frames)
        fresh = bool(frames) and not committed and not model.outside_commits and not any(
            frame.awaits for frame in model.frames)
        ctx, required = model.ctx, model.required()

        def check(token: str | None) -> None:
            if committed and token is None:
                raise Violation("token", "last_write_token() is None after a commit in "
                                         "this block")
            if fresh and token is not None:
                raise Violation("token", "a fresh block inherited a write position: "
                                         "last_write_token() is not None")

        def effect(token: str | None) -> None:
            if self.record:
                model.tokens.append(TokenModel(ctx, required, token is not None))

        return Expect(check=check, effect=effect)

    def run(self, env: Env, want: Expect) -> Any:
        token = env.db.last_write_token()
        if self.record:
            env.tokens.append(token)
        return token


@dataclass(frozen=True)
class CheckToken(TakeToken):
    """The interpreter's own TakeToken as a block starts and ends (the token not kept)."""

    record: ClassVar[bool] = False


def clinic_generator(db: Database, clinic_id: UUID, actor_id: UUID
                     ) -> Generator[SessionRow, None, None]:
    with db.context(clinic_id=clinic_id, actor_id=actor_id):
        while True:
            yield Items(db).session()


@dataclass(frozen=True)
class GenStart(Step):
    """A generator entering clinic k and yielding: its own calls run as k, its consumer's
    do not."""

    clinic: int

    def expect(self, model: Model) -> Expect:
        k = self.clinic
        return Expect(check=session_check(model, Ctx(k, k), "a generator's own block"),
                      effect=lambda _: model.generators.append(k))

    def run(self, env: Env, want: Expect) -> Any:
        names = env.names
        generator = clinic_generator(env.db, names.clinics[self.clinic], names.actors[self.clinic])
        session = next(generator)
        env.generators.append(generator)
        return session


@dataclass(frozen=True)
class GenNext(Step):
    which: int

    def expect(self, model: Model) -> Expect:
        if not model.generators:
            return Expect()
        k = model.generators[self.which % len(model.generators)]
        return Expect(check=session_check(model, Ctx(k, k), "a resumed generator's block"))

    def run(self, env: Env, want: Expect) -> Any:
        if not env.generators:
            return None
        return next(env.generators[self.which % len(env.generators)])


@dataclass(frozen=True)
class GenClose(Step):
    which: int

    def expect(self, model: Model) -> Expect:
        if not model.generators:
            return Expect()
        return Expect(effect=lambda _: model.generators.pop(self.which % len(model.generators)))

    def run(self, env: Env, want: Expect) -> Any:
        if env.generators:
            env.generators.pop(self.which % len(env.generators)).close()


@dataclass(frozen=True)
class Leak(Step):
    """Enters a `db.context` block without `with` and returns: it must not outlive the step."""

    clinic: int

    def run(self, env: Env, want: Expect) -> Any:
        manager = env.db.context(**env.explicit(self.clinic))
        manager.__enter__()
        env.leaks.append(manager)


# --- thread-pool tasks ----------------------------------------------------------------------


class Task:
    """Work for the program's one pool thread, run as `binding` says (UNBOUND: nothing)."""

    def expect(self, model: Model, binding: Binding) -> Expect:
        return Expect()

    def perform(self, env: Env, args: dict[str, Any]) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class SessionTask(Task):
    def expect(self, model: Model, binding: Binding) -> Expect:
        return Expect(refusals(binding.ctx), session_check(model, binding.ctx, "a pool task"))

    def perform(self, env: Env, args: dict[str, Any]) -> Any:
        return Items(env.db).session()


@dataclass(frozen=True)
class ReadTask(Task):
    item: int

    def expect(self, model: Model, binding: Binding) -> Expect:
        ctx = binding.ctx
        item = resolve(self.item, ctx)
        return Expect(refusals(ctx),
                      lambda row: check_item(model, ctx, item, row, binding.required),
                      args={"item": item})

    def perform(self, env: Env, args: dict[str, Any]) -> Any:
        return Items(env.db).get(id=env.names.items[args["item"]])


@dataclass(frozen=True)
class WriteTask(Task):
    """A write on the pool thread: its commit belongs to the blocks it was bound in."""

    item: int

    def expect(self, model: Model, binding: Binding) -> Expect:
        return write_expect(model, binding.ctx, model.free_item(resolve(self.item, binding.ctx)),
                            refusals(binding.ctx, write=True,
                                     unit_open=binding.unit_open(model)),
                            lambda values: model.commit(values, binding.frames))

    def perform(self, env: Env, args: dict[str, Any]) -> Any:
        return env.set_value(Items(env.db), Expect(args=args))


@dataclass(frozen=True)
class BlockTask(Task):
    """The pool thread opens its own block: no inherited write position (when unbound),
    its write is read back."""

    item: int

    def expect(self, model: Model, binding: Binding) -> Expect:
        item = model.free_item(self.item)
        k, value = owner(item), model.allocate()
        if binding.unit_open(model):  # its own block is still inside the unit's
            return Expect(raises=(WriteOutsideUnitOfWork,), args={"item": item, "value": value})

        def check(got: tuple[str | None, int, ItemRow | None]) -> None:
            token, count, row = got
            if binding is UNBOUND and token is not None:
                raise Violation("token", "a fresh block on a pool thread inherited a write "
                                         "position")
            rowcount_check(True)(count)
            check_item(model, Ctx(k, k), item, row, {}, (value, model.committed[item][1] + 1))

        return Expect(check=check, effect=lambda _: model.commit({item: value}, binding.frames),
                      args={"item": item, "value": value})

    def perform(self, env: Env, args: dict[str, Any]) -> Any:
        k = owner(args["item"])
        with env.db.context(**env.explicit(k)):
            token = env.db.last_write_token()
            items = Items(env.db)
            return token, env.set_value(items, Expect(args=args)), items.get(
                id=env.names.items[args["item"]])


@dataclass(frozen=True)
class LeakContextTask(Task):
    """Enters a block and returns without leaving it (the manager kept alive)."""

    clinic: int

    def perform(self, env: Env, args: dict[str, Any]) -> Any:
        manager = env.db.context(**env.explicit(self.clinic))
        manager.__enter__()
        env.pool_leaks.append(manager)


@dataclass(frozen=True)
class LeakGeneratorTask(Task):
    """Starts a clinic generator and returns with it suspended inside its block."""

    clinic: int

    def expect(self, model: Model, binding: Binding) -> Expect:
        k = self.clinic
        return Expect(check=session_check(model, Ctx(k, k), "a generator on a pool thread"))

    def perform(self, env: Env, args: dict[str, Any]) -> Any:
        names = env.names
        generator = clinic_generator(env.db, names.clinics[self.clinic], names.actors[self.clinic])
        env.pool_leaks.append(generator)
        return next(generator)


@dataclass(frozen=True)
class HandoffTask(Task):
    """A token handed to the pool thread: its own block in the token's context, reading
    inside `db.read_after(token)`, sees what the token's block had to see."""

    def expect(self, model: Model, binding: Binding) -> Expect:
        usable = [i for i, t in enumerate(model.tokens) if t.given and t.ctx.clinic is not None]
        if not usable:
            return Expect(args={"token": None})
        token = model.tokens[usable[-1]]
        return Expect(check=lambda rows: check_rows(model, token.ctx, rows, token.required),
                      args={"token": usable[-1], "ctx": token.ctx})

    def perform(self, env: Env, args: dict[str, Any]) -> Any:
        if args["token"] is None:
            return None
        ctx: Ctx = args["ctx"]
        given = {"clinic_id": env.names.clinic(ctx.clinic), "actor_id": env.names.actor(ctx.actor)}
        with env.db.context(**given), env.db.read_after(env.tokens[args["token"]]):
            return list(Items(env.db).rows(batch=env.batch))


@dataclass(frozen=True)
class Submit(Step):
    """Submit a task now and wait for it, bound to this context or not."""

    task: Task
    bound: bool

    def expect(self, model: Model) -> Expect:
        return self.task.expect(model, model.binding() if self.bound else UNBOUND)

    def run(self, env: Env, want: Expect) -> Any:
        work = bind_context(perform) if self.bound else perform
        return env.submit(work, self.task, want.args)


@dataclass(frozen=True)
class Bind(Step):
    """`bind_context` now; `SubmitBound` submits it later, wherever the program is then."""

    task: Task

    def expect(self, model: Model) -> Expect:
        binding = model.binding()
        return Expect(effect=lambda _: model.bindings.append((binding, self.task)))

    def run(self, env: Env, want: Expect) -> Any:
        env.bound.append(bind_context(perform))


@dataclass(frozen=True)
class SubmitBound(Step):
    which: int

    def expect(self, model: Model) -> Expect:
        if not model.bindings:
            return Expect(args={"index": None})
        index = self.which % len(model.bindings)
        binding, task = model.bindings[index]
        want = task.expect(model, binding)
        want.args.update(index=index, task=task)
        return want

    def run(self, env: Env, want: Expect) -> Any:
        index = want.args["index"]
        if index is None:
            return None
        return env.submit(env.bound[index], want.args["task"], want.args)


def perform(env: Env, task: Task, args: dict[str, Any]) -> Any:
    return task.perform(env, args)


# --- units of work --------------------------------------------------------------------------


def unit_of(model: Model) -> UnitModel:
    assert model.unit is not None, "unit steps are generated inside units only"
    return model.unit


@dataclass(frozen=True)
class UnitWrite(Step):
    item: int

    def expect(self, model: Model) -> Expect:
        return unit_write_expect(model, resolve(self.item, unit_of(model).ctx))

    def run(self, env: Env, want: Expect) -> Any:
        return env.set_value(Items(env.unit()), want)


@dataclass(frozen=True)
class UnitRead(Step):
    """An item through the unit of work (plain or a cached method): as the unit's context,
    with its pending writes, whatever block the program is in."""

    item: int
    via: str

    def expect(self, model: Model) -> Expect:
        unit = unit_of(model)
        ctx, item = unit.ctx, resolve(self.item, unit.ctx)
        return Expect(refusals(ctx), lambda row: check_item(model, ctx, item, row, {},
                                                            model.unit_view(item)),
                      unit.begin, {"item": item})

    def run(self, env: Env, want: Expect) -> Any:
        return getattr(Items(env.unit()), self.via)(id=env.names.items[want.args["item"]])


@dataclass(frozen=True)
class UnitReadAll(Step):
    """The batch (list or stream) or the session through the unit of work."""

    what: str  # "rows", "stream" or "session"

    def expect(self, model: Model) -> Expect:
        unit = unit_of(model)
        ctx = unit.ctx
        if self.what == "session":
            return Expect(refusals(ctx), session_check(model, ctx, "a unit of work's call"),
                          unit.begin)
        return Expect(refusals(ctx),
                      lambda rows: check_rows(model, ctx, rows, {}, model.unit_view), unit.begin)

    def run(self, env: Env, want: Expect) -> Any:
        items = Items(env.unit())
        if self.what == "session":
            return items.session()
        return list(items.stream(batch=env.batch) if self.what == "stream"
                    else items.rows(batch=env.batch))


class _Rollback(Exception):
    """Raised at the end of a unit's (or savepoint's) body to roll it back."""


@dataclass(frozen=True)
class Savepoint(Step):
    """`with uow.savepoint():` around a body; rolled back to when `rollback`."""

    rollback: bool
    body: tuple[Step, ...]

    def run(self, env: Env, want: Expect) -> Any:
        unit = unit_of(env.model)
        saved = dict(unit.pending)
        unit.begin()
        try:
            with env.unit().savepoint():
                env.execute_all(self.body)
                if self.rollback:
                    raise _Rollback
        except _Rollback:
            unit.pending = saved


@dataclass(frozen=True)
class Unit(Step):
    """`with db.unit_of_work() as uow:` (explicit clinic or the ambient context) around a
    body, in which the unit's context is ambient; commits, or rolls back when `rollback`."""

    clinic: int | None
    rollback: bool
    body: tuple[Step, ...]

    def expect(self, model: Model) -> Expect:
        ctx = model.ctx if self.clinic is None else Ctx(self.clinic, self.clinic)
        return Expect(args={"unit": UnitModel(ctx)})

    def run(self, env: Env, want: Expect) -> Any:
        unit, model = want.args["unit"], env.model
        try:
            with env.db.unit_of_work(**env.explicit(self.clinic)) as uow:
                env.uow, model.unit = uow, unit
                try:
                    env.in_frame(Frame(unit.ctx, positions=False), self.body)
                finally:
                    env.uow, model.unit = None, None
                if self.rollback:
                    raise _Rollback
        except _Rollback:
            return None
        if unit.begun:
            model.commit_states(unit.pending)
        return None


# --- blocks ---------------------------------------------------------------------------------


@contextlib.contextmanager
def acting_as(db: Database, clinic_id: UUID, actor_id: UUID) -> Iterator[None]:
    """An application's helper around db.context: its with-body runs in the context."""
    with db.context(clinic_id=clinic_id, actor_id=actor_id):
        yield


@dataclass(frozen=True)
class Block(Step):
    """`with db.context(...)`: fields given replace, KEEP inherits from the enclosing block."""

    clinic: int | str | None
    actor: int | str | None
    body: tuple[Step, ...]

    def expect(self, model: Model) -> Expect:
        outer = model.ctx
        ctx = Ctx(outer.clinic if self.clinic == KEEP else self.clinic,
                  outer.actor if self.actor == KEEP else self.actor)
        return Expect(args={"frame": Frame(ctx)})

    def run(self, env: Env, want: Expect) -> Any:
        given: dict[str, UUID | None] = {}
        if self.clinic != KEEP:
            given["clinic_id"] = env.names.clinic(self.clinic)
        if self.actor != KEEP:
            given["actor_id"] = env.names.actor(self.actor)
        with env.db.context(**given):
            env.in_frame(want.args["frame"], self.body)


@dataclass(frozen=True)
class Helper(Step):
    """A @contextmanager helper wrapping db.context for clinic k."""

    clinic: int
    body: tuple[Step, ...]

    def expect(self, model: Model) -> Expect:
        return Expect(args={"frame": Frame(Ctx(self.clinic, self.clinic))})

    def run(self, env: Env, want: Expect) -> Any:
        names = env.names
        with acting_as(env.db, names.clinics[self.clinic], names.actors[self.clinic]):
            env.in_frame(want.args["frame"], self.body)


@dataclass(frozen=True)
class ReadAfter(Step):
    """`with db.read_after(token):` a token taken earlier in the program (None if none)."""

    which: int
    body: tuple[Step, ...]

    def expect(self, model: Model) -> Expect:
        if not model.tokens:
            return Expect(args={"frame": Frame(model.ctx, positions=False), "token": None})
        index = self.which % len(model.tokens)
        token = model.tokens[index]
        frame = Frame(model.ctx, seen=dict(token.required), awaits=token.given,
                      positions=False)
        return Expect(args={"frame": frame, "token": index})

    def run(self, env: Env, want: Expect) -> Any:
        index = want.args["token"]
        with env.db.read_after(None if index is None else env.tokens[index]):
            env.in_frame(want.args["frame"], self.body)


# --- the interpreter ------------------------------------------------------------------------


@dataclass
class Env:
    """One program's runtime: the Database, its rows, open generators, tokens, the pool."""

    world: World
    batch: int
    model: Model
    uow: UnitOfWork | None = None
    generators: list[Generator[SessionRow, None, None]] = field(default_factory=list)
    tokens: list[str | None] = field(default_factory=list)
    bound: list[Callable[..., Any]] = field(default_factory=list)
    leaks: list[Any] = field(default_factory=list)  # left by Leak steps
    pool_leaks: list[Any] = field(default_factory=list)  # left by tasks on the pool thread
    reserved: list[int] = field(default_factory=list)
    pool: ThreadPoolExecutor | None = None

    @property
    def db(self) -> Database:
        return self.world.db

    @property
    def names(self) -> Names:
        return self.model.names

    def unit(self) -> UnitOfWork:
        assert self.uow is not None
        return self.uow

    def explicit(self, clinic: int | None) -> dict[str, Any]:
        """clinic_id/actor_id of clinic k, or nothing (the ambient context)."""
        if clinic is None:
            return {}
        return {"clinic_id": self.names.clinics[clinic], "actor_id": self.names.actors[clinic]}

    def set_value(self, items: Items, want: Expect) -> int:
        return items.set_value(id=self.names.items[want.args["item"]], value=want.args["value"])

    def reserve_token(self) -> int:
        self.reserved.append(self.world.reserve_token())
        return self.reserved[-1]

    def submit(self, work: Callable[..., Any], task: Task, args: dict[str, Any]) -> Any:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prop-pool")
        return self.pool.submit(work, self, task, args).result(timeout=30)

    def in_frame(self, frame: Frame, body: tuple[Step, ...]) -> None:
        """A block's body with its frame pushed; as it starts and ends, the interpreter checks
        the block's write position itself (its token, reads of what it committed)."""
        self.model.frames.append(frame)
        try:
            self.execute(CheckToken())
            self.execute_all(body)
            self.execute_all(read_backs(frame))
            self.execute(CheckToken())
        finally:
            self.model.frames.pop()

    def execute_all(self, steps: tuple[Step, ...] | list[Step]) -> None:
        for step in steps:
            self.execute(step)

    def execute(self, step: Step) -> None:
        want = step.expect(self.model)
        try:
            got = step.run(self, want)
        except Violation:
            raise
        except Exception as exc:
            self.check_error(step, exc)
            if isinstance(exc, want.raises):
                return
            raise Violation("outcome", f"{step.label()} raised {type(exc).__name__}: {exc}; "
                                       f"expected {_outcome(want)}") from exc
        if want.raises:
            raise Violation(_property_of(want.raises),
                            f"{step.label()} returned {_short(got)}; expected {_outcome(want)}")
        try:
            want.check(got)
        except Violation as violation:
            raise Violation(violation.prop, f"{step.label()}: {violation.message}") from None
        want.effect(got)

    def check_error(self, step: Step, exc: Exception) -> None:
        """No exception reachable from an hcrepo error may show a parameter value."""
        if not isinstance(exc, HcrepoError):
            return
        secrets = {str(item_id): "an item id" for item_id in self.names.items}
        secrets.update((str(v), "a written value")
                       for v in range(VALUE_BASE + 1, self.model.last_value + 1))
        secrets.update((str(token), "a token parameter") for token in self.reserved)
        for link in exception_chain(exc):
            for text in (str(link), repr(link)):
                for secret, what in secrets.items():
                    if secret in text:
                        raise Violation("value in error", f"{step.label()} raised "
                                        f"{type(exc).__name__}; {type(link).__name__} in its "
                                        f"chain shows {what}")

    def finish(self) -> None:
        """The program's end: generators closed, no context left on either thread."""
        while self.model.generators:
            self.execute(GenClose(which=-1))
        self.execute(WhoAmI())
        if self.pool is not None:
            self.execute(Submit(SessionTask(), bound=False))

    def close(self) -> None:
        _release([*self.generators, *self.leaks])
        if self.pool is not None:
            self.pool.submit(_release, self.pool_leaks).result(timeout=30)
            self.pool.shutdown(wait=True)

    def check_database(self) -> None:
        rows = self.world.superuser.execute(
            f"SELECT slot, clinic_id, value, writes FROM {SCHEMA}.items WHERE batch = %s",
            [self.batch],
        ).fetchall()
        for slot, clinic_id, value, writes in rows:
            wanted = self.model.committed[slot]
            if clinic_id != self.names.clinics[owner(slot)]:
                raise Violation("wrong-clinic row", f"item {slot} moved to another clinic")
            if (value, writes) != wanted:
                prop = "duplicate write" if writes > wanted[1] else "lost write"
                raise Violation(prop, f"item {slot} ended at {shown(value)} after {writes} "
                                      f"writes, expected {shown(wanted[0])} after {wanted[1]}")


def _release(leaks: list[Any]) -> None:
    """Leave the blocks of leaked managers and generators, newest first, on the thread that
    entered them (whatever fails: a bound task's belong to its captured scope)."""
    for leaked in reversed(leaks):
        with contextlib.suppress(Exception):
            if isinstance(leaked, Generator):
                leaked.close()
            else:
                leaked.__exit__(None, None, None)


def _short(result: Any) -> str:
    text = repr(result)
    return text if len(text) < 160 else text[:150] + "…"


def _outcome(want: Expect) -> str:
    if not want.raises:
        return "no error"
    return " or ".join(error.__name__ for error in want.raises)


def _property_of(raises: tuple[type[BaseException], ...]) -> str:
    if raises[0] in (WriteOutsideUnitOfWork, InvalidContext):
        return "unit of work"
    if raises[0] is SerializationFailure:
        return "retries"
    return "context"


def run_program(world: World, program: list[Step]) -> None:
    batch, item_ids = world.batches.take()
    names = Names(tuple(c.id for c in world.clinics), tuple(c.actor_id for c in world.clinics),
                  item_ids)
    env = Env(world, batch, Model(names))
    try:
        env.execute_all(program)
        env.finish()
    finally:
        env.close()
    env.check_database()
    world.programs += 1


# --- programs -------------------------------------------------------------------------------

clinic_ix = st.integers(0, CLINICS - 1)
item_ix = st.integers(0, ITEMS - 1)
# Families of tasks and steps are drawn equally often, whatever their size, so that the few
# kinds of unit-of-work steps are not drowned by the many others.
TASKS: dict[str, dict[str, st.SearchStrategy[Task]]] = {
    "context": {
        "session": st.builds(SessionTask),
        "leak_context": st.builds(LeakContextTask, clinic_ix),
        "leak_generator": st.builds(LeakGeneratorTask, clinic_ix),
    },
    "data": {
        "read": st.builds(ReadTask, item_ix),
        "write": st.builds(WriteTask, item_ix),
        "block": st.builds(BlockTask, item_ix),
        "handoff": st.builds(HandoffTask),
    },
}
LEAVES: dict[str, dict[str, st.SearchStrategy[Step]]] = {
    "calls": {
        "whoami": st.builds(WhoAmI),
        "read": st.builds(Read, item_ix, st.sampled_from(["get", "tagged", "untagged"])),
        "read_all": st.builds(ReadAll, st.booleans()),
        "write": st.builds(Write, item_ix, st.just(False)),
        "token": st.builds(TakeToken),
    },
    "transactions": {
        "autonomous": st.builds(Write, item_ix, st.just(True)),
        "transaction": st.builds(Transaction, item_ix, st.integers(0, 2), st.integers(0, 2),
                                 st.none() | clinic_ix),
        "for_each_clinic": st.builds(ForEachClinic),
    },
    "generators": {
        "gen_start": st.builds(GenStart, clinic_ix),
        "gen_next": st.builds(GenNext, st.integers(0, 3)),
        "gen_close": st.builds(GenClose, st.integers(0, 3)),
        "leak": st.builds(Leak, clinic_ix),
    },
    "pool": {
        "submit": st.builds(Submit, st.deferred(lambda: families(TASKS)), st.booleans()),
        "bind": st.builds(Bind, st.deferred(lambda: families(TASKS))),
        "submit_bound": st.builds(SubmitBound, st.integers(0, 3)),
    },
}
UNIT_LEAVES: dict[str, st.SearchStrategy[Step]] = {
    "unit_write": st.builds(UnitWrite, item_ix),
    "unit_read": st.builds(UnitRead, item_ix, st.sampled_from(["get", "tagged", "untagged"])),
    "unit_read_all": st.builds(UnitReadAll, st.sampled_from(["rows", "stream", "session"])),
}
# A block's fields: clinic k with its actor mostly, else one field, or an explicit None.
block_fields = st.one_of(
    clinic_ix.map(lambda k: (k, k)),
    clinic_ix.map(lambda k: (k, KEEP)),
    clinic_ix.map(lambda k: (KEEP, k)),
    clinic_ix.map(lambda k: (k, None)),
    st.just((None, KEEP)),
)


def group(*choices: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One branch of a one_of that counts once: hypothesis flattens nested one_of (and maps
    of them), which would weigh every kind the same, but not a flatmap."""
    return st.sampled_from(choices).flatmap(lambda chosen: chosen)


def families(table: dict[str, dict[str, st.SearchStrategy[Any]]]) -> st.SearchStrategy[Any]:
    """A family at random (plain calls twice as often: they are what the others disturb),
    then a kind in it."""
    return group(*(group(*family.values()) for name, family in table.items() if family
                   for _ in range(2 if name == "calls" else 1)))


def steps(depth: int, in_unit: bool) -> st.SearchStrategy[Step]:
    leaves = families(LEAVES)
    if in_unit:  # half of a unit's steps go through the unit
        leaves = st.one_of(group(leaves), group(*UNIT_LEAVES.values()))
    if depth == 0:
        return leaves
    body = st.lists(steps(depth - 1, in_unit), min_size=1, max_size=3).map(tuple)
    composites = [
        st.tuples(block_fields, body).map(lambda parts: Block(*parts[0], parts[1])),
        st.builds(Helper, clinic_ix, body),
        st.builds(ReadAfter, st.integers(0, 3), body),
    ]
    if in_unit:
        composites.append(st.builds(Savepoint, st.booleans(), body))
    else:
        unit_body = st.lists(steps(depth - 1, True), min_size=1, max_size=4).map(tuple)
        composites.append(st.builds(Unit, st.none() | clinic_ix, st.booleans(), unit_body))
    # A third of the steps open a block, a unit of work (or a savepoint in one), a read_after.
    return st.one_of(group(leaves), group(leaves), group(*composites))


def programs() -> st.SearchStrategy[list[Step]]:
    return st.lists(steps(2, in_unit=False), min_size=3, max_size=8)


def explore(world: World, examples: int, *, seeded: bool) -> None:
    """`examples` programs, in runs of CHUNK with seeds 0, 1, … (or random ones): hypothesis
    keeps every example of a run until it ends (some 30 kB each), and 2000 at once would
    leave ~60 MB of freed but fragmented heap behind for the tests measuring RSS later."""
    started, before = time.perf_counter(), world.programs
    for run, start in enumerate(range(0, examples, CHUNK)):
        explore_once(world, min(CHUNK, examples - start), run if seeded else None)
    elapsed = time.perf_counter() - started
    ran = world.programs - before
    print(f"{ran} programs in {elapsed:.1f} s ({1000 * elapsed / max(ran, 1):.1f} ms each)")
    assert ran >= examples


def explore_once(world: World, examples: int, run_seed: int | None) -> None:
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(program=programs())
    def check(program: list[Step]) -> None:
        # A fresh Context per program: nothing one leaves on the main thread reaches the next.
        contextvars.Context().run(run_program, world, program)

    (check if run_seed is None else seed(run_seed)(check))()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The normal run and the soak run (skipped unless HCREPO_SOAK is set; its value, if a
    number, is the number of programs)."""
    if "examples" not in metafunc.fixturenames:
        return
    # Registered here: a test module's own pytest_configure is never called, and the marker
    # must be known before it is looked up.
    metafunc.config.addinivalue_line("markers", "soak: long randomized runs, skipped unless "
                                                "HCREPO_SOAK is set")
    soak_env = os.environ.get("HCREPO_SOAK", "")
    soak = int(soak_env) if soak_env.isdigit() else SOAK_EXAMPLES
    metafunc.parametrize("examples", [
        pytest.param(NORMAL_EXAMPLES, id="normal"),
        pytest.param(soak, id="soak", marks=[
            pytest.mark.soak,
            pytest.mark.skipif(not soak_env, reason="soak run: set HCREPO_SOAK"),
            pytest.mark.timeout(120 + soak // 10),
        ]),
    ])


def test_random_programs_keep_clinics_writes_and_errors_apart(world: World, examples: int
                                                              ) -> None:
    explore(world, examples, seeded=examples == NORMAL_EXAMPLES)
