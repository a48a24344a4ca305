"""Keeping credentials out of logs and messages.

:func:`redact` scrubs session tokens and the secret values of the AWS environment from any text;
importing this module also installs it as a filter on botocore's request loggers, whose DEBUG
records carry request headers (and so a session token).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Final

_SECRET_ENV_NAMES: Final = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
# A session token in a canonical request ("x-amz-security-token:…"), a header dict
# ("'X-Amz-Security-Token': b'…'"), a header list ("('X-Amz-Security-Token', '…')") or a presigned
# URL ("X-Amz-Security-Token=…").
_TOKEN_RE: Final = re.compile(r"(x-amz-security-token['\"]?\s*[:=,]\s*b?['\"]?)[^'\"\s,&})]+", re.IGNORECASE)
#: botocore loggers whose DEBUG records carry request headers (and so a session token).
_BOTOCORE_REQUEST_LOGGERS: Final = ("botocore.auth", "botocore.endpoint", "botocore.awsrequest", "botocore.httpsession")


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """``text`` with session tokens and the secret values of the AWS environment replaced by ``***``."""
    text = _TOKEN_RE.sub(r"\1***", text)
    for source in (env, os.environ):
        if source is None:
            continue
        for name in _SECRET_ENV_NAMES:
            value = source.get(name)
            if value and len(value) >= 4:
                text = text.replace(value, "***")
    return text


class _RedactCredentials(logging.Filter):
    """Scrubs credentials from botocore's DEBUG records: botocore logs each request's canonical form
    and headers, which include ``X-Amz-Security-Token`` (the secret access key itself is never sent)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's problem, not ours
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def _install_log_redaction() -> None:
    for name in _BOTOCORE_REQUEST_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, _RedactCredentials) for f in target.filters):
            target.addFilter(_RedactCredentials())


_install_log_redaction()
