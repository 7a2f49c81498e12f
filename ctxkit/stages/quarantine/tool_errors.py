"""Tool errors: tracebacks, error lines, HTTP failures, JSON error envelopes, failed batches and commands,
bot-protection pages. Precise rather than broad: a false quarantine hides good content from every later stage."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .finding import Finding, line_at, parse_json, shorten

_ERROR_TEXT = [
    (re.compile(r"Traceback \(most recent call last\)"), "a Python traceback"),
    # a SOAP fault in an envelope's body (WSDL's own <wsdl:fault> describes one and is lower case)
    (re.compile(r"<(?:[\w-]+:)?Body\b[^>]*>\s*<(?:[\w-]+:)?Fault\b"), "a SOAP fault"),
    (re.compile(r"^(?:(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception)|(?:[a-z_]\w*\.)+(?:errors|exceptions)\.[A-Z]\w*|Exception|Error|ERROR|FATAL|Fatal error|"
                r"PHP (?:Fatal|Parse) error)\b\s*[:!]", re.M),
     "an error line"),
    (re.compile(r"thread '[^']*' panicked at|^[^\S\n]*\[?UnhandledPromiseRejection|^curl: \(\d+\)|"
                r"\((?:[A-Z]\w*::)*[A-Z]\w*Error\)\s*$|^Unhandled exception\b|"
                r"\bAn error occurred \([\w.]+\) when calling the \w+ operation", re.M | re.I),
     "an error line"),
    (re.compile(r"^(?:panic|fatal|error)(?:\[\w+\])?:\s", re.M), "an error line"),
    # a PowerShell error record ("    + CategoryInfo          : ObjectNotFound: ...")
    (re.compile(r"^[^\S\n]*\+ (?:CategoryInfo|FullyQualifiedErrorId)[^\S\n]*:", re.M), "an error line"),
    # gRPC (Go), MySQL, kubectl, getopt usage errors
    (re.compile(r"\brpc error: code = (?!OK\b)\w+ desc =|^(?:ERROR|Error) \d+(?: \([\w.]+\))?:|"
                r"^(?:Error|ERROR) from server\b|^[\w.-]+: (?:option requires an argument|invalid option|"
                r"unrecognized option|illegal option|missing operand)\b", re.M),
     "an error line"),
    # S3, Azure Blob, Google Cloud Storage, OSS: an XML error document ("<Error><Code>AccessDenied</Code>...")
    (re.compile(r"\A\s*(?:<\?xml[^>]{0,200}\?>\s*)?<Error>\s*<Code>"), "an XML error response"),
    (re.compile(r"^[^\S\n]*at [\w.$<>]+\([\w.]+:\d+\)\s*$|^[^\S\n]+at [\w.$<>`\[\],]+\(.*\) in \S.*:line \d+\s*$", re.M),
     "a stack trace"),
]
# Phrases that documentation, FAQs and reports use too ("returns 404 Not Found when ...", "if ssh prints
# Permission denied ..."): they count only in a short reply, or on its first or last line, not in a
# conditional clause, and not in a text that lists several HTTP statuses (API docs, a link report, a log).
_WEAK_ERROR_TEXT = [
    (re.compile(r"\bHTTP(?:/\d(?:\.\d)?)?\s+[45]\d\d\b|\bstatus(?: code)?[:= ]+[45]\d\d\b|"
                r"\b[45]\d\d (?:Bad Request|Unauthorized|Forbidden|Not Found|Too Many Requests|"
                r"Internal Server Error|Bad Gateway|Service (?:Temporarily )?Unavailable|Gateway Time-?out|"
                r"page not found)\b", re.I),
     "an HTTP error status"),
    (re.compile(r"\b(?:ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENOTFOUND|EAI_AGAIN|NXDOMAIN|connection refused|"
                r"timed out after \d+(?:\.\d+)?\s*(?:ms|s|sec|secs|seconds?|milliseconds?|minutes?)\b|"
                r"permission denied|command not found|segmentation fault|out of memory|rate limit exceeded|"
                r"DNS resolution failed|Name or service not known|Could not resolve host|DeadlineExceeded|"
                r"deadline exceeded|(?:request|operation|connection|query|call|read|connect) (?:has )?timed out)\b", re.I),
     "a system error"),
    (re.compile(r"\A\s*(?:Failed to (?:fetch|connect|load|open|read|write|resolve|download|upload|execute|run|"
                r"parse|reach|authenticate)|Unable to (?:connect|reach|resolve|fetch|authenticate))\b", re.I),
     "a failure report"),
]
_STATUS_CODE = re.compile(r"\b([1-5]\d\d) (?:Continue|Switching|OK|Created|Accepted|No Content|Partial Content|Moved|"
                          r"Found|See Other|Not Modified|Temporary Redirect|Permanent Redirect|Bad Request|Unauthorized|"
                          r"Payment Required|Forbidden|Not Found|Method Not Allowed|Not Acceptable|Proxy|Request Timeout|"
                          r"Conflict|Gone|Length Required|Precondition|Payload Too|Content Too|URI Too|Unsupported|"
                          r"Range Not|Expectation Failed|I'm a teapot|Misdirected|Unprocessable|Locked|Failed Dependency|"
                          r"Too Early|Upgrade Required|Too Many Requests|Request Header|Unavailable For|Internal Server|"
                          r"Not Implemented|Bad Gateway|Service Unavailable|Gateway Time|HTTP Version|Variant Also|"
                          r"Insufficient Storage|Loop Detected|Not Extended|Network Authentication)\b|\bstatus(?: code)?[:= ]+([1-5]\d\d)\b|"
                          r"\bHTTP/\d(?:\.\d)? ([1-5]\d\d)\b")
_HTML_TITLE = re.compile(r"<title[^>]{0,200}>([^<]{0,200})</title>", re.I)
_ERROR_TITLE = re.compile(r"\b[45]\d\d\b(?=.*\b(?:error|not found|unavailable|forbidden|denied|unauthori[sz]ed|"
                          r"bad (?:gateway|request)|time-?out|too many)\b)|\b(?:error|not found|unavailable|forbidden|"
                          r"denied|unauthori[sz]ed|bad (?:gateway|request)|time-?out|too many)\b.*\b[45]\d\d\b", re.I)
_CONDITIONAL = re.compile(r"\b(?:if|when|whenever|unless|in case)\b", re.I)
_TAG = re.compile(r"<[^>\n]{1,400}>")


def find_tool_error(text: str, tool: str | None = None) -> Finding | None:
    """A tool result that reports a failure instead of an answer. `tool`: the tool's name, when known; a tool
    named for reading (get_, list_, search_, ...) returns records, whose failed states are data, not a batch
    of its own operations that failed."""
    reads = tool is not None and _READS.match(tool.rsplit(".", 1)[-1]) is not None
    if text.strip() in _NOTHING:
        # a bare null (None, undefined) where an answer should be: the tool's own code failed to produce one (a
        # handler that swallowed its exception, a wrapper that lost the value). A tool whose output schema allows
        # null ("no match") is judged by that schema instead (QuarantineStage.check_message).
        return Finding("tool_error", NULL_RESULT, text.strip())
    if response := _HTTP_RESPONSE.match(text):
        # a raw HTTP response (curl -i, an http_request tool): its status judges it, and a 200's body is the answer,
        # which still may report a failure ('HTTP/1.1 200 OK ... {"success": false, "reason": "invalid api key"}')
        status = int(response.group(1))
        if status >= 400:
            return Finding("tool_error", f"tool returned HTTP {status}", shorten(line_at(text, response.start(1))))
        body = text[response.end():]
        return find_tool_error(body, tool) if body.strip() and not _HTTP_RESPONSE.match(body) else None
    data = parse_json(text)
    if isinstance(data, list) and len(data) == 1:
        data = data[0]  # [{"error": "not found"}]: one failed item is the whole answer
    if isinstance(data, Mapping):
        finding = _envelope_error(data)
        for key in ("result", "response", "data", "body"):  # {"result": {"error": {...}}}
            if finding is None and isinstance(data.get(key), Mapping) and len(data) <= 3:
                finding = _envelope_error(data[key])
        return (finding or _process_failure(data) or _trace_in_field(data)
                or (None if reads else _batch_failure(data)))
    if data is not None:
        return None if reads else _batch_failure(data)  # otherwise a JSON list or scalar is an answer
    if finding := _block_page(text):
        return finding
    listing = len(_LOG_LEVEL_LINE.findall(text)) >= 2 and _CALM_LOG_LINE.search(text) is not None
    for pattern, why in _ERROR_TEXT:
        for match in pattern.finditer(text):
            line = line_at(text, match.start())
            if listing and _LOG_LEVEL_LINE.match(line + "\n"):
                continue  # an ERROR entry among INFO/WARNING entries: a log the tool read, not its failure
            return Finding("tool_error", f"tool output contains {why}", shorten(line))
    visible = _TAG.sub("\n", text) if _TAG.search(text) else text  # an HTML error page: its text
    title = _HTML_TITLE.search(text)
    if title and len(visible) < 2000 and _ERROR_TITLE.search(title.group(1)):
        # a short page titled with its status: "503 Service Temporarily Unavailable" (nginx), "500 - Internal
        # server error." (IIS), "Server Error (500)" (Django)
        return Finding("tool_error", "tool returned an HTTP error page", shorten(title.group(1)))
    lines = [line.strip() for line in visible.splitlines() if line.strip()]
    statuses = {int(a or b or c) for a, b, c in _STATUS_CODE.findall(visible)}
    if len(statuses) >= 3 or (len(statuses) >= 2 and min(statuses) < 400):
        # several statuses, successes among them: a listing about them (API docs, a link report, a log), not
        # one failed call ("502 Bad Gateway, then 504 Gateway Timeout" is a call that failed twice)
        return None
    for pattern, why in _WEAK_ERROR_TEXT:
        span, line, on_edge = (0, -1), "", False
        for match in pattern.finditer(visible):
            position = match.start()
            if not span[0] <= position < span[1]:  # a new line: found once, not once per match (a long line
                start = visible.rfind("\n", 0, position) + 1  # with many matches took seconds)
                end = visible.find("\n", position)
                span = (start, len(visible) if end < 0 else end)
                line = visible[span[0] : span[1]].strip()
                on_edge = len(lines) <= 4 or line in (lines[0], lines[-1])
            if not on_edge:
                continue
            sentence = re.split(r"[.!?]\s", visible[max(span[0], position - 300) : position])[-1]
            if _CONDITIONAL.search(sentence):
                continue  # "if you see Permission denied, ...": a mention
            return Finding("tool_error", f"tool output contains {why}", shorten(line))
    return None


# A raw HTTP response: its status line, headers, the blank line, then the body (group 1: the status).
_HTTP_RESPONSE = re.compile(r"\s*HTTP/\d(?:\.\d)? (\d{3})\b[^\n]*\n(?:[!-9;-~]+:[^\n]*\n)*(?:\r?\n|\Z)")

# The fields a wrapper puts a caught exception in: {"result": "java.lang.NullPointerException ...\n\tat ..."},
# {"ok": true, "message": "Traceback (most recent call last): ..."}. Not "body", "text" or "content": an issue's
# or a post's body quotes tracebacks as data.
_RESULT_FIELDS = ("result", "output", "response", "message", "detail", "details", "msg")
_TRACE = re.compile(r"Traceback \(most recent call last\)|^[^\S\n]*at [\w.$<>]+\([\w.]+:\d+\)\s*$|"
                    r"^[^\S\n]+at [\w.$<>`\[\],]+\(.*\) in \S.*:line \d+\s*$", re.M)


def _trace_in_field(data: Mapping[str, Any]) -> Finding | None:
    """A stack trace returned as the call's result, in a small reply's result or message field: the tool (or
    its wrapper) caught an exception and handed its text back as the answer."""
    if len(data) > 4:
        return None  # a record with a trace among its fields (a crash report, a CI job) is data
    for key in _RESULT_FIELDS:
        value = data.get(key)
        if isinstance(value, str) and (match := _TRACE.search(value)):
            return Finding("tool_error", "tool output contains a stack trace", shorten(line_at(value, match.start())))
    return None


# Log entries as Python's logging.basicConfig (`ERROR:app:...`), glog or syslog-less tools write them. A text
# with such lines of several levels is a log listing: its ERROR lines are entries, not the tool's failure.
_LOG_LEVEL_LINE = re.compile(r"^(?:DEBUG|INFO|NOTICE|WARN|WARNING|ERROR|CRITICAL|FATAL|TRACE)(?::[\w.]+:|:?[ \t])[^\n]*\n?", re.M)
_CALM_LOG_LINE = re.compile(r"^(?:DEBUG|INFO|NOTICE|WARN|WARNING|TRACE)(?::[\w.]+:|:?[ \t])", re.M)


NULL_RESULT = "tool returned no result (null)"
_NOTHING = frozenset({"null", "None", "undefined", "nil", "NULL"})
_OUTCOME_OK = frozenset({"ok", "success", "succeeded", "successful", "done", "completed", "complete", "created",
                         "updated", "deleted", "sent", "delivered", "accepted"})


def _outcome(item: Any) -> bool | None:
    """Whether one item of a batch reply says its operation succeeded (True) or failed (False); None when the
    item says neither (a record, a linter finding: {"line": 3, "error": "unused import"} is an answer)."""
    if isinstance(item, Mapping) and len(item) == 1 and isinstance(next(iter(item.values())), Mapping):
        item = next(iter(item.values()))  # Elasticsearch's bulk items: {"index": {"_id": "2", "status": 400, ...}}
    if not isinstance(item, Mapping):
        return None
    flags = [item[k] for k in ("ok", "success", "succeeded") if isinstance(item.get(k), bool)]
    status = item.get("status", item.get("statusCode", item.get("status_code")))
    number = int(status) if isinstance(status, str) and status.isdigit() else status
    if False in flags:
        return False
    # an error field, not a "reason": an order listing's {"status": "failed", "reason": "address not found"} is data
    says_why = any(item.get(k) not in _NO_ERROR for k in ("error", "errors", "error_message", "errorMessage"))
    if says_why and ((isinstance(number, int) and not isinstance(number, bool) and 400 <= number <= 599)
                     or (isinstance(status, str) and status.lower() in _FAILED_STATUS)):
        return False  # a record with a status (a "failed" payment) is data; an operation that failed says why
    if True in flags or (isinstance(number, int) and not isinstance(number, bool) and 200 <= number <= 299) \
            or (isinstance(status, str) and status.lower() in _OUTCOME_OK):
        return True
    return None


# A tool named for reading: what it returns are records ("list_orders": an order whose payment failed).
_READS = re.compile(r"(?i:get|list|search|find|fetch|query|lookup|look_up|read|show|describe|view|retrieve|browse|"
                    r"check|count|export|download|report)(?:[_\-0-9A-Z]|$)")


# not "status_code": {"status_code": 200, "output": ...} is an HTTP tool's answer, not a process's exit
_EXIT_KEYS = ("exit_code", "exitCode", "returncode", "return_code", "exit_status", "exitStatus")


def _process_failure(data: Mapping[str, Any]) -> Finding | None:
    """A command run by the tool that failed: {"stdout": "", "stderr": "Traceback ...", "exit_code": 1}. The
    shell's own codes (126 not executable, 127 not found, 128+ killed by a signal) are failures whatever was
    printed; any other non-zero exit is judged by its stderr, as a text result would be ("grep" exits 1 when
    nothing matched, a test runner when a test failed: answers)."""
    if not ({"stderr", "stdout", "output"} & set(data)):
        return None
    code = next((data[k] for k in _EXIT_KEYS if isinstance(data.get(k), int) and not isinstance(data.get(k), bool)), None)
    if code is not None and (code in (126, 127) or code >= 128 or code < 0):
        return Finding("tool_error", f"the command exited with status {code}", shorten(data.get("stderr", "")))
    stderr = data.get("stderr")
    if code != 0 and isinstance(stderr, str) and stderr.strip() and (finding := find_tool_error(stderr)):
        return finding
    return None


def _batch_failure(data: Any) -> Finding | None:
    """A batch reply (a list of operation outcomes, or one under "results"/"items"/...) in which some operations
    failed: {"results": [{"id": 1, "ok": true}, {"id": 2, "ok": false, "error": "timeout"}]}. A partial failure
    is a failure of the call: the model must not report the batch as done."""
    lists = [data] if isinstance(data, list) else \
        [v for v in data.values() if isinstance(v, list)] if isinstance(data, Mapping) else []
    for items in lists:
        if len(items) < 2:
            continue
        outcomes = [_outcome(item) for item in items[:500]]
        failed = outcomes.count(False)
        if failed and outcomes.count(None) <= len(outcomes) // 2:
            return Finding("tool_error", f"tool reported {failed} of {len(outcomes)} operations failed",
                           shorten(items[outcomes.index(False)]))
    return None


# Pages that bot protection (Cloudflare, Akamai, Imperva, DataDome, PerimeterX, DDoS-Guard) returns instead of
# the page asked for. Each marker alone can be quoted (a forum question, an article about error 1020); two
# of them on a short page are the page itself.
_BLOCK_MARKERS = [re.compile(p, re.I) for p in (
    r"<title>\s*(?:Just a moment\.{3}|Attention Required! \| Cloudflare|Access denied(?: \| [^<]*)?|"
    r"Please Wait\.{3} \| Cloudflare|Pardon Our Interruption|DDoS-Guard|Robot or human\??|Are you a robot\??|"
    r"One more step|Security check|Checking your browser)\s*</title>",
    r"\bError(?: code)?:? 10(?:0[5-9]|1\d|20)\b",
    r"\bRay ID:?\s*[0-9a-f]{12,}|\bcf-ray\b|/cdn-cgi/challenge-platform/|\bcf_chl_\w+|\bcf-browser-verification\b",
    r"\bChecking (?:your browser before accessing|if the site connection is secure)\b",
    r"\bEnable JavaScript and cookies to continue\b",
    r"\bneeds to review the security of your connection before proceeding\b",
    r"\bThis website is using a security service to protect itself from online attacks\b",
    r"\bIncapsula incident ID\b|\bRequest unsuccessful\. Incapsula\b",
    r"\bReference #\d+\.[0-9a-f]+\.\d+\.[0-9a-f]+\b",
    r"\bYou don't have permission to access\b[^\n]{0,100}\bon this server\b",
    r"\b(?:Please )?verify (?:that )?you are (?:a )?human\b|\bPress (?:&|&amp;|and) Hold\b",
    r"\bcaptcha-delivery\.com\b|\bgeo\.captcha-delivery\b|\bdatadome\b",
)]


def _block_page(text: str) -> Finding | None:
    if len(text) > 20_000:
        return None
    visible = _TAG.sub(" ", text)
    if len(" ".join(visible.split())) > 1500:
        return None  # an article about bot protection, not the wall itself
    hits = [m for m in (p.search(text) for p in _BLOCK_MARKERS) if m is not None]
    if len(hits) >= 2:
        return Finding("tool_error", "tool returned a bot-protection page instead of the content",
                       shorten(hits[0].group(0)))
    return None


_NO_ERROR: tuple[Any, ...] = (None, "", [], {}, False, 0, "none", "null", "ok", "no", "false")
# Keys of a reply that is only about how the call went. A status or success flag is an error report only
# in such an envelope: {"id": "pi_1", "status": "failed"} is a payment that failed, fetched successfully.
_ENVELOPE_KEYS = frozenset({"status", "statuscode", "code", "success", "ok", "message", "error", "errors", "detail",
                            "details", "reason", "type", "title", "iserror", "content", "errormessage", "errortype",
                            "requestid", "request_id", "timestamp", "path", "instance", "documentation_url",
                            "error_description", "error_uri", "msg", "more_info", "doc_url"})
# snake_case APIs' envelope fields ({"success": false, "error_message": ...}): also the fields of a record of a failed
# job or payment ({"job_id": 7, "state": "failed", "error_message": "Out of memory"}), so they count as a record's own.
_SNAKE_ERROR_KEYS = frozenset({"error_message", "error_code", "errorcode", "error_type"})
# Telegram's Bot API failure ({"ok": false, "error_code": 400, "description": "Bad Request: chat not found"}): a
# "description" is an envelope's only in that shape ({"status": "failed", "description": "Nightly backup"} is a job).
_TELEGRAM_KEYS = frozenset({"ok", "error_code", "description", "parameters"})
_HTTP_RESPONSE_KEYS = frozenset({"statuscode", "status", "headers", "multivalueheaders", "body", "isbase64encoded"})


def _envelope_error(data: Mapping[str, Any]) -> Finding | None:
    foreign = [k for k in data if str(k).lower() not in _NOT_RECORD_KEYS]
    if len(foreign) >= 3:
        return None  # a record that has an error field (a failed job, a poll's margin of error), fetched fine
    keys = {str(k).lower() for k in data}
    code = data.get("code")
    if keys <= {"code", "message", "details"} and isinstance(code, int) and not isinstance(code, bool) \
            and 1 <= code <= 16 and data.get("message"):
        return Finding("tool_error", f"tool returned gRPC status code {code}", shorten(data.get("message")))
    for key in ("error", "errors", "exception", "traceback", "errorMessage", "errorType", "error_message"):
        value = data.get(key)
        if key == "errors" and isinstance(value, int) and not isinstance(value, bool):
            continue  # a count ({"status": "running", "processed": 41, "errors": 3}), not an error report
        if not (value in _NO_ERROR or (isinstance(value, str) and value.strip().lower() in _NO_ERROR)):
            return Finding("tool_error", f"tool returned an {key!r}", shorten(value))
    for key in ("__type", "type", "errorType", "code"):
        # AWS's JSON protocol ({"__type": "ResourceNotFoundException", "message": ...}), and any envelope
        # whose type is an exception's name
        value = data.get(key)
        if isinstance(value, str) and re.search(r"(?:Exception|Error|Fault)\Z", value.rsplit("#", 1)[-1]) \
                and keys <= _ENVELOPE_KEYS | _SNAKE_ERROR_KEYS | {"__type"}:
            return Finding("tool_error", f"tool returned an error of type {value.rsplit('#', 1)[-1]}",
                           shorten(data.get("message", data.get("Message", ""))))
    if data.get("isError") is True:  # MCP's tool-result flag
        return Finding("tool_error", "tool reported isError=true", shorten(data.get("content", "")))
    if keys <= _HTTP_RESPONSE_KEYS and keys & {"body", "headers"}:
        # An HTTP response relayed whole (AWS Lambda behind API Gateway: statusCode, headers, body)
        status = data.get("statusCode", data.get("status"))
        number = int(status) if isinstance(status, str) and status.isdigit() else status
        if isinstance(number, int) and not isinstance(number, bool) and 400 <= number <= 599:
            return Finding("tool_error", f"tool returned an HTTP {number} response", shorten(data.get("body", "")))
        return None
    if data.get("ok") is False and "error_code" in keys and keys <= _TELEGRAM_KEYS:
        return Finding("tool_error", "tool reported ok=false", shorten(data.get("description", "")))
    # {"code": 401, "msg": "token expired", "data": null}: an envelope whose payload is empty
    if not {k for k in keys if not (k == "data" and data.get("data") in (None, "", [], {}))} <= _ENVELOPE_KEYS | _SNAKE_ERROR_KEYS:
        return None
    if data.get("success") is False or data.get("ok") is False:
        return Finding("tool_error", "tool reported success=false")
    if data.get("documentation_url") and data.get("message"):  # GitHub's error shape: a message and a docs link
        return Finding("tool_error", "tool returned an error message", shorten(data.get("message")))
    for key in ("status", "statusCode", "code"):
        status = data.get(key)
        number = int(status) if isinstance(status, str) and status.isdigit() else status
        if isinstance(number, int) and not isinstance(number, bool) and 400 <= number <= 599:
            return Finding("tool_error", f"tool reported {key} {number}")
        if key == "status" and isinstance(status, str) and status.lower() in _FAILED_STATUS:
            return Finding("tool_error", f"tool reported status {status!r}")
    return None


_NOT_RECORD_KEYS = _ENVELOPE_KEYS | {"data", "id", "jsonrpc", "result", "extensions", "meta", "instance"}
_FAILED_STATUS = ("error", "failed", "failure", "fail", "timeout", "timed_out", "unavailable")
