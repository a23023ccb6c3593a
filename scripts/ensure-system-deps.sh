#!/usr/bin/env bash
# Makes sure the server binaries the tests and the demo start are on this machine:
# PostgreSQL >= 14 (initdb, pg_ctl, pg_basebackup, postgres) with its contrib extensions
# (pg_stat_statements, btree_gist), redis-server, redis-cli and pgbouncer. Installs them with apt when
# root; otherwise names what to install. Silent when everything is there.
set -euo pipefail

MIN_PG_MAJOR=14
PACKAGES="postgresql postgresql-contrib redis-server pgbouncer"

# Same search order as hcrepo.embedded.pg_bindir(): PATH, pg_config --bindir, then the
# highest /usr/lib/postgresql/*/bin.
pg_bindir_candidates() {
  local initdb
  if initdb=$(command -v initdb 2>/dev/null); then
    dirname "$initdb"
    dirname "$(readlink -f "$initdb")"
  fi
  if command -v pg_config >/dev/null 2>&1; then
    pg_config --bindir 2>/dev/null || true
  fi
  if [ -d /usr/lib/postgresql ]; then
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5nr || true
  fi
}

pg_major() {
  "$1/postgres" --version 2>/dev/null | sed -n 's/.*(PostgreSQL) \([0-9][0-9]*\).*/\1/p'
}

# Prints the first bin directory with every server binary of a supported version.
find_pg_bindir() {
  local dir name major ok
  while IFS= read -r dir; do
    [ -n "$dir" ] || continue
    ok=1
    for name in initdb pg_ctl pg_basebackup postgres; do
      [ -x "$dir/$name" ] || { ok=0; break; }
    done
    [ "$ok" = 1 ] || continue
    major=$(pg_major "$dir")
    if [ -n "$major" ] && [ "$major" -ge "$MIN_PG_MAJOR" ]; then
      echo "$dir"
      return 0
    fi
  done < <(pg_bindir_candidates)
  return 1
}

# Contrib files live where that server's pg_config says, or in Debian's layout.
has_contrib() {
  local bindir=$1 sharedir pkglibdir major
  major=$(pg_major "$bindir")
  if [ -x "$bindir/pg_config" ]; then
    sharedir=$("$bindir/pg_config" --sharedir)
    pkglibdir=$("$bindir/pg_config" --pkglibdir)
  else
    sharedir=/usr/share/postgresql/$major
    pkglibdir=/usr/lib/postgresql/$major/lib
  fi
  [ -f "$sharedir/extension/pg_stat_statements.control" ] &&
    [ -f "$sharedir/extension/btree_gist.control" ] &&
    [ -f "$pkglibdir/pg_stat_statements.so" ]
}

missing() {
  local bindir
  if bindir=$(find_pg_bindir); then
    has_contrib "$bindir" || echo "postgresql-contrib (pg_stat_statements, btree_gist)"
  else
    echo "postgresql >= $MIN_PG_MAJOR (initdb, pg_ctl, pg_basebackup, postgres)"
  fi
  command -v redis-server >/dev/null 2>&1 || echo "redis-server"
  command -v redis-cli >/dev/null 2>&1 || echo "redis-cli"
  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || echo "pgbouncer"
}

absent=$(missing)
[ -z "$absent" ] && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "missing $(echo "$absent" | paste -sd, - | sed 's/,/, /g'): run 'sudo apt-get install $PACKAGES' (or your system's equivalent)" >&2
  exit 1
fi

echo "installing $PACKAGES (missing: $(echo "$absent" | paste -sd, - | sed 's/,/, /g'))" >&2
apt-get update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null

absent=$(missing)
if [ -n "$absent" ]; then
  echo "still missing after apt-get install: $(echo "$absent" | paste -sd, - | sed 's/,/, /g')" >&2
  exit 1
fi
