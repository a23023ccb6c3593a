"""The facade: pools, ambient context, units of work, retried transactions.

A plain read through `Database` costs one round trip: on an autocommit connection the
transaction-local `set_config` of clinic and actor and the statement are pipelined before one
Sync, so both run in one implicit transaction and nothing survives it on the pooled connection.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

import tenacity
from prometheus_client import generate_latest

from hcrepo import tenancy
from hcrepo.cache import Cache
from hcrepo.compliance.access_log import AccessLog
from hcrepo.compliance.sealer import Sealer
from hcrepo.config import Settings
from hcrepo.crypto.keyring import Keyring
from hcrepo.crypto.keys import MasterKeys
from hcrepo.driver_errors import RETRYABLE_SQLSTATES
from hcrepo.errors import (
    ConnectionLost,
    DatabaseError,
    HcrepoError,
    WriteOutsideUnitOfWork,
    detached,
)
from hcrepo.execution import (
    commit_outcome_unknown,
    context_statement,
    end_failed_transaction,
    ensure_open,
    fetch_lsn,
    run_or_translate,
    stream_rows,
)
from hcrepo.key_store import PrimaryKeyStore
from hcrepo.observer import Observer
from hcrepo.ops import metrics
from hcrepo.phi.logs import logger
from hcrepo.pipeline import PRIMARY, HcConnection, Statement
from hcrepo.routing import consistency
from hcrepo.routing.router import Router
from hcrepo.tenancy import Context, EmergencyAccess
from hcrepo.unit_of_work import UnitOfWork, begin_statement

if TYPE_CHECKING:
    from hcrepo.plan import Plan

R = TypeVar("R")

_LIST_CLINICS = "/* hcrepo:for_each_clinic */ SELECT id FROM clinics ORDER BY id"
_RECORD_EMERGENCY = "SELECT audit.record_emergency_access($1)::text"
_ROLE_IN_FORCE = "SELECT hcrepo_staff_role()"
_BEGIN = Statement("BEGIN")
_COMMIT = Statement("COMMIT")
# Sent before a cache fill's query: the WAL position its snapshot is known to reflect.
POSITION_SQL = (
    "SELECT pg_is_in_recovery(), (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_insert_lsn() END)::text"
)


class Database:
    """`Database.from_env()` or `Database(Settings(...))`; use as a context manager.

    `on_emergency_access` is called with an `EmergencyAccess` each time a break-glass has been
    recorded, before its block runs (a page to the privacy officer, say); an exception it
    raises refuses the block, though the use stays recorded. `master_keys` replaces the
    master keys of the settings (`HCREPO_MASTER_KEY`): a KMS client implementing
    `hcrepo.MasterKeys`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        on_emergency_access: Callable[[EmergencyAccess], None] | None = None,
        master_keys: MasterKeys | None = None,
    ) -> None:
        self.settings = settings
        self._on_emergency_access = on_emergency_access
        self._router = Router(settings)
        self._cache: Cache | None = Cache.from_settings(settings)
        self._access = AccessLog.from_settings(settings)
        self.observer = Observer(settings.slow_query_threshold_ms)
        self.keyring = Keyring(
            master_keys or settings.master_keys(), PrimaryKeyStore(lambda: self._router.primary),
            settings.blind_index(),
        )
        self._sealer: Sealer | None = None

    @classmethod
    def from_env(
        cls,
        *,
        on_emergency_access: Callable[[EmergencyAccess], None] | None = None,
        master_keys: MasterKeys | None = None,
        **overrides: Any,
    ) -> Database:
        return cls(Settings.load(**overrides), on_emergency_access=on_emergency_access,
                   master_keys=master_keys)

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Database:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Log in to every node, fill the primary's pool, verify every node's role, start
        the health monitor (`Router.open`): a wrong DATABASE_URL, or a role that would
        bypass row-level security, raises `ConfigError` naming the setting within
        DB_CONNECT_TIMEOUT. With AUDIT_SEALER on, starts the audit sealer thread too."""
        try:
            self._router.open()
        except HcrepoError as error:
            failure = error
        else:
            if self._access is not None:
                self._access.open()
            if self.settings.audit_sealer and self._sealer is None:
                self._sealer = Sealer(self.settings.database_url,
                                      self.settings.audit_seal_interval,
                                      connect_timeout=self.settings.db_connect_timeout)
                self._sealer.start()
            return
        raise detached(failure)  # a public boundary: hcrepo's frames hold the URLs

    def close(self) -> None:
        """Seal this process's audit rows, write the PHI access log's rows (spilled if the
        primary cannot take them), then close pools and the cache."""
        sealer, self._sealer = self._sealer, None
        if sealer is not None:
            sealer.stop()  # after one last seal: this process's writes leave chained
        if self._access is not None:
            self._access.close()
        self._router.close()
        if self._cache is not None:
            self._cache.close()

    # -- context ----------------------------------------------------------------------------

    def context(
        self,
        *,
        clinic_id: UUID | str | None = tenancy.UNSET,
        actor_id: UUID | str | None = tenancy.UNSET,
        role: str | None = tenancy.UNSET,
        emergency_reason: str = tenancy.UNSET,
    ) -> tenancy.ContextBlock:
        """Make clinic, actor and staff role ambient for the code the block runs, on this
        thread (nests; another thread gets it through `bind_context`). The block also holds
        the read-your-writes position of the commits made in it.

        `role` is one of doctor, nurse, admin, receptionist (None: the actor's membership
        role in the clinic); PostgreSQL refuses a role the actor does not hold there.
        `emergency_reason` breaks the glass: entering the block records the use
        (audit.emergency_access, on the primary) and calls the `on_emergency_access` hook;
        the database widens a clinician's reads only for a recorded use.
        """
        return tenancy.use(clinic_id, actor_id, role, emergency_reason, self._record_emergency)

    def _record_emergency(self, context: Context, positions: tenancy.Positions) -> UUID:
        """Record a break-glass in its own committed transaction (it must survive whatever
        the block does), its position in the block's, so replica reads wait for it."""
        assert context.emergency_reason is not None  # tenancy checked it
        statements = [_BEGIN, context_statement(context),
                      Statement(_RECORD_EMERGENCY, (context.emergency_reason,)),
                      Statement(_ROLE_IN_FORCE), _COMMIT, fetch_lsn()]
        with self._router.primary.connection() as conn:
            ensure_open(conn, before="record_emergency_access", query="record_emergency_access")
            try:
                results = run_or_translate(conn, statements, "record_emergency_access",
                                           "Database")
            except DatabaseError:
                end_failed_transaction(conn)
                raise
        access_id = UUID(results[2].get_value(0, 0).decode())
        role = results[3].get_value(0, 0).decode()  # a recorded use has a clinician's role
        lsn = results[5].get_value(0, 0)
        if lsn is not None:
            consistency.record(positions, self._router.cluster, lsn.decode())
        assert context.clinic_id is not None and context.actor_id is not None
        access = EmergencyAccess(access_id, context.clinic_id, context.actor_id, role,
                                 context.emergency_reason)
        if self._on_emergency_access is None:
            logger.warning("emergency access recorded in audit.emergency_access; no "
                           "on_emergency_access hook is set to raise an alert")
        else:
            self._on_emergency_access(access)
        return access_id

    def autonomous(self) -> tenancy.Block:
        """A block whose writes through `db` commit on their own even while a unit of work is
        open around it (an audit note that must survive the unit's rollback, say). Elsewhere
        such a write is refused: a retry of the unit would commit it again."""
        return tenancy.Block(lambda outer: replace(outer, unit=None))

    @property
    def fixed_context(self) -> None:
        """Each call takes the ambient context (or a repository's explicit one)."""
        return None

    def last_write_token(self) -> str | None:
        """Read-your-writes token of the commits made in the caller's `db.context` block
        (None: nothing to wait for), with or without replicas in this process.

        Hand it to another thread, a queued job or the next request, which reads inside
        `db.read_after(token)` and sees those commits.
        """
        return consistency.token(tenancy.scope(), self._router.cluster)

    def read_after(self, token: str | None) -> tenancy.Block:
        """Reads in the block see at least the commit `token` names; None is a no-op.

        A malformed token raises `InvalidToken`.
        """
        return consistency.awaiting(self._router.cluster, token)

    def metrics(self) -> str:
        """Every hcrepo metric in Prometheus' text format (query latency and errors, cache,
        routing); labels are query names and fixed words, never values."""
        return generate_latest(metrics.REGISTRY).decode()

    def health(self) -> dict[str, Any]:
        """Routing state: each node's role check, breaker, lag, latency and pool; the
        counters of failovers, primary fallbacks and degraded episodes. No PHI."""
        return self._router.stats()

    # -- running repository plans ----------------------------------------------------------

    def run(self, plan: Plan, args: tuple[Any, ...], sql: str) -> Any:
        scope = tenancy.scope()
        context = scope.context
        plan.check_context(context)
        if plan.is_write:
            if scope.open_unit() is not None:
                raise WriteOutsideUnitOfWork(
                    f"{plan.method} writes through db while a unit of work is open, so it "
                    "would commit on its own (and again on every retry of the unit): give "
                    "the repository the unit, or write inside db.autonomous()"
                )
            value, served_by = self._write(plan, args, sql, context, scope.writes), PRIMARY
        elif plan.shape.streams:
            value, served_by = self._stream(plan, args, sql, context, self._replay_needed(scope))
        elif plan.cache is not None and self._cache is not None:
            need = self._replay_needed(scope)
            value, served_by = self._cache.fetch(
                plan, args, sql, context, scope.required(self._router.cluster),
                lambda: self._read_positioned(plan, args, sql, context, need),
            )
        else:
            value, served_by = self._read(plan, args, sql, context, self._replay_needed(scope))
        patients, access = plan.patients, self._access
        if patients is not None and access is not None:
            # Recorded with the context and node of this call (compliance.access_log).
            return access.seen(patients, context, args, value, served_by)
        return value

    def _replay_needed(self, scope: tenancy.Scope) -> int:
        if not self._router.replicas:
            return 0  # the primary has everything: no position to work out
        return consistency.replay_needed(scope.required(self._router.cluster))

    def _read(
        self, plan: Plan, args: tuple[Any, ...], sql: str, context: Context, need: int
    ) -> tuple[Any, str]:
        """The value, and who answered it."""
        statements = [context_statement(context, plan.query.timeout_ms, read_only=True),
                      Statement(sql, args)]

        def attempt(conn: HcConnection) -> tuple[Any, str]:
            results = run_or_translate(conn, statements, plan.name, plan.source,
                                       before=plan.name)
            value = plan.shape.build(results[-1], conn.transformer, plan.name, plan.source)
            return value, conn.served_by

        return self._router.read(attempt, need)

    def _read_positioned(
        self, plan: Plan, args: tuple[Any, ...], sql: str, context: Context, need: int
    ) -> tuple[Any, int, str]:
        """`_read` for the cache (`need` as there): (value, position, who answered), the
        value reflecting every commit that a caller whose read-your-writes position is at most
        `position` must see.

        A replica has everything up to its replay position. A primary fill whose insert
        position, read before its query, is past the one a writer read after its COMMIT began
        after that COMMIT returned, hence the strict `- 1`. (The caller's own position is no
        bound: on an idle primary another commit can sit at that very position, not yet
        visible when the fill took its snapshot. So a writer's own fills serve it only once
        the WAL has moved on.)
        """
        statements = [context_statement(context, plan.query.timeout_ms, read_only=True),
                      Statement(POSITION_SQL), Statement(sql, args)]

        def attempt(conn: HcConnection) -> tuple[Any, int, str]:
            results = run_or_translate(conn, statements, plan.name, plan.source,
                                       before=plan.name)
            value = plan.shape.build(results[-1], conn.transformer, plan.name, plan.source)
            in_recovery, lsn = results[1].get_value(0, 0), results[1].get_value(0, 1)
            if lsn is None:  # a standby that has replayed nothing yet
                return value, 0, conn.served_by
            seen = consistency.parse_lsn(lsn.decode())
            return value, seen if in_recovery == b"\x01" else seen - 1, conn.served_by

        return self._router.read(attempt, need)

    def _write(
        self,
        plan: Plan,
        args: tuple[Any, ...],
        sql: str,
        context: Context,
        positions: tenancy.Positions,
    ) -> Any:
        # An explicit BEGIN/COMMIT lets the commit position be read behind the COMMIT before
        # the one Sync: a second Sync would flush the batch in two parts. It is read even
        # without replicas here, since the token may be handed to a process that has them.
        statements = [
            _BEGIN,
            context_statement(context, plan.query.timeout_ms),
            Statement(sql, args),
            _COMMIT,
            fetch_lsn(),
        ]
        tags = plan.invalidation_tags(args)  # before sending: a bad tag fails, nothing commits
        for attempt in (1, 2):
            try:
                return self._write_once(plan, statements, context, positions, tags)
            except ConnectionLost:
                # Raised only when the pooled connection was found dead before a byte was
                # sent: nothing can have been committed, a fresh connection may try again.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _write_once(
        self,
        plan: Plan,
        statements: list[Statement],
        context: Context,
        positions: tenancy.Positions,
        tags: list[str],
    ) -> Any:
        with self._router.primary.connection() as conn:
            ensure_open(conn, before=plan.name, query=plan.name)
            try:
                results = run_or_translate(conn, statements, plan.name, plan.source)
            except ConnectionLost as exc:
                # The write and its COMMIT were sent: it may have been committed.
                raise commit_outcome_unknown(exc.sqlstate, plan.name) from exc
            except DatabaseError:
                end_failed_transaction(conn)
                raise
            value = plan.shape.build(results[2], conn.transformer, plan.name, plan.source)
        lsn = results[4].get_value(0, 0)
        self._committed(context, tags, lsn.decode() if lsn else None, positions)
        return value

    def _committed(
        self,
        context: Context,
        tags: list[str],
        lsn: str | None,
        positions: tenancy.Positions,
    ) -> None:
        """After a successful COMMIT only: read-your-writes position, then cache invalidation."""
        if lsn is not None:
            consistency.record(positions, self._router.cluster, lsn)
        if self._cache is not None and tags:
            self._cache.invalidate(context, tags)

    def _stream(
        self, plan: Plan, args: tuple[Any, ...], sql: str, context: Context, need: int
    ) -> tuple[Iterator[Any], str]:
        node = self._router.reader(need)  # chosen at call time: the context is captured now
        prefix = [Statement("BEGIN READ ONLY"), context_statement(context, plan.query.timeout_ms)]

        def rows() -> Iterator[Any]:
            with node.connection() as conn:
                yield from stream_rows(conn, plan, args, sql, prefix, owns_tx=True)

        return rows(), node.served_by

    # -- units of work and transactions ----------------------------------------------------

    def unit_of_work(
        self,
        *,
        isolation: str | None = None,
        read_only: bool = False,
        clinic_id: UUID | str | None = tenancy.UNSET,
        actor_id: UUID | str | None = tenancy.UNSET,
        role: str | None = tenancy.UNSET,
        emergency_reason: str = tenancy.UNSET,
    ) -> UnitOfWork:
        """One primary transaction: `with db.unit_of_work() as uow: Repo(uow).method(...)`.
        Context fields not given come from the ambient block; a break-glass given here is
        recorded now, in its own transaction, as `db.context` does."""
        context = tenancy.resolve(clinic_id, actor_id, role, emergency_reason,
                                  self._record_emergency)
        return self._unit(context, isolation, read_only)

    def _unit(self, context: Context, isolation: str | None, read_only: bool) -> UnitOfWork:
        return UnitOfWork(
            self._router.primary,
            context,
            isolation=isolation,
            read_only=read_only,
            on_commit=lambda uow: self._committed(uow.context, uow.invalidations, uow.commit_lsn,
                                                  uow.positions),
            observer=self.observer,
            access=self._access,
            keyring=self.keyring,
        )

    def transaction(
        self,
        fn: Callable[..., R],
        /,
        *,
        retries: int = 3,
        isolation: str | None = None,
        read_only: bool = False,
        clinic_id: UUID | str | None = tenancy.UNSET,
        actor_id: UUID | str | None = tenancy.UNSET,
        role: str | None = tenancy.UNSET,
        **kwargs: Any,
    ) -> R:
        """Run `fn(uow, **kwargs)` in a unit of work, re-running it from the start on errors
        that guarantee nothing was committed (40001, 40P01, connection lost before COMMIT).

        Inside an open unit of work of the same thread it joins that one and leaves retrying
        to its owner; it refuses (`InvalidContext`) when it asks for another clinic, actor,
        role, isolation or read-only mode than that unit has. Elsewhere (another thread,
        through `bind_context`) it runs its own. Bad options are refused before anything is
        sent. (A break-glass comes from the ambient `db.context` block.)
        """
        # The public boundary: errors leave without hcrepo's frames, which hold `kwargs`.
        try:
            return self._transaction(fn, retries, isolation, read_only,
                                     tenancy.resolve(clinic_id, actor_id, role), kwargs)
        except Exception as error:
            failure = error
        raise detached(failure)

    def _transaction(
        self,
        fn: Callable[..., R],
        retries: int,
        isolation: str | None,
        read_only: bool,
        context: Context,
        kwargs: dict[str, Any],
    ) -> R:
        begin_statement(isolation, read_only)
        joined = tenancy.scope().open_unit()
        if isinstance(joined, UnitOfWork) and joined.joinable:
            joined.check_join(context, isolation, read_only)
            return fn(joined, **kwargs)
        units: list[UnitOfWork] = []

        def retryable(exc: BaseException) -> bool:
            # An after-commit hook that fails must not re-run work that is committed.
            return not units[-1].committed and _is_retryable(exc)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(retries + 1),
            wait=tenacity.wait_random_exponential(multiplier=0.005, max=0.5),
            retry=tenacity.retry_if_exception(retryable),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    units.append(self._unit(context, isolation, read_only))
                    with units[-1] as uow:
                        return fn(uow, **kwargs)
        except DatabaseError as exc:
            exc.attempts = len(units)
            outcome = "gave up" if retryable(exc) else "not retried"
            exc.args = (f"{exc.args[0]} ({outcome} after {len(units)} attempt(s))",)
            raise
        raise AssertionError("unreachable")

    def transactional(self, **options: Any) -> Callable[[Callable[..., R]], Callable[..., R]]:
        """Decorator form of `transaction`: `@db.transactional(retries=5)` on `fn(uow, **kw)`;
        call the result with the keyword arguments only."""

        def decorate(fn: Callable[..., R]) -> Callable[..., R]:
            @functools.wraps(fn)
            def wrapper(**kwargs: Any) -> R:
                return self.transaction(fn, **{**options, **kwargs})

            return wrapper

        return decorate

    def for_each_clinic(self, fn: Callable[[UUID], R]) -> dict[UUID, R]:
        """Run `fn(clinic_id)` once per clinic, each inside its own clinic context.

        RLS stays on: the clinic list comes from the clinic directory, and every call sees
        only its own clinic's rows.
        """
        with self._router.primary.connection() as conn:
            listing = [context_statement(tenancy.EMPTY), Statement(_LIST_CLINICS)]
            result = run_or_translate(conn, listing, "for_each_clinic", "Database")[-1]
            conn.transformer.set_pgresult(result)
            clinic_ids = [row[0] for row in conn.transformer.load_rows(0, result.ntuples, tuple)]
        outcome: dict[UUID, R] = {}
        for clinic_id in clinic_ids:
            with tenancy.use(clinic_id=clinic_id):
                outcome[clinic_id] = fn(clinic_id)
        return outcome


def _is_retryable(exc: BaseException) -> bool:
    """Only errors that guarantee nothing was committed (docs/architecture.md, invariant 5)."""
    if isinstance(exc, ConnectionLost):
        return True
    return isinstance(exc, DatabaseError) and exc.sqlstate in RETRYABLE_SQLSTATES
