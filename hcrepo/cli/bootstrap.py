"""`hcrepo bootstrap`: hcrepo's two roles and its database, set up once by a superuser."""

from __future__ import annotations

import argparse
import os
import re
from urllib.parse import quote

from hcrepo.admin import migrate
from hcrepo.admin.connect import conninfo_url
from hcrepo.errors import ConfigError

DESCRIPTION = f"""\
Create, or adopt when they exist, what hcrepo needs in a PostgreSQL cluster:

  {migrate.OWNER_ROLE}   owns the database and the schema; `hcrepo migrate` connects as it
  {migrate.APP_ROLE}     the application's role: no superuser, no BYPASSRLS, owns nothing
  {migrate.AUDITOR_ROLE} reads the audit trail across clinics, nothing else (only when
                   its password variable is set; the migrations create it without a login)
  the database     owned by {migrate.OWNER_ROLE} (an existing one is handed to it)

The passwords come from environment variables, never from the command line. Running it
again sets the passwords again and changes nothing else. A role that exists with
privileges that defeat row-level security is refused before anything changes.

Connect as a superuser, or as a managed service's administrator (Amazon RDS master user,
Cloud SQL's cloudsqlsuperuser member): a role with CREATEROLE and CREATEDB is enough.
It prints the URLs to export, with the passwords left as ${{VARIABLE}} references."""


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "bootstrap", help="create or adopt hcrepo's roles and database (once, as a superuser)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--superuser-url", required=True, metavar="URL",
                        help="a superuser's (or CREATEROLE and CREATEDB role's) URL")
    parser.add_argument("--database", default="hcrepo", metavar="NAME",
                        help="the database to create or adopt (default: hcrepo)")
    parser.add_argument("--owner-password-env", default="HCREPO_OWNER_PASSWORD", type=_variable,
                        metavar="VAR", help=f"variable holding {migrate.OWNER_ROLE}'s password "
                        "(default: HCREPO_OWNER_PASSWORD)")
    parser.add_argument("--app-password-env", default="HCREPO_APP_PASSWORD", type=_variable,
                        metavar="VAR", help=f"variable holding {migrate.APP_ROLE}'s password "
                        "(default: HCREPO_APP_PASSWORD)")
    parser.add_argument("--auditor-password-env", default="HCREPO_AUDITOR_PASSWORD",
                        type=_variable, metavar="VAR",
                        help=f"variable holding {migrate.AUDITOR_ROLE}'s password; unset: no "
                        "auditor login (default: HCREPO_AUDITOR_PASSWORD)")
    parser.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    variables = {migrate.OWNER_ROLE: args.owner_password_env,
                 migrate.APP_ROLE: args.app_password_env}
    passwords = {role: _password(variable, role) for role, variable in variables.items()}
    urls = [("HCREPO_OWNER_URL", migrate.OWNER_ROLE), ("DATABASE_URL", migrate.APP_ROLE)]
    # The auditor is optional: a deployment may give nobody the audit trail's login yet.
    if os.environ.get(args.auditor_password_env) is not None:
        variables[migrate.AUDITOR_ROLE] = args.auditor_password_env
        passwords[migrate.AUDITOR_ROLE] = _password(args.auditor_password_env,
                                                    migrate.AUDITOR_ROLE)
        urls.append(("HCREPO_AUDITOR_URL", migrate.AUDITOR_ROLE))
    migrate.bootstrap(
        args.superuser_url, database=args.database, owner_password=passwords[migrate.OWNER_ROLE],
        app_password=passwords[migrate.APP_ROLE],
        auditor_password=passwords.get(migrate.AUDITOR_ROLE), setting="--superuser-url",
        report=lambda line: print(f"# {line}"),
    )
    for setting, role in urls:
        if quote(passwords[role], safe="") != passwords[role]:
            print(f"# {variables[role]} has characters a URL must percent-encode: "
                  f"write them encoded in {setting}")
        url = _url(args.superuser_url, role, variables[role], args.database)
        print(f'export {setting}="{url}"')
    return 0


def _url(superuser_url: str, role: str, variable: str, database: str) -> str:
    """The role's URL with `${variable}` for the password (expanded by the shell)."""
    # conninfo_url percent-encodes a password; the reference must reach the shell as is.
    marker = "PASSWORDGOESHERE"
    url = conninfo_url(superuser_url, user=role, password=marker, dbname=database)
    return url.replace(marker, "${" + variable + "}", 1)


def _password(variable: str, role: str) -> str:
    value = os.environ.get(variable)
    if value is None:
        raise ConfigError(variable, f"is not set (it holds the password for {role}); "
                                    "nothing changed")
    if not value:
        raise ConfigError(variable, f"is empty (it holds the password for {role}); "
                                    "nothing changed")
    return value


def _variable(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
        raise argparse.ArgumentTypeError("not an environment variable name")
    return text
