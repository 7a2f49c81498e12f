"""Secrets out of anything ctxkit writes down (ledger records, log lines, quarantine records).

Tool output and error texts can quote API keys and request headers; the ledger and the logs are read by
more people than the keys are meant for. Known key shapes keep a short prefix, so a reader can still tell
which key it was.
"""

from __future__ import annotations

import re

# Bounded: an unbounded `(?:[A-Za-z0-9]+[_-])*` (and scheme) is tried at every word start and runs to the end of
# a long `item-item-item-...` run, quadratic time (25 KB took 10 s, in the proxy's event loop).
# A prefix with a separator (DB_PASSWORD), or one of the glued-on env-variable prefixes (PGPASSWORD).
# "API key: ..." and "access token: ..." as error messages write them (a space between the words) count too, and
# Azure's connection strings' AccountKey= / SharedAccessKey= (glued on, as PGPASSWORD is).
# Also the camel-case names of JSON answers (AWS STS's SecretAccessKey, SessionToken) and Azure's subscription key.
_KEY_NAME = (r"(?:[A-Za-z0-9]{1,32}[_-]){0,6}(?:pg|db|mysql|redis|shared)?(?:api[_\- ]?key|access[_\- ]?key|"
             r"secret[_\- ]?access[_\- ]?key|secret[_\- ]?key|subscription[_\- ]?key|"
             r"account[_-]?key|client[_\- ]?secret|secret|access[_\- ]?token|auth[_\- ]?token|refresh[_\- ]?token|"
             r"session[_\- ]?token|token|password|passwd|pwd|passphrase)")
# A value written after its name with only a space ("apikey Zq81x0...", "password Hunter2x"): prose puts words there
# ("the API key is invalid", "basic research"), so only a run holding both a letter and a digit counts.
_KEYLIKE = r"(?=[A-Za-z._~+/=\-]{0,63}[0-9])(?=[0-9._~+/=\-]{0,63}[A-Za-z])[A-Za-z0-9._~+/=\-]{8,}"
# Each alternative captures exactly one group: the part kept so a reader can tell which secret it was.
_SECRET = re.compile(
    r"\b((?:sk|pk|rk)[-_][A-Za-z0-9_\-]{4})[A-Za-z0-9_\-]{8,}"  # OpenAI- and Stripe-style keys
    r"|\b(AKIA[A-Z0-9]{4})[A-Z0-9]{12}\b"  # AWS access key ids
    r"|\b(gh[pousr]_[A-Za-z0-9]{4})[A-Za-z0-9]{16,}"  # GitHub tokens
    r"|\b(github_pat_[A-Za-z0-9]{4})[A-Za-z0-9_]{16,}"  # GitHub fine-grained personal access tokens
    r"|\b(glpat-[A-Za-z0-9_\-]{4})[A-Za-z0-9_\-]{12,}"  # GitLab personal access tokens
    r"|\b(hf_[A-Za-z0-9]{4})[A-Za-z0-9]{16,}"  # Hugging Face tokens
    r"|\b(xox[abprs]-[A-Za-z0-9]{4})[A-Za-z0-9\-]{6,}"  # Slack tokens
    r"|\b(AIza[0-9A-Za-z_\-]{4})[0-9A-Za-z_\-]{20,}"  # Google API keys
    r"|\b(eyJ[A-Za-z0-9_\-]{4})[A-Za-z0-9_\-]{0,1024}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}"  # JWTs
    # PEM private keys, and PGP's (whose armour line ends in BLOCK)
    r"|(-----BEGIN [A-Z ]*PRIVATE KEY(?: BLOCK)?-----)[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY(?: BLOCK)?-----|$)"
    # user:password@ in URLs (redis://:password@ too); up to the authority's last '@', as URL parsers split it:
    # a password holding an unencoded '@' kept its part after that '@'
    r"|(\b[a-z][a-z0-9+.\-]{0,31}://[^\s:/@]*:)[^\s/?#\"'<>]+(?=@)"
    # command lines: curl's -u/--user user:password (not docker's -u uid:gid, pip's -U URL), a --password/--api-key/--token
    # flag's value after a space, mysql's -pPASSWORD (glued on; -P is its port), sshpass -p PASSWORD
    # (the user read up to 256 characters, and not over an '=': each "-u=" of a run "-u=-u=..." read the rest of it,
    # 200 KB took 68 s)
    r"|(?<![\w-])((?:(?-i:-u)|--user)(?:\s+|=)['\"]?(?!\d+:\d+\b)[^\s:'\"=]{1,256}:)(?!//)[^\s'\"]{3,}"
    r"|(?<![\w-])(--(?:[a-z0-9]+-){0,4}(?:password|passwd|pass|api-?key|secret|secret-key|access-key|client-secret|"
    r"auth-token|token)\s+['\"]?)(?!-|\d+\b)[^\s'\"]{4,}"
    r"|(\b(?:mysql|mysqldump|mysqladmin|mysqlimport|mysqlcheck|mysqlshow|mariadb)\b[^\n]{0,200}?\s(?-i:-p))[^\s'\"]+"
    r"|(\bsshpass\s+(?-i:-p)\s*)[^\s'\"]+"
    # an Authorization header whatever its scheme, or with none (a raw key: Linear's, Shopify's); a Cookie header
    r"|(?<![A-Za-z0-9])((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?(?:[A-Za-z]{2,20}\s+)?)[A-Za-z0-9._~+/=\-]{8,}"
    r"|(?<![A-Za-z0-9])((?:set-)?cookie[\"']?\s*:\s*[\"']?)[^\s\"';=]+=[^\s\"';]{4,}(?:;\s*[^\s\"';]+)*"
    # Authorization headers' values; in prose these words are followed by words ("basic research", "bearer bonds"),
    # a credential has a digit in its head or is too long for a word
    r"|\b((?:Bearer|Basic|Token)\s+)(?=[A-Za-z0-9._~+/=\-]{24}|[A-Za-z._~+/=\-]{0,23}[0-9])[A-Za-z0-9._~+/=\-]{8,}"
    # webhook URLs, whose path is the secret (anyone holding one posts to the channel)
    r"|(\bhttps://hooks\.slack\.com/(?:services|workflows|triggers)/)[A-Za-z0-9/_\-]{8,}"
    r"|(\bhttps://(?:[a-z]+\.)?discord(?:app)?\.com/api/webhooks/)[0-9]+/[A-Za-z0-9_\-]{8,}"
    r"|\b(npm_[A-Za-z0-9]{4})[A-Za-z0-9]{16,}"  # npm tokens
    r"|\b(pypi-AgE[A-Za-z0-9_\-]{4})[A-Za-z0-9_\-]{16,}"  # PyPI API tokens
    r"|\b(SG\.[A-Za-z0-9_\-]{4})[A-Za-z0-9_\-]{12,}\.[A-Za-z0-9_\-]{12,}"  # SendGrid keys
    r"|\b(whsec_[A-Za-z0-9]{4})[A-Za-z0-9+/=]{16,}"  # Stripe webhook signing secrets
    # a URL's query parameters that carry a key or a signature (Azure SAS sig=, Azure Functions code=, ?key=), also
    # under a prefix (api-key=, subscription-key=, access_token=, x-amz-signature=; not keyword= or zip_code=)
    r"|([?&](?:code|(?:[A-Za-z0-9]+[_-])*(?:key|sig|signature|token|secret|password|auth|credentials?))=)"
    r"[^\s&#\"'<>]{4,}"
    # "key": "value" (a quoted value may hold spaces; its quotes stay), and key=value
    rf"|(?<![A-Za-z0-9])({_KEY_NAME}[\"']?\s*[:=]\s*\")[^\"\n]{{4,}}(?=\")"
    rf"|(?<![A-Za-z0-9])({_KEY_NAME}[\"']?\s*[:=]\s*')[^'\n]{{4,}}(?=')"
    # the same inside JSON held in a JSON string (a request body an error quotes): \"password\": \"...\"
    rf'|(?<![A-Za-z0-9])({_KEY_NAME}\\"\s*[:=]\s*\\")(?:[^"\\\n]|\\[^"]){{4,}}?(?=\\")'
    # (or only a space between them, on one line, when the value looks like a key: after a line break it is the
    # next line's text, "$ pwd" then the directory it printed)
    rf"|(?<![A-Za-z0-9])({_KEY_NAME}(?:[\"']?\s*[:=]\s*|[^\S\n]+(?={_KEYLIKE})))[^\s\"',;&]{{4,}}",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with API keys, tokens, private keys, URL passwords and `password=...`-style values replaced
    by `…`."""
    return _SECRET.sub(lambda m: next(g for g in m.groups() if g is not None) + "…", text)
