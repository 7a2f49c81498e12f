"""Secrets never reach the ledger, the logs or quarantine records: every common key shape is cut."""

from __future__ import annotations

import pytest

from ctxkit.redaction import redact

SECRETS = [
    ("DB_PASSWORD=hunter2hunter2", "hunter2hunter2"),
    ("client_secret=abcd1234efgh", "abcd1234efgh"),
    ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG", "wJalrXUtnFEMI"),
    ("charge failed for sk_live_51H8abcdEFGHijklMNOP", "51H8abcdEFGH"),
    ("OPENAI_API_KEY=sk-proj-abcdefgh12345678", "abcdefgh12345678"),
    ("remote: ghp_abcdefghijklmnopqrstuvwxyz0123456789", "qrstuvwxyz0123456789"),
    ("slack xoxb-123456789012-abcdefghij", "123456789012-abcdefghij"),
    ("key=AIzaSyA1234567890abcdefghijklmnopqrstu", "1234567890abcdefghij"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.abcdefghijklmn", "eyJzdWIiOiIxMjM0In0"),
    ("could not connect to postgresql://admin:S3cretPass@db.example.com/x", "S3cretPass"),
    ('{"token": "abc def ghi jkl"}', "ghi jkl"),
    ('password: "my long pass phrase"', "pass phrase"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----", "MIIEpAIBAAKCAQEA"),
    ("Authorization: Bearer abcdefghijkl", "abcdefghijkl"),
    ("AKIAABCDEFGHIJKLMNOP used", "EFGHIJKLMNOP"),
]


@pytest.mark.parametrize(("text", "secret"), SECRETS)
def test_secrets_are_cut(text, secret):
    assert secret not in redact(text)


@pytest.mark.parametrize("text", ["max_tokens=256", "tokens: 1234", "the token count is 5",
                                  "https://example.com/path?q=1", "a password policy: 12 characters"])
def test_ordinary_text_is_left_alone(text):
    assert redact(text) == text
