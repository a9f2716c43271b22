"""SQL for a tenant's analysts (`POST /v1/sql`): their rows only, whatever the query says.

Each tenant has a database of views, `vx_tenant_<id>`, one per analyst table, each `SELECT * ...
FINAL WHERE tenant_id = '<id>'`, and a connection of its own whose current database that is. No
single check stands alone:

1. ClickHouse's own parser reads the text: `formatQuerySingleLine` (the text travels as a query
   parameter, never spliced into SQL) refuses more than one statement in every quoting and comment
   form ClickHouse knows, and gives the statement back in ClickHouse's own spelling. That text,
   and only it, is what is checked and what runs.
2. `EXPLAIN AST` of that text is checked node by node against allow-lists: one SELECT (UNION,
   INTERSECT, EXCEPT of SELECTs); no INTO OUTFILE, FORMAT or SETTINGS; tables named without a
   database and never a table function; no identifier that starts with a database's name; every
   function on `ALLOWED_FUNCTIONS` (or an allowed aggregate with an allowed combinator). The dump
   is parsed strictly and its declared child counts must match, so a name that smuggles a newline
   into the dump cannot pass for something else.
3. ClickHouse enforces the limits: the connection is `readonly` with `TENANT_SQL_LIMITS` (time,
   rows, result size, memory, threads, AST size); nothing the query says can change them.
4. On a ClickHouse server (not chDB), that connection logs in as a user of the tenant's own
   (`tenant_access_statements`): a read-only settings profile, a quota, SELECT on its views and
   the analyst tables only, and a row policy `tenant_id = '<id>'` on each analyst table, so the
   server itself refuses what the checks might miss.

Errors name what is wrong with the query, in words of ours (`QueryFailed`, `ForbiddenQuery`):
never ClickHouse's raw message, which can carry internal names and the suffix the client appends.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from urllib.parse import quote, urlsplit, urlunsplit

from projections.store import (
    Analytics,
    AnalyticsError,
    AnalyticsStore,
    AnalyticsUnavailable,
    QueryResult,
    setting_value,
)
from projections.tables import ANALYST_TABLES

TENANT_SQL_LIMITS: Mapping[str, int | str] = {
    "readonly": 1,
    "max_execution_time": 10,
    "timeout_overflow_mode": "throw",
    "limit": 10_000,  # the result's rows, as a LIMIT would: max_result_rows with 'break' can return far more
    "max_result_rows": 10_000,
    "max_result_bytes": 64 << 20,
    "result_overflow_mode": "throw",
    "max_rows_to_read": 50_000_000,
    "max_bytes_to_read": 4 << 30,
    "max_memory_usage": 256 << 20,  # also what bounds a result of constant columns: max_result_bytes counts one once
    "max_threads": 2,  # the engine is shared with the gateway and projections
    "max_ast_elements": 5_000,  # also bounds the EXPLAIN AST dump under `limit` rows
    "max_subquery_depth": 20,
}
"""What every tenant query runs under. In chDB they are set on the tenant's connection (`readonly`
last, after which none can change); on a server they are the tenant user's settings profile."""

TENANT_SQL_QUOTA: Mapping[str, int] = {
    "queries": 1_000,
    "errors": 200,
    "result_rows": 2_000_000,
    "read_rows": 20_000_000_000,
    "execution_time": 1_800,
}
"""Per tenant and hour, on a ClickHouse server (chDB has no quotas)."""

ALLOWED_AGGREGATES = frozenset({
    # counting and summing
    "count", "sum", "sumWithOverflow", "sumKahan", "sumCount", "avg", "avgWeighted", "min", "max",
    "any", "anyLast", "anyHeavy", "any_value", "argMin", "argMax", "min_by", "max_by",
    "uniq", "uniqExact", "uniqCombined", "uniqCombined64", "uniqHLL12",
    # distributions
    "median", "medianExact", "quantile", "quantiles", "quantileExact", "quantilesExact", "quantileExactLow",
    "quantileExactHigh", "quantileExactWeighted", "quantileTDigest", "quantilesTDigest", "quantileTiming",
    "quantilesTiming", "quantileDeterministic", "quantileBFloat16", "histogram",
    "stddevPop", "stddevSamp", "varPop", "varSamp", "covarPop", "covarSamp", "corr", "rankCorr", "entropy",
    "skewPop", "skewSamp", "kurtPop", "kurtSamp", "simpleLinearRegression",
    "STD", "STDDEV", "STDDEV_POP", "STDDEV_SAMP", "VAR_POP", "VAR_SAMP", "COVAR_POP", "COVAR_SAMP",
    # collections
    "groupArray", "groupUniqArray", "groupArraySorted", "groupArrayMovingSum", "groupArrayMovingAvg", "groupConcat",
    "group_concat", "string_agg", "array_agg", "topK", "topKWeighted",
    "groupBitAnd", "groupBitOr", "groupBitXor", "BIT_AND", "BIT_OR", "BIT_XOR",
    # funnels and sessions
    "retention", "windowFunnel", "sequenceMatch", "sequenceCount", "boundingRatio", "deltaSum", "intervalLengthSum",
    "maxIntersections", "exponentialMovingAverage",
    # window functions
    "row_number", "rank", "dense_rank", "percent_rank", "cume_dist", "ntile", "nth_value", "first_value",
    "last_value", "lagInFrame", "leadInFrame", "lag", "lead",
})

AGGREGATE_COMBINATORS = ("If", "Array", "Distinct", "OrNull", "OrDefault", "ForEach", "Map", "Resample", "ArgMin",
                         "ArgMax")
"""Suffixes that make another aggregate of an allowed one (countIf, uniqExactIf, sumMap, avgOrNull...;
count(DISTINCT x) is countDistinct)."""

ALLOWED_FUNCTIONS = ALLOWED_AGGREGATES | frozenset({
    # operators, logic, comparison (the parser turns `a + b`, `x IN (...)`, `CASE`, `t.1`, `a[1]`... into these)
    "plus", "minus", "multiply", "divide", "intDiv", "intDivOrZero", "modulo", "moduloOrZero", "positiveModulo",
    "negate", "and", "or", "not", "xor", "equals", "notEquals", "less", "greater", "lessOrEquals", "greaterOrEquals",
    "isNotDistinctFrom", "in", "notIn", "nullIn", "notNullIn", "like", "notLike", "ilike", "notILike", "match",
    "isNull", "isNotNull", "isZeroOrNull", "tuple", "array", "map", "tupleElement",
    "arrayElement", "CAST", "_CAST", "accurateCast", "accurateCastOrNull",
    # conditional
    "if", "multiIf", "caseWithExpression", "transform", "coalesce", "ifNull", "nullIf", "assumeNotNull",
    "toNullable", "greatest", "least",
    # mathematics
    "abs", "round", "roundBankers", "roundDown", "roundToExp2", "floor", "ceil", "ceiling", "trunc", "truncate",
    "sqrt", "cbrt", "exp", "exp2", "exp10", "log", "ln", "log2", "log10", "log1p", "pow", "power", "sign", "pi",
    "e", "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "hypot", "degrees", "radians", "gcd", "lcm",
    "isNaN", "isFinite", "isInfinite", "ifNotFinite", "widthBucket", "width_bucket", "bitAnd", "bitOr", "bitXor",
    "bitNot", "bitShiftLeft", "bitShiftRight", "bitCount", "rand", "rand64", "randCanonical",
    # dates and times
    "now", "now64", "today", "yesterday", "toDate", "toDate32", "toDateTime", "toDateTime64", "toDateOrNull",
    "toDateOrZero", "toDateTimeOrNull", "toDateTimeOrZero", "toDateTime64OrNull", "parseDateTime",
    "parseDateTimeOrNull", "parseDateTimeBestEffort", "parseDateTimeBestEffortOrNull",
    "parseDateTime64BestEffort", "parseDateTime64BestEffortOrNull", "toYear", "toQuarter", "toMonth", "toWeek",
    "toISOWeek", "toISOYear", "toYearWeek", "toDayOfYear", "toDayOfMonth", "toDayOfWeek", "toHour", "toMinute",
    "toSecond", "toMillisecond", "toUnixTimestamp", "toUnixTimestamp64Milli", "toUnixTimestamp64Micro",
    "fromUnixTimestamp", "fromUnixTimestamp64Milli", "fromUnixTimestamp64Micro", "FROM_UNIXTIME",
    "toStartOfYear", "toStartOfISOYear", "toStartOfQuarter", "toStartOfMonth", "toStartOfWeek", "toMonday",
    "toStartOfDay", "toStartOfHour", "toStartOfMinute", "toStartOfSecond", "toStartOfFiveMinutes",
    "toStartOfTenMinutes", "toStartOfFifteenMinutes", "toStartOfInterval", "toLastDayOfMonth", "toLastDayOfWeek",
    "toYYYYMM", "toYYYYMMDD", "toYYYYMMDDhhmmss", "toRelativeYearNum", "toRelativeMonthNum", "toRelativeWeekNum",
    "toRelativeDayNum", "toRelativeHourNum", "toRelativeMinuteNum", "toRelativeSecondNum", "dateDiff",
    "date_diff", "timeDiff", "age", "addDays", "addHours",
    "addMinutes", "addSeconds", "addMilliseconds", "addWeeks", "addMonths", "addQuarters", "addYears",
    "subtractDays", "subtractHours", "subtractMinutes", "subtractSeconds", "subtractMilliseconds",
    "subtractWeeks", "subtractMonths", "subtractQuarters", "subtractYears", "dateTrunc", "DATE_TRUNC",
    "formatDateTime", "DATE_FORMAT", "formatDateTimeInJodaSyntax", "toTimeZone", "toTimezone", "toIntervalSecond",
    "toIntervalMillisecond", "toIntervalMinute", "toIntervalHour", "toIntervalDay", "toIntervalWeek",
    "toIntervalMonth", "toIntervalQuarter", "toIntervalYear", "monthName", "dateName", "makeDate", "makeDate32",
    "makeDateTime", "makeDateTime64", "timeSlot", "YEAR", "QUARTER", "MONTH", "DAY", "HOUR", "MINUTE", "SECOND",
    "DAYOFWEEK", "DAYOFMONTH", "DAYOFYEAR", "UTCTimestamp",
    # strings
    "length", "lengthUTF8", "CHAR_LENGTH", "CHARACTER_LENGTH", "empty", "notEmpty", "lower",
    "upper", "lowerUTF8", "upperUTF8", "lcase", "ucase", "initcap", "initcapUTF8", "concat", "concatWithSeparator",
    "concat_ws", "substring", "substr", "mid", "substringUTF8", "substringIndex", "left", "right", "leftUTF8",
    "rightUTF8", "trimBoth", "trimLeft", "trimRight", "ltrim", "rtrim", "leftPad", "rightPad", "lpad", "rpad",
    "leftPadUTF8", "rightPadUTF8", "position", "positionCaseInsensitive", "positionUTF8",
    "positionCaseInsensitiveUTF8", "locate", "startsWith", "endsWith", "reverse", "reverseUTF8", "repeat",
    "format", "replaceOne", "replaceAll", "replace", "replaceRegexpOne", "replaceRegexpAll", "REGEXP_REPLACE",
    "regexpExtract", "extract", "extractAll", "extractGroups", "splitByChar", "splitByString", "splitByRegexp",
    "splitByWhitespace", "splitByNonAlpha", "arrayStringConcat", "multiSearchAny", "multiSearchFirstIndex",
    "multiMatchAny", "countSubstrings", "countSubstringsCaseInsensitive", "countMatches", "hasToken",
    "hasTokenCaseInsensitive", "ngramDistance", "editDistance", "levenshteinDistance", "toValidUTF8", "char",
    "normalizeUTF8NFC", "base64Encode", "base64Decode", "tryBase64Decode", "hex", "unhex", "ascii", "translate",
    "translateUTF8", "domain", "domainWithoutWWW", "protocol", "path", "extractURLParameter",
    "decodeURLComponent", "encodeURLComponent", "extractKeyValuePairs",
    "cityHash64", "sipHash64", "xxHash32", "xxHash64", "murmurHash3_64", "MD5", "SHA1", "SHA256",
    # arrays
    "range", "arrayJoin", "has", "hasAll", "hasAny", "indexOf", "countEqual", "arrayMap", "arrayFilter",
    "arrayExists", "arrayAll", "arrayCount", "arraySum", "arrayAvg", "arrayMin", "arrayMax", "arrayProduct",
    "arraySort", "arrayReverseSort", "arrayDistinct", "arrayUniq", "arrayEnumerate", "arrayEnumerateUniq",
    "arrayEnumerateDense", "arraySlice", "arrayConcat", "arrayPushBack", "arrayPushFront", "arrayPopBack",
    "arrayPopFront", "arrayFlatten", "flatten", "arrayCompact", "arrayZip", "arrayFirst", "arrayLast",
    "arrayFirstIndex", "arrayLastIndex", "arrayFirstOrNull", "arrayLastOrNull", "arrayCumSum", "arrayDifference",
    "arrayIntersect", "arrayReverse", "arrayResize", "arrayFill", "arrayReverseFill", "arraySplit",
    "arrayWithConstant",
    # tuples and maps
    "mapKeys", "mapValues", "mapContains", "mapFilter", "mapApply", "mapFromArrays", "mapAdd",
    "mapSubtract", "mapUpdate", "mapConcat", "mapExists", "mapAll", "mapSort",
    # JSON in strings (tool arguments and results)
    "JSONExtract", "JSONExtractString", "JSONExtractInt", "JSONExtractUInt", "JSONExtractFloat", "JSONExtractBool",
    "JSONExtractRaw", "JSONExtractArrayRaw", "JSONExtractKeys", "JSONExtractKeysAndValues",
    "JSONExtractKeysAndValuesRaw", "JSONHas", "JSONLength", "JSONType", "JSONArrayLength", "JSON_VALUE",
    "JSON_QUERY", "JSON_EXISTS", "isValidJSON", "simpleJSONExtractString", "simpleJSONExtractInt",
    "simpleJSONExtractUInt", "simpleJSONExtractFloat", "simpleJSONExtractBool", "simpleJSONExtractRaw",
    "simpleJSONHas", "toJSONString",
    # type conversion and formatting
    "toString", "toFixedString", "toInt8", "toInt16", "toInt32", "toInt64", "toUInt8", "toUInt16", "toUInt32",
    "toUInt64", "toFloat32", "toFloat64", "toDecimal32", "toDecimal64", "toDecimal128", "toBool", "toUUID",
    "toUUIDOrNull", "toInt32OrNull", "toInt64OrNull", "toUInt32OrNull", "toUInt64OrNull", "toFloat64OrNull",
    "toInt32OrZero", "toInt64OrZero", "toUInt64OrZero", "toFloat64OrZero", "toDecimal64OrNull", "toDecimalString",
    "toTypeName", "formatReadableSize", "formatReadableDecimalSize", "formatReadableQuantity",
    "formatReadableTimeDelta", "generateUUIDv4", "bar",
}) | frozenset({"lambda", "exists", "untuple"})  # made by the parser (`x -> x + 1`, EXISTS (...)), not registered
"""Functions a tenant's query may call. Anything else is refused: what reads outside the tables
(file, url, s3, remote, dictGet, joinGet, getSetting, hasColumnInTable...), what describes the
server (version, buildId, hostName, currentDatabase, currentSchemas, timezone, uptime...), what
sleeps or throws, and what names another function in a string (arrayReduce)."""

_NODES = frozenset({
    "SelectWithUnionQuery", "SelectIntersectExceptQuery", "SelectQuery", "ExpressionList", "Identifier",
    "TableIdentifier", "Function", "Literal", "Asterisk", "QualifiedAsterisk", "ColumnsRegexpMatcher",
    "ColumnsListMatcher", "QualifiedColumnsRegexpMatcher", "QualifiedColumnsListMatcher", "ColumnsTransformerList",
    "ColumnsExceptTransformer", "ColumnsReplaceTransformer", "ColumnsReplaceTransformer::Replacement",
    "TablesInSelectQuery", "TablesInSelectQueryElement", "TableExpression", "TableJoin", "ArrayJoin", "Subquery",
    "WithElement", "OrderByElement", "WindowDefinition", "WindowListElement", "InterpolateElement",
})
"""The syntax a SELECT over tables is made of; anything else (SETTINGS, query parameters, APPLY,
SAMPLE...) is refused."""
_REFUSED_NODES = {"Set": "a SETTINGS clause is not allowed: the query runs with fixed limits",
                  "QueryParameter": "query parameters ({name:Type}) are not supported",
                  "ColumnsApplyTransformer": "APPLY is not allowed: call the functions by name",
                  "SampleRatio": "SAMPLE is not supported"}
_ANALYST_TABLE_NAMES = tuple(table.name for table in ANALYST_TABLES)
_SYSTEM_DATABASES = frozenset({"system", "default", "information_schema", "INFORMATION_SCHEMA"})
_TENANT_PREFIX = "vx_tenant_"
_CHECK_FORMAT = "TabSeparated"
"""The EXPLAIN's own FORMAT clause: it takes the place a FORMAT of the tenant's would, so one of
theirs makes the EXPLAIN a syntax error and an INTO OUTFILE shows as a node of its own."""
_OWN_TABLES = "only your own tables can be named, without a database"
_ONE_SELECT = ("one plain SELECT only: no other kind of statement, and no INTO OUTFILE, FORMAT or SETTINGS clause "
               "(the result comes back as JSON)")
_AST_LINE = re.compile(r"(?P<indent> *)(?P<kind>[A-Za-z][\w:]*)(?: (?P<rest>.*))?")
_CHILDREN = re.compile(r" \(children ([1-9]\d*)\)$")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ForbiddenQuery(AnalyticsError):
    """A query a tenant may not run; the message says why."""


class QueryFailed(AnalyticsError):
    """ClickHouse could not run a tenant's query; the message says what was wrong, without internals."""


def tenant_database(tenant_id: str) -> str:
    """The tenant's database of views, also the name of its ClickHouse user on a server."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,63}", tenant_id):
        raise ValueError(f"not a tenant id: {tenant_id!r}")
    return _TENANT_PREFIX + tenant_id.replace("-", "_")  # tenant ids have no '_', so this is one-to-one


def tenant_access_statements(
    tenant_id: str, *, main_database: str, password_sha256_hex: str,
    tables: Sequence[str] = _ANALYST_TABLE_NAMES,
    limits: Mapping[str, int | str] = TENANT_SQL_LIMITS, quota: Mapping[str, int] = TENANT_SQL_QUOTA,
) -> list[str]:
    """What a ClickHouse server runs (as voxlog's own user, which needs access management) so that the
    tenant's user can read its views and nothing else: a read-only settings profile, a quota, SELECT
    grants, and a row policy on each analyst table (the views are SQL SECURITY INVOKER, so the policy
    applies through them too). Idempotent: each statement replaces what an earlier run made."""
    name = tenant_database(tenant_id)
    if not _WORD.fullmatch(main_database) or not re.fullmatch(r"[0-9a-f]{64}", password_sha256_hex):
        raise ValueError("not a database name or a SHA-256 hex digest")
    settings = ", ".join(f"{key} = {setting_value(value)}" for key, value in limits.items())
    maxima = ", ".join(f"{key} = {value}" for key, value in quota.items())
    statements = [
        f"CREATE SETTINGS PROFILE OR REPLACE {name} SETTINGS {settings}",
        f"CREATE USER OR REPLACE {name} IDENTIFIED WITH sha256_hash BY '{password_sha256_hex}' "
        f"DEFAULT DATABASE {name} SETTINGS PROFILE '{name}'",
        f"CREATE QUOTA OR REPLACE {name} FOR INTERVAL 1 hour MAX {maxima} TO {name}",
        f"GRANT SELECT ON {name}.* TO {name}",
    ]
    for table in tables:
        statements.append(f"GRANT SELECT ON {main_database}.{table} TO {name}")
        # tenant_database() has checked the id: [a-z0-9-] only, safe between quotes.
        statements.append(f"CREATE ROW POLICY OR REPLACE {name} ON {main_database}.{table} "
                          f"USING tenant_id = '{tenant_id}' TO {name}")
    return statements


def tenant_login(admin_dsn: str, tenant_id: str) -> tuple[str, str]:
    """The tenant user's DSN and password on the server `admin_dsn` names. The password is an HMAC of
    the tenant under voxlog's own password: every gateway sharing the server derives the same one,
    and none is stored anywhere."""
    parts = urlsplit(admin_dsn)
    name = tenant_database(tenant_id)
    password = hmac.new((parts.password or "").encode(), f"voxlog tenant sql {tenant_id}".encode(),
                        hashlib.sha256).hexdigest()
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    netloc = f"{name}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, f"/{name}", parts.query, "")), password


@dataclass
class AstNode:
    kind: str
    name: str
    declared: int
    children: list[AstNode] = field(default_factory=list)


def parse_ast(lines: Sequence[str]) -> AstNode:
    """The tree `EXPLAIN AST` printed, one node a line, one space of indent a level. ForbiddenQuery
    unless every line parses and every node has exactly the children it declares: a name holding a
    newline prints lines of its own, and they never fit."""
    unreadable = ForbiddenQuery("the query cannot be checked: simplify its names")
    stack: list[AstNode] = []
    root: AstNode | None = None
    for line in lines:
        children = _CHILDREN.search(line)
        match = _AST_LINE.fullmatch(line[:children.start()] if children else line)
        if match is None:
            raise unreadable
        depth, name = len(match["indent"]), (match["rest"] or "").split(" (alias ", 1)[0]
        node = AstNode(match["kind"], name, int(children.group(1)) if children else 0)
        if depth == 0 and root is None:
            root = node
        elif 0 < depth <= len(stack):
            stack[depth - 1].children.append(node)
        else:
            raise unreadable
        del stack[depth:]
        stack.append(node)
    if root is None or not _consistent(root):
        raise unreadable
    return root


def _consistent(node: AstNode) -> bool:
    return len(node.children) == node.declared and all(_consistent(c) for c in node.children)


@dataclass(frozen=True)
class FunctionNames:
    """How ClickHouse resolves a function's name: exactly, else case-insensitively among the functions
    registered so, else as an aggregate with combinator suffixes. `registered` and
    `case_insensitive` come from the engine's system.functions."""

    registered: frozenset[str]
    case_insensitive: frozenset[str]

    @cached_property
    def _folded(self) -> dict[frozenset[str], frozenset[str]]:
        return {allowed: frozenset(n.lower() for n in allowed if n in self.case_insensitive)
                for allowed in (ALLOWED_FUNCTIONS, ALLOWED_AGGREGATES)}

    def allowed(self, name: str, among: frozenset[str] = ALLOWED_FUNCTIONS) -> bool:
        if name in self.registered:  # an exact name wins in ClickHouse: it must be one we allow
            return name in among
        if name in among or name.lower() in self._folded[among]:
            return True
        return any(name.endswith(suffix) and self.allowed(name[:-len(suffix)], ALLOWED_AGGREGATES)
                   for suffix in AGGREGATE_COMBINATORS if len(name) > len(suffix))


def check_tree(root: AstNode, *, functions: FunctionNames, databases: frozenset[str], limit: int) -> None:
    """ForbiddenQuery unless `root` (EXPLAIN AST of `<query> FORMAT TabSeparated`, run where the
    `limit` setting is `limit`) is one SELECT within the current database's tables, calling allowed
    functions only."""
    if root.kind != "SelectWithUnionQuery":
        raise ForbiddenQuery(f"{_ONE_SELECT} ({root.kind.removesuffix('Query')} is not a SELECT)")
    outputs = root.children[1:]
    if [(n.kind, n.name) for n in outputs] != [("Identifier", _CHECK_FORMAT)]:
        raise ForbiddenQuery(_ONE_SELECT)
    _check(_within_limit(root.children[0], limit) if limit else root.children[0], "", functions, databases)


def _within_limit(body: AstNode, limit: int) -> AstNode:
    """The query inside the `SELECT * FROM (query) LIMIT <limit>` that ClickHouse makes of it under the
    `limit` setting. A SETTINGS clause's `limit` or `offset` does not show as SETTINGS (ClickHouse
    rewrites it into such a wrapper before EXPLAIN prints): at the top it replaces ours, so any
    other wrapper is refused. In a subquery it is the LIMIT it stands for, no more."""
    select = _only_child(body, "ExpressionList")
    if select is not None and select.kind == "SelectQuery" and len(select.children) == 3:
        columns, tables, cap = select.children
        inner: AstNode | None = tables
        for kind in ("TablesInSelectQuery", "TablesInSelectQueryElement", "TableExpression", "Subquery"):
            inner = _only_child(inner, kind)
        if (inner is not None and [c.kind for c in columns.children] == ["Asterisk"]
                and (cap.kind, cap.name) == ("Literal", f"Float64_{limit}")):
            return inner
    raise ForbiddenQuery(_REFUSED_NODES["Set"])


def _only_child(node: AstNode | None, kind: str) -> AstNode | None:
    return node.children[0] if node is not None and node.kind == kind and len(node.children) == 1 else None


def _names_database(name: str, databases: frozenset[str]) -> bool:
    first = name.split(".", 1)[0]
    return first in databases or first.startswith(_TENANT_PREFIX)


def _check(node: AstNode, parent: str, functions: FunctionNames, databases: frozenset[str]) -> None:
    if node.kind in _REFUSED_NODES:
        raise ForbiddenQuery(_REFUSED_NODES[node.kind])
    if node.kind not in _NODES:
        raise ForbiddenQuery(f"{node.kind} is not allowed here")
    if node.kind == "Function":
        if parent == "TableExpression":
            raise ForbiddenQuery(f"table function {node.name}() is not allowed: query the tables by name")
        if not _WORD.fullmatch(node.name):
            raise ForbiddenQuery("that function is not allowed")
        if not functions.allowed(node.name):
            raise ForbiddenQuery(f"function {node.name}() is not allowed")
    qualified_table = node.kind == "TableIdentifier" and not _WORD.fullmatch(node.name)
    if qualified_table or (node.kind in ("Identifier", "TableIdentifier") and _names_database(node.name, databases)):
        raise ForbiddenQuery(_OWN_TABLES)
    for child in node.children:
        _check(child, node.kind, functions, databases)


_LIMIT_ERRORS = {
    159: "it ran longer than {max_execution_time} s",
    241: "it needed more than {max_memory_usage:,} bytes of memory",
    158: "it read more than {max_rows_to_read:,} rows or returned more than {max_result_rows:,}",
    307: "it read more than {max_bytes_to_read:,} bytes or returned more than {max_result_bytes:,}",
    396: "its result is larger than {max_result_rows:,} rows or {max_result_bytes:,} bytes",
    168: "it is too big (more than {max_ast_elements:,} parts)",
    167: "it is nested too deeply",
    306: "it is nested too deeply (or is a recursive WITH that does not end)",
    131: "a string would be too large",
    162: "its subqueries are nested more than {max_subquery_depth} deep",
}
"""ClickHouse error codes of the limits, and what to tell the tenant."""
_QUERY_ERRORS = {
    47: "unknown column or alias", 60: "unknown table", 46: "unknown function", 81: "unknown table",
    164: "read-only: a query may not change settings or data", 497: "not allowed",
    456: _REFUSED_NODES["QueryParameter"], 394: "the query was cancelled",
}
_DETAILED = frozenset({
    6, 26, 27, 36, 38, 41, 42, 43, 44, 48, 53, 69, 70, 72, 117, 153, 179, 184, 190, 206, 215, 352, 386, 403,
})
"""Codes whose ClickHouse text is about the tenant's own expressions (types, arguments, aliases,
aggregation, parsing a value): its first sentence is passed on once scrubbed."""
_CODE = re.compile(r"\bCode: (\d+)|error code (\d+)")
_QUOTED = re.compile(r"[`'](.{1,200}?)[`']")
_POSITION = re.compile(r"failed at position (\d+)")
_CUT = re.compile(r"(?:[:.]? In scope |: While processing | \(version |\. Stack trace|\. Maybe you meant).*$"
                  r"|\s*\([A-Z][A-Z0-9_]+\)\s*$", re.DOTALL)


def error_code(error: AnalyticsError) -> int:
    """ClickHouse's error code in `error`'s message (chDB and HTTP spell it differently); 0 if none."""
    found = _CODE.search(str(error))
    return int(found.group(1) or found.group(2)) if found else 0


def describe_failure(error: AnalyticsError, query: str, *, limits: Mapping[str, int | str],
                     internals: Sequence[str], tables: Sequence[str] = _ANALYST_TABLE_NAMES) -> AnalyticsError:
    """A tenant's words for what ClickHouse said about `query` (the text the tenant sent): a
    ForbiddenQuery or QueryFailed whose message names no database, setting or clause of voxlog's
    (`internals`: what must never show, not even echoed from the query)."""
    text = str(error)
    code = error_code(error)
    if code == 62 and "Multi-statements" in text:
        return ForbiddenQuery("one statement at a time")
    if code == 62:
        position = _POSITION.search(text)
        if position is None:
            return QueryFailed("syntax error")
        at = int(position.group(1))
        near = query.encode()[at - 1:at + 39].decode(errors="replace").strip()
        if not near:
            return QueryFailed(f"syntax error at position {at} (end of query)")
        shown = "" if _internal(near, internals) else f", near {near!r}"  # their words, unless they name ours
        return QueryFailed(f"syntax error at position {at}{shown}")
    if code in _LIMIT_ERRORS:
        return QueryFailed("the query was stopped: " + _LIMIT_ERRORS[code].format(**limits))
    names = [n for n in _QUOTED.findall(text) if n in query and not _internal(n, internals)]
    if code in _QUERY_ERRORS:
        detail = f": {names[0]}" if names and code in (46, 47, 60, 81) else ""
        message = _QUERY_ERRORS[code] + detail + (f"; the tables are {', '.join(tables)}" if code in (60, 81) else "")
        return ForbiddenQuery(message) if code == 497 else QueryFailed(message)
    if code in _DETAILED:
        sentence = _CUT.sub("", text.rsplit("DB::Exception: ", 1)[-1]).strip().rstrip(".")
        if sentence and not _internal(sentence, internals):
            return QueryFailed(sentence)
    return QueryFailed(f"the query could not run (ClickHouse error {code})" if code else "the query could not run")


def _internal(text: str, internals: Sequence[str]) -> bool:
    return any(marker.lower() in text.lower() for marker in internals)


TENANT_CONNECTIONS = 64
"""Tenants whose connections stay open; beyond, the least recently used is let go (each is an engine
session, and through a store host a thread too) and opened again, as it was, when its tenant next asks."""


class TenantSql:
    """Runs tenants' queries against `store` (whose current database holds the analyst tables)."""

    def __init__(self, store: Analytics, *, limits: Mapping[str, int | str] = TENANT_SQL_LIMITS,
                 connections: int = TENANT_CONNECTIONS) -> None:
        self.store = store
        self.limits = limits
        self.connections = connections
        self._views: OrderedDict[str, Analytics] = OrderedDict()
        self._creating = threading.Lock()  # queries arrive on worker threads: one connection per tenant
        self._main: str | None = None
        self._functions: FunctionNames | None = None

    def _main_database(self) -> str:
        if self._main is None:
            self._main = str(self.store.query("SELECT currentDatabase()").rows[0][0])
        return self._main

    def _function_names(self) -> FunctionNames:
        if self._functions is None:
            rows = self.store.query("SELECT name, case_insensitive FROM system.functions").rows
            self._functions = FunctionNames(frozenset(str(n) for n, _ in rows),
                                            frozenset(str(n) for n, ci in rows if ci))
        return self._functions

    def _tenant_store(self, tenant_id: str) -> Analytics:
        with self._creating:
            found = self._views.get(tenant_id)
            if found is None:
                found = self._views[tenant_id] = self._open_tenant(tenant_id)
                while len(self._views) > self.connections:
                    self._views.popitem(last=False)  # closed once a query still running on it lets it go
            else:
                self._views.move_to_end(tenant_id)
            return found

    def _open_tenant(self, tenant_id: str) -> Analytics:
        database = tenant_database(tenant_id)
        main = self._main_database()
        self.store.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        for table in ANALYST_TABLES:
            self.store.create(table)
            # INVOKER: on a server the tenant's user reads the table itself, under its row policy.
            self.store.command(
                f"CREATE OR REPLACE VIEW {database}.{table.name} SQL SECURITY INVOKER AS "
                f"SELECT * FROM {main}.{table.name} FINAL WHERE tenant_id = '{tenant_id}'")
        if self.store.embedded:
            found = self.store.connect(database=database, settings=self.limits)
        else:
            dsn, password = tenant_login(self.store.dsn, tenant_id)
            for statement in tenant_access_statements(tenant_id, main_database=main, limits=self.limits,
                                                      password_sha256_hex=hashlib.sha256(password.encode()).hexdigest()):
                self.store.command(statement)
            found = AnalyticsStore(dsn)
        return found

    def check(self, tenant_id: str, sql: str) -> str:
        """The statement to run, in ClickHouse's spelling, if `sql` is one SELECT the tenant may run;
        else ForbiddenQuery (or QueryFailed for text ClickHouse cannot parse)."""
        if "\x00" in sql:
            raise ForbiddenQuery("the query contains a NUL character")
        tenant = self._tenant_store(tenant_id)
        internals = self._internals()
        try:
            statement = str(tenant.query("SELECT formatQuerySingleLine({q:String})", {"q": sql}).rows[0][0])
        except AnalyticsUnavailable:
            raise  # not the query's doing: the API says so (503)
        except AnalyticsError as exc:
            raise describe_failure(exc, sql, limits=self.limits, internals=internals) from exc
        try:
            dump = tenant.query(f"EXPLAIN AST {statement} FORMAT {_CHECK_FORMAT}").rows
        except AnalyticsUnavailable:
            raise  # not the query's doing: the API says so (503)
        except AnalyticsError as exc:
            code = error_code(exc)
            if code in _LIMIT_ERRORS or code == 456:  # too big; a {parameter} never given
                raise describe_failure(exc, sql, limits=self.limits, internals=internals) from exc
            if code == 164:  # EXPLAIN applies the statement's SETTINGS, which the read-only connection refuses
                raise ForbiddenQuery(_REFUSED_NODES["Set"]) from exc
            # It parsed alone, so what clashes with our FORMAT is one of its own, or a statement of
            # another kind (SYSTEM, INSERT ... VALUES) that takes none.
            raise ForbiddenQuery(_ONE_SELECT) from exc
        databases = frozenset(str(r[0]) for r in self.store.query("SELECT name FROM system.databases").rows)
        check_tree(parse_ast([str(row[0]) for row in dump]), functions=self._function_names(),
                   databases=databases | _SYSTEM_DATABASES | {self._main_database()},
                   limit=int(self.limits.get("limit", 0)))
        return statement

    def query(self, tenant_id: str, sql: str) -> QueryResult:
        statement = self.check(tenant_id, sql)
        try:
            return self._tenant_store(tenant_id).query(statement)
        except AnalyticsUnavailable:
            raise  # not the query's doing: the API says so (503)
        except AnalyticsError as exc:
            raise describe_failure(exc, sql, limits=self.limits, internals=self._internals()) from exc

    def _internals(self) -> tuple[str, ...]:
        return (self._main_database(), _TENANT_PREFIX, "_projection", *_SYSTEM_DATABASES, "FORMAT ", "SETTINGS",
                "formatQuery", "EXPLAIN")
