"""QuarantineStage: content is checked before it can become durable (a summary, a cache entry, memory).

Checks, each precise rather than broad (a false quarantine hides good content from every later stage):
- tool errors: tracebacks, `Error:`/`SomethingError:` lines, HTTP 4xx/5xx statuses, JSON with an
  `"error"` key or `"success": false`, a bare null, a batch with failed operations, a failed command's exit
  status, a bot-protection page (Cloudflare's "Just a moment...");
- broken promises: a tool result that does not validate against the tool's output schema, taken from
  `output_schemas={"tool": schema}` or the tool definition in the request
  (`function["x-output-schema"]`, `"output_schema"` or MCP's `"outputSchema"`);
- prompt injection in tool results and documents (`request.metadata["documents"]`): "ignore previous
  instructions", new system prompts and role play, "you must now", hidden HTML/markdown comments that
  talk to the model, exfiltration links, chat-template tokens, invisible characters;
- assistant claims contradicted by the tool results they rest on: a number the answer gives for a
  field (`temperature`) that differs from the value the tool returned for it in the same turn, or a yes/no
  field stated the other way ("on time" when the tool returned `"delayed": true`).

What is sent:
- In the step where content appears (it comes after the newest assistant message: the model has not
  answered it yet), it is sent unchanged, so the model can see the error and recover, but its message
  is marked with `ctxkit.quarantine_marks.mark`, so summaries, the semantic cache and memory leave it out.
- On later calls (`withhold_after_step=True`, the default) it is replaced by a placeholder that keeps
  the reason and, for tool results, the tool call, but not the content: an injected instruction that
  stays in the history keeps working on every later step, and an old stack trace is noise. Tool
  messages stay in place, so calls and results stay paired. The placeholder is marked too.
- Quarantined documents stay in `metadata["documents"]` and are listed, with reasons, in
  `metadata["ctxkit.quarantined_documents"]`; a stage that renders documents must mark what it renders.

Every quarantine is logged (logger `ctxkit.quarantine` and a ledger event) once, kept per namespace,
listed with `stage.list(namespace)` and lifted with `stage.release(fingerprint)`; released content is
not quarantined again. Put this stage before the stages that summarize, cache or remember.

Layout: one detector per module (tool_errors, schema, injection, contradiction; each returns a Finding
or None and knows nothing of requests), the stage that runs them on a request (stage), and the registry
that keeps quarantines per namespace across processes (registry).
"""

from ...quarantine_marks import DOCUMENTS_KEY, PLACEHOLDER_PREFIX
from .contradiction import find_contradiction, numeric_fields
from .finding import Finding
from .injection import find_injection
from .registry import QuarantineRecord, QuarantineRegistry
from .schema import find_schema_violation
from .stage import QuarantineStage
from .tool_errors import find_tool_error

__all__ = [
    "DOCUMENTS_KEY", "PLACEHOLDER_PREFIX", "Finding", "QuarantineRecord", "QuarantineRegistry", "QuarantineStage",
    "find_contradiction", "find_injection", "find_schema_violation", "find_tool_error", "numeric_fields",
]
